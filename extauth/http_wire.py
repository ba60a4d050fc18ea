"""ext_authz over HTTP/1.1, translated: Envoy's http_service check request -> the CheckRequest the
gRPC Check receives, and extauth's CheckResponse -> the HTTP answer Envoy's http_service reads.

Pure functions; extauth/http_front.py does the I/O. What a real Envoy sends over each transport was
probed (docs/hot-path.md, tests/test_authz_http_parity.py): the gRPC CheckRequest has the client's
headers plus the pseudo-headers `:authority`, `:method`, `:path`, `:scheme` and no `host`; the HTTP
check has the same headers with `host`, Envoy's `x-envoy-internal` and `x-envoy-expected-rq-timeout-ms`,
a Content-Length of its own, and the x-ccr-authz-* facts the router adds (ccr/contract.py).

An answer names only what the router lets through (Envoy drops any other name in silence): each
dynamic metadata key must have its header_to_metadata rule, each upstream header be x-ccr-* or
declared, each client header be one the gateway emits or declared (policy.result_names). Anything
else is refused here (`Undeclared`) so that a policy result is never silently cut short.
"""

from __future__ import annotations

import base64
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2

from ccr.config import GatewayConfig
from ccr.contract import (
    AUTHZ_BODY_CAPTURE,
    AUTHZ_ERROR_TYPE,
    AUTHZ_HTTP_CLIENT_HEADER_PREFIXES,
    AUTHZ_HTTP_CLIENT_HEADERS,
    AUTHZ_HTTP_FULL_PREFIX,
    AUTHZ_HTTP_IDENTITY_PREFIX,
    AUTHZ_HTTP_MD_KEYS,
    AUTHZ_HTTP_STATUS_STANDINS,
    CCR_HEADER_PREFIX,
    H_AUTHZ_BODY_CAPTURE,
    H_AUTHZ_CONTENT_LENGTH,
    H_AUTHZ_HEADERS_TO_REMOVE,
    H_AUTHZ_MD_PREFIX,
    H_AUTHZ_PEER_ADDRESS,
    H_AUTHZ_PEER_CERT,
    H_AUTHZ_PEER_URI,
    H_AUTHZ_PREFIX,
    H_AUTHZ_PROTOCOL,
    H_REQUEST_ID,
    authz_md_header,
)
from ccr.errors import error_body

# Added by Envoy's HTTP client to every check request; never the client's (Envoy's listener removes a
# client's x-envoy-* before ext_authz, and the gRPC CheckRequest carries neither).
TRANSPORT_ONLY_HEADERS = frozenset({"x-envoy-internal", "x-envoy-expected-rq-timeout-ms"})
# Headers that frame the HTTP message itself: never an answer header, whatever a config declares.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                             "trailer", "proxy-connection", "host", H_AUTHZ_HEADERS_TO_REMOVE})
_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+\Z")
_BAD_VALUE = re.compile(r"[\r\n\x00]")

FULL, IDENTITY = "full", "identity"


def split_target(target: str) -> tuple[str, str] | None:
    """(phase, the client's original path with its query) of a check request's target; None: not a check."""
    for prefix, phase in ((AUTHZ_HTTP_FULL_PREFIX, FULL), (AUTHZ_HTTP_IDENTITY_PREFIX, IDENTITY)):
        if target.startswith(prefix) and target[len(prefix):len(prefix) + 1] == "/":
            return phase, target[len(prefix):]
    return None


