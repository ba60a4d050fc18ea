"""OPA-Envoy compatibility: an existing OPA-Envoy policy runs unchanged in a policy set with
`mode: opa-envoy` (extauth/policy_sets.py).

The input is what OPA-Envoy's plugin builds: the CheckRequest in protobuf JSON (protojson's
lowerCamelCase names, as `google.protobuf.json_format.MessageToDict` writes them by default:
`attributes.request.http.headers`, `attributes.source.address.socketAddress`), plus `parsed_path`,
`parsed_query`, `parsed_body`, `truncated_body` and `version`. The request body is given as
`attributes.request.http.body` (text), as Envoy sends it without `pack_as_bytes`.

The result is a boolean, or an object {allowed, headers, response_headers_to_add,
request_headers_to_remove, body, http_status, dynamic_metadata}. Everything here is a pure
function, except the engine (one compiled WASM module).

Like OPA-Envoy, the input carries every request header, credentials included (a policy may
check a token itself); the decision log never writes them unless asked (`redacted`).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from opapywasm import UNDEFINED, OpaWasmPolicy, PolicyConfig

from ccr.contract import (
    AUTHZ_DECISION_ID,
    AUTHZ_SPEND,
    AUTHZ_SPEND_WORST,
    CCR_HEADER_PREFIX,
    H_CLIENT_REQUEST_ID,
    H_REQUEST_ID,
)
from extauth import wasm_calls
from extauth.bundle import Bundle, BundleError
from extauth.lean_json import Ambiguous, loads_one_reading

VERSION = {"ext_authz": "v3", "encoding": "protojson"}
# Headers that carry credentials: in the input (as OPA-Envoy passes them), never in a log line.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie", "x-goog-api-key"})
REDACTED = "[redacted]"
_RESERVED = frozenset({H_REQUEST_ID, H_CLIENT_REQUEST_ID, "host"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")  # an HTTP header name (lower-case), RFC 9110 token


class OpaEnvoyError(Exception):
    """The input cannot be built, or the policy's result cannot be applied: the set fails closed."""


# -- input -----------------------------------------------------------------------


def parsed_path_and_query(path: str) -> tuple[list[str], dict[str, list[str]]]:
    """`parsed_path` (the decoded path split at '/', leading slashes dropped) and `parsed_query`
    (every parameter with all its values, blank ones kept), as OPA-Envoy computes them."""
    parts = urllib.parse.urlsplit(path)
    decoded = urllib.parse.unquote(parts.path)
    query: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, separator="&"):
        query.setdefault(k, []).append(v)
    return decoded.lstrip("/").split("/"), query


def parsed_body(headers: dict[str, str], body: str) -> tuple[Any, bool]:
    """(`parsed_body`, `truncated_body`): a JSON body is parsed when the content type says JSON;
    a body shorter than its Content-Length was cut by Envoy (truncated, not parsed)."""
    if "application/json" not in headers.get("content-type", "") or not body:
        return None, False
    cl = headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise OpaEnvoyError(f"content-length {cl!r} is not a number") from None
        if n > len(body.encode()):
            return None, True
    try:
        return loads_one_reading(body), False
    except orjson.JSONDecodeError as e:
        raise OpaEnvoyError(f"request body is not valid JSON: {e}") from None
    except Ambiguous as e:  # the policy must read what the provider reads (extauth/lean_json.py)
        raise OpaEnvoyError(f"request body refused: {e}") from None