def _socket_address(value: str) -> tuple[str, int]:
    """An address Envoy formatted: "ip", "ip:port", "[v6]" or "[v6]:port" (with or without the port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else 0
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port) if port.isdigit() else 0
    return value, 0


def check_request(method: str, path: str, headers: Iterable[tuple[str, str]], body_len: int,
                  phase: str = FULL) -> pb.CheckRequest:
    """The CheckRequest Envoy's gRPC client would have sent for this check request (without the body:
    Authorizer.check takes it apart). `headers`: lower-case names, in the order received; `body_len`:
    the bytes received with the check (what gRPC reports as http.size when the body is buffered)."""
    req = pb.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    merged: dict[str, str] = {}
    facts: dict[str, str] = {}
    for name, value in headers:
        if name.startswith(H_AUTHZ_PREFIX):
            facts[name] = value
            continue
        if name in TRANSPORT_ONLY_HEADERS:
            continue
        if name == "host":
            name = ":authority"
        have = merged.get(name)
        merged[name] = value if have is None else f"{have},{value}"  # as Envoy joins a repeated header
    # The check's Content-Length is Envoy's (the buffered body; 0 for a headers-only check). A router that
    # sends the optional facts (H_AUTHZ_PROTOCOL is never empty) sends the client's own as
    # H_AUTHZ_CONTENT_LENGTH, absent when the client sent none (chunked); else the buffered length is the
    # best there is for a full check, and a headers-only check has none.
    protocol = facts.get(H_AUTHZ_PROTOCOL)
    client_length = facts.get(H_AUTHZ_CONTENT_LENGTH)
    if client_length is not None:
        merged["content-length"] = client_length
    elif protocol is not None or phase != FULL:
        merged.pop("content-length", None)
    merged[":method"] = method
    merged[":path"] = path
    scheme = merged.get("x-forwarded-proto")
    if scheme is not None:  # Envoy's :scheme follows the x-forwarded-proto its listener settled
        merged[":scheme"] = scheme
        http.scheme = scheme
    http.headers.update(merged)
    http.id = merged.get(H_REQUEST_ID, "")
    http.method = method
    http.path = path
    http.host = merged.get(":authority", "")
    if phase == FULL:
        http.size = body_len
    if protocol:
        http.protocol = protocol
    now = time.time_ns()  # (Timestamp.GetCurrentTime goes through datetime: ~5 µs)
    attrs.request.time.seconds, attrs.request.time.nanos = divmod(now, 1_000_000_000)
    source = attrs.source
    peer = facts.get(H_AUTHZ_PEER_ADDRESS)
    if peer:
        host, port = _socket_address(peer)
        sock = source.address.socket_address
        sock.address = host
        if port:
            sock.port_value = port
    uri = facts.get(H_AUTHZ_PEER_URI)
    if uri:
        source.principal = uri
    cert = facts.get(H_AUTHZ_PEER_CERT)
    if cert:
        source.certificate = cert  # URL-encoded, as gRPC's include_peer_certificate sends it
    return req


# -- answers ---------------------------------------------------------------------------


class Undeclared(Exception):
    """An answer names something the router would drop: `what` (a metadata key, an upstream header, a
    client header) and `name`."""

    def __init__(self, what: str, name: str, why: str = "not declared") -> None:
        super().__init__(f"{what} {name!r}: {why}")
        self.what, self.name = what, name


@dataclass(frozen=True)
class AnswerNames:
    """What an answer may name: the contract's own and the config's policy.result_names. Names that
    passed are remembered (a few dozen distinct ones), so a check pays one dict lookup per name."""

    metadata: frozenset[str]
    upstream: frozenset[str]
    client: frozenset[str]
    client_prefixes: tuple[str, ...] = AUTHZ_HTTP_CLIENT_HEADER_PREFIXES
    _passed: dict[tuple[str, str], str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, config: GatewayConfig) -> AnswerNames:
        r = config.policy.result_names
        return cls(metadata=frozenset(AUTHZ_HTTP_MD_KEYS) | frozenset(r.metadata),
                   upstream=frozenset(r.headers),
                   client=frozenset(AUTHZ_HTTP_CLIENT_HEADERS) | frozenset(r.response_headers))

    def upstream_header(self, key: str) -> str:
        hit = self._passed.get(("u", key))
        if hit is not None:
            return hit
        name = _name("upstream header", key)
        if name.startswith((H_AUTHZ_MD_PREFIX, H_AUTHZ_PREFIX)):  # would forge metadata or Envoy's own facts
            raise Undeclared("upstream header", name, "reserved for the transport")
        if not (name.startswith(CCR_HEADER_PREFIX) or name in self.upstream):
            raise Undeclared("upstream header", name, "not x-ccr-* and not in policy.result_names.headers")
        return self._remember("u", key, name)

    def _remember(self, kind: str, key: str, name: str) -> str:
        if len(self._passed) < 4096:  # bounded: keys come from policies
            self._passed[(kind, key)] = name
        return name

    def client_header(self, key: str) -> str:
        hit = self._passed.get(("c", key))
        if hit is not None:
            return hit
        name = _name("client header", key)
        if not (name in self.client or name.startswith(self.client_prefixes)):
            raise Undeclared("client header", name, "not one the gateway emits and not in "
                                                    "policy.result_names.response_headers")
        return self._remember("c", key, name)

    def undeclared_in_allow(self, resp: pb.CheckResponse) -> str | None:
        """Why an allowing `resp` could not be carried (a name the router would drop), or None. Asked by the
        Authorizer before it records the decision (Authorizer.answer_check), so the decision log records
        the refusal the client gets, not an allow."""
        try:
            ok = resp.ok_response
            for opt in ok.headers:
                self.upstream_header(opt.header.key)
            for opt in ok.response_headers_to_add:
                self.client_header(opt.header.key)
            for key in resp.dynamic_metadata.fields:
                self.metadata_key(key)
        except Undeclared as e:
            return f"the policy result names {e}: declare it in policy.result_names (authz_transport: http)"
        return None

    def undeclared_in_refusal(self, resp: pb.CheckResponse) -> str | None:
        """Why a refusing `resp` could not be carried as it is (a header the router would drop, a header value
        or a status the transport cannot carry), or None: then the client gets a 503 instead, which the
        decision log must record rather than the refusal's own status. The same checks `answer()` makes."""
        try:
            _refusal_lines(resp, self)
            for key in resp.dynamic_metadata.fields:
                self.metadata_key(key)
        except Undeclared as e:
            return (f"the policy's refusal ({resp.denied_response.status.code or 403}) names {e}: declare it in "
                    "policy.result_names (authz_transport: http), or change the policy")
        return None

    def undeclared_in_answer(self, resp: pb.CheckResponse) -> str | None:
        """Authorizer.answer_check: undeclared_in_allow or undeclared_in_refusal, by what `resp` is."""
        if resp.status.code == 0:  # google.rpc OK: allow
            return self.undeclared_in_allow(resp)
        return self.undeclared_in_refusal(resp)

    def refusal_header(self, key: str) -> str:
        """A refusal's header: one the gateway emits, or a declared policy header (OPA-Envoy `headers` go to
        the client on a denial; the router allow-lists both there)."""
        name = _name("client header", key)
        if name in self.upstream:
            return name
        return self.client_header(key)

    def metadata_key(self, key: str) -> str:
        hit = self._passed.get(("m", key))
        if hit is not None:
            return hit
        if key == AUTHZ_BODY_CAPTURE:  # too large for a request header: its own answer header
            return H_AUTHZ_BODY_CAPTURE
        if key not in self.metadata:
            raise Undeclared("metadata key", key, "not in the contract's AUTHZ_HTTP_MD_KEYS and not in "
                                                  "policy.result_names.metadata")
        return self._remember("m", key, authz_md_header(key))