def check_input(req: pb.CheckRequest, body: bytes | memoryview | None = None, with_body: bool = True,
                max_body_bytes: int | None = None) -> dict[str, Any]:
    """The OPA-Envoy input document for one CheckRequest. `body`: the request body when it was split
    off the message (extauth/wire.py); else the message's own body / raw_body is used. Without
    `with_body` the input is what OPA-Envoy sees when Envoy sends no body (no `with_request_body`);
    a body over `max_body_bytes` is cut there and marked truncated (Envoy's allow_partial_message)."""
    doc = MessageToDict(req)  # protojson names, defaults omitted: what OPA-Envoy's protojson.Marshal gives
    http_msg = req.attributes.request.http
    whole = (body if body else (http_msg.raw_body or http_msg.body.encode())) if with_body else b""
    cut = max_body_bytes is not None and len(whole) > max_body_bytes
    raw = bytes(whole[:max_body_bytes] if cut else whole)
    text = raw.decode("utf-8", "replace")
    http = doc.setdefault("attributes", {}).setdefault("request", {}).setdefault("http", {})
    http.pop("rawBody", None)
    http.pop("body", None)
    if text:
        http["body"] = text
    headers = dict(http_msg.headers) if http_msg.headers else {
        h.key.lower(): h.value or h.raw_value.decode("utf-8", "replace") for h in http_msg.header_map.headers}
    if "headers" not in http and headers:
        http["headers"] = headers
    http.pop("headerMap", None)
    path, query = parsed_path_and_query(http_msg.path)
    pb_body, truncated = (None, True) if cut else parsed_body(headers, text)
    doc["parsed_path"] = path
    doc["parsed_query"] = query
    doc["parsed_body"] = pb_body
    doc["truncated_body"] = truncated
    doc["version"] = dict(VERSION)
    return doc


def redacted(doc: dict[str, Any], include_text: bool = False) -> dict[str, Any]:
    """The input as a log may hold it: credential headers replaced, the body left out unless asked."""
    out = dict(doc)
    attrs = dict(out.get("attributes") or {})
    request = dict(attrs.get("request") or {})
    http = dict(request.get("http") or {})
    if isinstance(http.get("headers"), dict):
        http["headers"] = {k: (REDACTED if k.lower() in CREDENTIAL_HEADERS else v) for k, v in http["headers"].items()}
    if not include_text:
        for k in ("body", "rawBody"):
            http.pop(k, None)
        out.pop("parsed_body", None)
    request["http"], attrs["request"], out["attributes"] = http, request, attrs
    return out