def client_header_allow_list(config: GatewayConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(exact names, prefixes) of every client header an answer may carry under `config`: what the
    router's allowed_client_headers(_on_success) must match, no more and no less."""
    names = AnswerNames.of(config)
    return tuple(sorted(names.client)), names.client_prefixes


def upstream_header_allow_list(config: GatewayConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(exact names, prefixes) of every upstream header an allow may set: allowed_upstream_headers."""
    return tuple(sorted(AnswerNames.of(config).upstream)), (CCR_HEADER_PREFIX,)


def _name(what: str, key: str) -> str:
    name = key.lower()
    if not _TOKEN.match(name) or name in FRAMING_HEADERS:
        raise Undeclared(what, key, "not a header name an answer may carry")
    return name


def _value(name: str, value: str) -> str:
    if _BAD_VALUE.search(value):
        raise Undeclared("header value of", name, "contains CR, LF or NUL")
    return value


_STANDIN_CODES = frozenset(AUTHZ_HTTP_STATUS_STANDINS.values())


def wire_status(code: int) -> int:
    """The status a refusal goes out with: Envoy reads 200 as an allow and a 5xx as a failed call, so
    those travel as stand-ins the listener maps back (AUTHZ_HTTP_STATUS_STANDINS)."""
    standin = AUTHZ_HTTP_STATUS_STANDINS.get(code)
    if standin is not None:
        return standin
    if code >= 500 or code < 100:
        return AUTHZ_HTTP_STATUS_STANDINS[503]
    return code


def _head(status: int, lines: list[str], body_len: int, keep_alive: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Refused"
    out = [f"HTTP/1.1 {status} {reason}", *lines, f"content-length: {body_len}"]
    if not keep_alive:
        out.append("connection: close")
    out.append("\r\n")
    return "\r\n".join(out).encode("utf-8")


def _metadata_lines(resp: pb.CheckResponse, names: AnswerNames, lines: list[str]) -> None:
    # One SerializeToString per Value (walking one serialized Struct in Python measured slower).
    b64 = base64.b64encode
    for key, value in resp.dynamic_metadata.fields.items():
        lines.append(f"{names.metadata_key(key)}: {b64(value.SerializeToString()).decode('ascii')}")


def answer(resp: pb.CheckResponse, names: AnswerNames, keep_alive: bool = True) -> bytes:
    """The HTTP answer for `resp` (head and body); Undeclared when it names what the router would drop."""
    lines: list[str] = []
    if resp.status.code == 0:  # google.rpc OK: allow
        ok = resp.ok_response
        if ok.query_parameters_to_set or ok.query_parameters_to_remove:
            raise Undeclared("query parameter", "*", "query changes are not carried over HTTP")
        # Upstream headers overwrite (allowed_upstream_headers): the last value of a name wins, as
        # OVERWRITE_IF_EXISTS_OR_ADD options applied in order would leave it.
        upstream: dict[str, str] = {}
        for opt in ok.headers:
            name = names.upstream_header(opt.header.key)
            upstream[name] = _value(name, opt.header.value)
        lines += [f"{k}: {v}" for k, v in upstream.items()]
        if ok.headers_to_remove:
            lines.append(f"{H_AUTHZ_HEADERS_TO_REMOVE}: "
                         + ",".join(_name("header to remove", h) for h in ok.headers_to_remove))
        for opt in ok.response_headers_to_add:
            name = names.client_header(opt.header.key)
            lines.append(f"{name}: {_value(name, opt.header.value)}")
        _metadata_lines(resp, names, lines)
        return _head(200, lines, 0, keep_alive)
    code, lines = _refusal_lines(resp, names)
    _metadata_lines(resp, names, lines)
    body = resp.denied_response.body.encode("utf-8")
    return _head(wire_status(code), lines, len(body), keep_alive) + body


def _refusal_lines(resp: pb.CheckResponse, names: AnswerNames) -> tuple[int, list[str]]:
    """A refusal's status and header lines; Undeclared when the transport cannot carry them."""
    denied = resp.denied_response
    code = denied.status.code or 403  # Envoy's own default for a denial without a status
    if code in _STANDIN_CODES:  # the listener would turn it into another status (an OPA-Envoy http_status)
        raise Undeclared("refusal status", str(code), "is one of the transport's stand-in statuses")
    lines = []
    for opt in denied.headers:
        name = names.refusal_header(opt.header.key)
        lines.append(f"{name}: {_value(name, opt.header.value)}")
    return code, lines


def error_answer(status: int, kind: str, message: str, keep_alive: bool = True) -> bytes:
    """The front's own refusal in the Anthropic error shape (ccr/errors.py)."""
    body = error_body(kind, message)
    return _head(wire_status(status), ["content-type: application/json"], len(body), keep_alive) + body


def undeclared_refusal(resp: pb.CheckResponse, names: AnswerNames, message: str, keep_alive: bool = True) -> bytes:
    """The 503 api_error for an answer `answer()` refused, keeping every fact of `resp` the router can
    read: the audit row still gets its principal and decision id, and a spend reservation made in the
    Check (spend_reserved, spend_counters) is still settled by the audit receiver, not leaked."""
    lines = ["content-type: application/json"]
    b64 = base64.b64encode
    for key, value in resp.dynamic_metadata.fields.items():
        if key == AUTHZ_ERROR_TYPE:
            continue
        try:
            header = names.metadata_key(key)
        except Undeclared:
            continue
        lines.append(f"{header}: {b64(value.SerializeToString()).decode('ascii')}")
    error_type = struct_pb2.Value(string_value="api_error").SerializeToString()
    lines.append(f"{names.metadata_key(AUTHZ_ERROR_TYPE)}: {b64(error_type).decode('ascii')}")
    body = error_body("api_error", message)
    return _head(wire_status(503), lines, len(body), keep_alive) + body


def plain_answer(status: int, keep_alive: bool = True) -> bytes:
    """A bodiless answer (health)."""
    return _head(status, [], 0, keep_alive)


def unquoted_peer_certificate(req: pb.CheckRequest) -> str | None:
    """The PEM of source.certificate (for tests and logs; extauth/server.py reads it the same way)."""
    cert = req.attributes.source.certificate
    return urllib.parse.unquote(cert) if cert else None