# -- result ----------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    allowed: bool
    headers: tuple[tuple[str, str], ...] = ()  # allowed: to the upstream request; denied: to the response
    response_headers_to_add: tuple[tuple[str, str], ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    body: str | None = None
    http_status: int | None = None
    dynamic_metadata: dict[str, Any] | None = None


def _header_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not _TOKEN.match(name.lower()):
        raise OpaEnvoyError(f"{field}: {name!r} is not a header name")
    low = name.lower()
    # The gateway's identity and routing headers are extauth's alone: a policy adding, replacing or
    # removing one could become another principal, provider or rate-limit key; the request id keys
    # the audit row and the decision log; Host would re-route (the route is chosen again after ext_authz).
    if low.startswith(CCR_HEADER_PREFIX) or low in _RESERVED:
        raise OpaEnvoyError(f"{field}: {name} is reserved for the gateway (x-ccr-*, {', '.join(sorted(_RESERVED))}); "
                            "a policy may not set or remove it")
    return low


def _header_pairs(value: Any, field: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise OpaEnvoyError(f"{field} must be an object of header names to values")
    out: list[tuple[str, str]] = []
    for name, v in value.items():
        key = _header_name(name, field)
        for one in (v if isinstance(v, list) else [v]):
            if not isinstance(one, str) or any(c in one for c in "\r\n\0"):
                raise OpaEnvoyError(f"{field}: the value of {name} must be a string without CR, LF or NUL")
            out.append((key, one))
    return tuple(out)


def result_of(value: Any) -> Result:
    """The policy's answer as OPA-Envoy reads it; anything else is an error (fail closed)."""
    if value is UNDEFINED or value is None:
        raise OpaEnvoyError("the decision is undefined (give the rule a default, e.g. `default allow := false`)")
    if isinstance(value, bool):
        return Result(value)
    if not isinstance(value, dict):
        raise OpaEnvoyError(f"the decision must be a boolean or an object, not {type(value).__name__}")
    allowed = value.get("allowed")
    if not isinstance(allowed, bool):
        raise OpaEnvoyError("the decision object needs a boolean `allowed`")
    remove = value.get("request_headers_to_remove")
    if remove is not None and (not isinstance(remove, list)):
        raise OpaEnvoyError("request_headers_to_remove must be a list of header names")
    body = value.get("body")
    if body is not None and not isinstance(body, str):
        raise OpaEnvoyError("body must be a string")
    status = value.get("http_status")
    if status is not None:
        if isinstance(status, float) and status.is_integer():
            status = int(status)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise OpaEnvoyError(f"http_status must be an HTTP status code, not {status!r}")
    meta = value.get("dynamic_metadata")
    if meta is not None and not isinstance(meta, dict):
        raise OpaEnvoyError("dynamic_metadata must be an object")
    return Result(
        allowed,
        _header_pairs(value.get("headers"), "headers"),
        _header_pairs(value.get("response_headers_to_add"), "response_headers_to_add"),
        tuple(_header_name(h, "request_headers_to_remove") for h in (remove or ())),
        body, status, meta,
    )


def deny_status(result: Result) -> int:
    """The HTTP status of a denial: the policy's (a 4xx or 5xx), else 403."""
    s = result.http_status or 403
    if not 400 <= s <= 599:
        raise OpaEnvoyError(f"http_status {s} does not deny a request (use 400-599)")
    return s


def apply_allowed(resp: pb.CheckResponse, result: Result) -> None:
    """Add an allowing result's headers and metadata to an OK response (in place). The gateway's own
    metadata (principal, model, cluster, rate limits, decision id) is never replaced."""
    ok = resp.ok_response
    for k, v in result.headers:
        ok.headers.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    for k, v in result.response_headers_to_add:
        ok.response_headers_to_add.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD))
    ok.headers_to_remove.extend(result.request_headers_to_remove)
    if result.dynamic_metadata:
        # Also the keys set per request after this (decision id; the spend reservation: a policy must
        # not name what a budget reserves or whom it charges).
        taken = set(resp.dynamic_metadata.fields) | {AUTHZ_DECISION_ID, AUTHZ_SPEND, AUTHZ_SPEND_WORST}
        if clash := sorted(taken & result.dynamic_metadata.keys()):
            raise OpaEnvoyError(f"dynamic_metadata may not replace the gateway's keys {clash}")
        extra = struct_pb2.Struct()
        extra.update(result.dynamic_metadata)
        resp.dynamic_metadata.MergeFrom(extra)


def response_headers(result: Result) -> list[base_pb2.HeaderValueOption]:
    """A denying result's `headers`, for the denied response."""
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                       append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
            for k, v in result.headers if k != "content-type"]


# -- engine ----------------------------------------------------------------------


class OpaEnvoyEngine:
    """One OPA-Envoy bundle's compiled policy; BundleLoader builds and swaps it like a PolicyEngine."""

    pii = None  # no host-side scan: the policy sees the body itself

    def __init__(self, bundle: Bundle, entrypoint: str) -> None:
        self.bundle, self.entrypoint = bundle, entrypoint
        self._policy = OpaWasmPolicy.from_wasm_bytes(bundle.wasm, PolicyConfig(pool_size=2))
        wasm_calls.install(self._policy)
        if entrypoint not in self._policy.entrypoints:
            known = sorted(self._policy.entrypoints)
            self._policy.close()
            raise BundleError(f"{bundle.path}: entrypoint {entrypoint!r} not in bundle (has {known}); "
                              f"rebuild with `opa build -t wasm -e {entrypoint}`")
        self._policy.set_data(bundle.data)

    @property
    def host_builtins(self) -> dict[str, int]:
        return self._policy.builtins

    def evaluate(self, doc: dict[str, Any]) -> Any:
        return self._policy.evaluate(doc, self.entrypoint)

    def close(self) -> None:
        self._policy.close()
