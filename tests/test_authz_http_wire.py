"""extauth/http_wire.py: an HTTP check request rebuilt into the gRPC CheckRequest, and a CheckResponse
translated into the HTTP answer Envoy's http_service reads (every branch, refusals included)."""

from __future__ import annotations

import base64
import dataclasses
import json

import httptools
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from ccr.config import parse_config
from ccr.contract import (
    AUTHZ_BODY_CAPTURE,
    AUTHZ_HTTP_STATUS_STANDINS,
    H_AUTHZ_BODY_CAPTURE,
    H_AUTHZ_CONTENT_LENGTH,
    H_AUTHZ_HEADERS_TO_REMOVE,
    H_AUTHZ_PEER_ADDRESS,
    H_AUTHZ_PEER_CERT,
    H_AUTHZ_PEER_URI,
    H_AUTHZ_PROTOCOL,
    authz_md_header,
)
from extauth import models_api
from extauth.deny import denied
from extauth.http_wire import (
    FULL,
    IDENTITY,
    AnswerNames,
    Undeclared,
    answer,
    check_request,
    client_header_allow_list,
    error_answer,
    split_target,
    undeclared_refusal,
    upstream_header_allow_list,
    wire_status,
)


def _config(**result_names: list[str]):
    return parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                         "models": [{"match": "claude-*", "provider": "anthropic"}],
                         "services": {"authz_transport": "http"},
                         "policy": {"result_names": result_names}})


NAMES = AnswerNames.of(_config())


class _Parsed:
    def __init__(self, raw: bytes) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False
        self.keep_alive = False
        self.parser = p = httptools.HttpResponseParser(self)
        p.feed_data(raw)
        self.status = p.get_status_code()

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def _md(parsed: _Parsed) -> dict[str, object]:
    out = {}
    for k, v in parsed.headers:
        if k.startswith("x-ccr-md-"):
            value = struct_pb2.Value.FromString(base64.b64decode(v))
            out[k] = json_format.MessageToDict(value)
    return out


# -- the request --------------------------------------------------------------------------------


def test_split_target_knows_only_the_two_prefixes_followed_by_a_path() -> None:
    assert split_target("/ccr-authz/full/v1/messages?beta=true") == (FULL, "/v1/messages?beta=true")
    assert split_target("/ccr-authz/identity/v1/messages") == (IDENTITY, "/v1/messages")
    assert split_target("/ccr-authz/fullv1/messages") is None
    assert split_target("/ccr-authz/full") is None
    assert split_target("/v1/messages") is None
    assert split_target("/ccr-authz/health") is None


ENVOY_HEADERS = [
    ("host", "gw.example:8443"), ("content-length", "13"), ("x-api-key", "k"), ("x-dup", "1"),
    ("x-forwarded-proto", "https"), ("x-request-id", "rid-1"), ("x-dup", "2"),
    ("x-envoy-auth-partial-body", "false"), (H_AUTHZ_PEER_ADDRESS, "10.1.2.3"),
    (H_AUTHZ_PEER_URI, "spiffe://ccr.local/agent"), (H_AUTHZ_PEER_CERT, "-----BEGIN%20CERTIFICATE-----%0AAB%2B"),
    ("x-envoy-internal", "true"), ("x-envoy-expected-rq-timeout-ms", "5000"),
]


def test_a_full_check_is_rebuilt_as_the_grpc_check_request() -> None:
    req = check_request("POST", "/v1/messages?beta=true", ENVOY_HEADERS, 13, FULL)
    http = req.attributes.request.http
    assert dict(http.headers) == {
        ":authority": "gw.example:8443", ":method": "POST", ":path": "/v1/messages?beta=true", ":scheme": "https",
        "content-length": "13", "x-api-key": "k", "x-dup": "1,2", "x-forwarded-proto": "https",
        "x-request-id": "rid-1", "x-envoy-auth-partial-body": "false"}
    assert (http.id, http.method, http.path, http.host, http.scheme, http.size) == (
        "rid-1", "POST", "/v1/messages?beta=true", "gw.example:8443", "https", 13)
    src = req.attributes.source
    assert src.address.socket_address.address == "10.1.2.3"
    assert src.address.socket_address.port_value == 0
    assert src.principal == "spiffe://ccr.local/agent"
    assert src.certificate == "-----BEGIN%20CERTIFICATE-----%0AAB%2B"  # URL-encoded, as gRPC sends it
    assert req.attributes.request.time.seconds > 0
    assert not http.raw_body and not http.body  # the body goes to Authorizer.check on its own


def test_an_identity_check_drops_envoys_content_length_and_size() -> None:
    headers = [("host", "h"), ("content-length", "0"), ("x-api-key", "k")]
    http = check_request("POST", "/v1/messages", headers, 0, IDENTITY).attributes.request.http
    assert "content-length" not in http.headers
    assert http.size == 0


def test_the_clients_own_content_length_and_protocol_when_the_router_sends_them() -> None:
    headers = [("host", "h"), ("content-length", "0"), (H_AUTHZ_CONTENT_LENGTH, "20971520"),
               (H_AUTHZ_PROTOCOL, "HTTP/2")]
    http = check_request("POST", "/v1/messages", headers, 0, IDENTITY).attributes.request.http
    assert http.headers["content-length"] == "20971520"
    assert http.protocol == "HTTP/2"
    assert not any(k.startswith("x-ccr-authz-") for k in http.headers)
    # With the protocol but no client length, the client sent none (chunked): Envoy's is not reported.
    headers = [("host", "h"), ("content-length", "13"), (H_AUTHZ_PROTOCOL, "HTTP/1.1")]
    http = check_request("POST", "/v1/messages", headers, 13, FULL).attributes.request.http
    assert "content-length" not in http.headers
    # Without either (a router that sends neither), the buffered length stands in for a full check.
    headers = [("host", "h"), ("content-length", "13")]
    http = check_request("POST", "/v1/messages", headers, 13, FULL).attributes.request.http
    assert http.headers["content-length"] == "13"


@pytest.mark.parametrize(("peer", "address", "port"), [
    ("192.0.2.1", "192.0.2.1", 0), ("192.0.2.1:4431", "192.0.2.1", 4431), ("2001:db8::1", "2001:db8::1", 0),
    ("[2001:db8::1]:9", "2001:db8::1", 9)])
def test_peer_address_with_or_without_port(peer: str, address: str, port: int) -> None:
    sock = check_request("GET", "/v1/models", [(H_AUTHZ_PEER_ADDRESS, peer)], 0).attributes.source.address
    assert (sock.socket_address.address, sock.socket_address.port_value) == (address, port)


def test_without_a_client_certificate_there_is_no_principal_or_certificate() -> None:
    src = check_request("GET", "/v1/models", [("host", "h"), (H_AUTHZ_PEER_ADDRESS, "10.0.0.1")], 0).attributes.source
    assert src.principal == "" and src.certificate == ""


# -- the answer ---------------------------------------------------------------------------------


def _opt(k: str, v: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))


def _ok(**kw) -> pb.CheckResponse:
    resp = pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=pb.OkHttpResponse(**kw))
    return resp


def test_an_allow_carries_headers_removals_client_headers_and_typed_metadata() -> None:
    resp = _ok(headers=[_opt("x-ccr-cluster", "a"), _opt("X-CCR-Model", "m"), _opt("x-ccr-cluster", "b")],
               headers_to_remove=["x-api-key", "authorization"],
               response_headers_to_add=[_opt("x-ratelimit-limit", "10"),
                                        _opt("anthropic-ratelimit-requests-limit", "9"),
                                        _opt("ccr-budget-warning", "soon")])
    resp.dynamic_metadata.update({"principal": "alice", "rpm": {"requests_per_unit": 60, "unit": "MINUTE"},
                                  "spend_worst": 1.5, "groups": ["a", "b"]})
    p = _Parsed(answer(resp, NAMES))
    assert p.complete and p.status == 200 and p.body == b"" and p.keep_alive
    assert p.get("x-ccr-cluster") == ["b"]  # overwrite: the last value wins
    assert p.get("x-ccr-model") == ["m"]
    assert p.get(H_AUTHZ_HEADERS_TO_REMOVE) == ["x-api-key,authorization"]
    assert p.get("x-ratelimit-limit") == ["10"]
    assert p.get("anthropic-ratelimit-requests-limit") == ["9"]
    assert p.get("ccr-budget-warning") == ["soon"]
    assert _md(p) == {authz_md_header("principal"): "alice",
                      authz_md_header("rpm"): {"requests_per_unit": 60.0, "unit": "MINUTE"},
                      authz_md_header("spend_worst"): 1.5, authz_md_header("groups"): ["a", "b"]}
    assert p.get("content-length") == ["0"]


def test_a_refusal_carries_its_status_headers_body_and_metadata() -> None:
    resp = denied(403, "permission_error", "no", [_opt("x-ratelimit-remaining", "0")])
    resp.dynamic_metadata.update({"error_type": "permission_error", "principal": "bob"})
    p = _Parsed(answer(resp, NAMES, keep_alive=False))
    assert p.status == 403 and not p.keep_alive
    assert json.loads(p.body) == {"type": "error", "error": {"type": "permission_error", "message": "no"}}
    assert p.get("content-type") == ["application/json"]
    assert p.get("x-ratelimit-remaining") == ["0"]
    assert _md(p) == {authz_md_header("error_type"): "permission_error", authz_md_header("principal"): "bob"}


def test_extauths_own_answer_and_5xx_refusals_travel_as_stand_ins() -> None:
    p = _Parsed(answer(models_api.Answer({"data": [], "has_more": False}).response(), NAMES))
    assert p.status == AUTHZ_HTTP_STATUS_STANDINS[200]
    assert json.loads(p.body) == {"data": [], "has_more": False}
    p = _Parsed(answer(denied(503, "api_error", "down"), NAMES))
    assert p.status == AUTHZ_HTTP_STATUS_STANDINS[503]
    assert wire_status(501) == AUTHZ_HTTP_STATUS_STANDINS[503]
    assert wire_status(429) == 429 and wire_status(413) == 413
    # A denial without a status is Envoy's default 403.
    assert _Parsed(answer(pb.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED)),
                          NAMES)).status == 403


def test_the_fronts_own_error_is_in_the_anthropic_shape() -> None:
    p = _Parsed(error_answer(413, "request_too_large", "too big", keep_alive=False))
    assert p.status == 413 and not p.keep_alive
    assert json.loads(p.body) == {"type": "error", "error": {"type": "request_too_large", "message": "too big"}}


@pytest.mark.parametrize(("resp", "what", "name"), [
    (_ok(headers=[_opt("x-team", "a")]), "upstream header", "x-team"),
    (_ok(headers=[_opt("x-ccr-md-principal", "forged")]), "upstream header", "x-ccr-md-principal"),
    (_ok(headers=[_opt("x-ccr-authz-peer-uri", "forged")]), "upstream header", "x-ccr-authz-peer-uri"),
    (_ok(headers=[_opt("content-length", "5")]), "upstream header", "content-length"),
    (_ok(response_headers_to_add=[_opt("x-policy-note", "hi")]), "client header", "x-policy-note"),
    (denied(403, "permission_error", "no", [_opt("x-policy-note", "hi")]), "client header", "x-policy-note"),
    (_ok(headers=[_opt("x-ccr-model", "a\r\nx-evil: 1")]), "header value of", "x-ccr-model"),
    (_ok(headers=[_opt("bad name", "a")]), "upstream header", "bad name"),
    (_ok(query_parameters_to_remove=["q"]), "query parameter", "*"),
])
def test_names_the_router_would_drop_are_refused(resp: pb.CheckResponse, what: str, name: str) -> None:
    with pytest.raises(Undeclared) as e:
        answer(resp, NAMES)
    assert (e.value.what, e.value.name) == (what, name)


@pytest.mark.parametrize("resp", [_ok(), denied(401, "authentication_error", "who")])
def test_an_undeclared_metadata_key_is_refused_on_allows_and_refusals(resp: pb.CheckResponse) -> None:
    resp.dynamic_metadata.update({"team_tag": "x"})
    with pytest.raises(Undeclared) as e:
        answer(resp, NAMES)
    assert (e.value.what, e.value.name) == ("metadata key", "team_tag")


def test_names_declared_in_the_config_pass() -> None:
    names = AnswerNames.of(_config(headers=["x-team"], response_headers=["x-policy-note"], metadata=["team_tag"]))
    resp = _ok(headers=[_opt("x-team", "a")], response_headers_to_add=[_opt("x-policy-note", "hi")])
    resp.dynamic_metadata.update({"team_tag": "x"})
    p = _Parsed(answer(resp, names))
    assert p.get("x-team") == ["a"] and p.get("x-policy-note") == ["hi"]
    assert _md(p) == {"x-ccr-md-team-tag": "x"}
    # A framing header stays refused even if one got declared (the config refuses to: test_config).
    framing = dataclasses.replace(names, client=names.client | {"connection"})
    with pytest.raises(Undeclared):
        answer(_ok(response_headers_to_add=[_opt("connection", "close")]), framing)


def test_the_allow_lists_exported_for_the_router() -> None:
    names, prefixes = client_header_allow_list(_config(response_headers=["x-policy-note"]))
    assert set(names) == {"content-type", "retry-after", "x-envoy-ratelimited", "ccr-budget-warning", "ccr-budget",
                          "ccr-budget-reset", "x-policy-note"}
    assert prefixes == ("x-ratelimit-", "anthropic-ratelimit-")
    assert upstream_header_allow_list(_config(headers=["x-team"])) == (("x-team",), ("x-ccr-",))


def test_a_refusal_may_carry_a_declared_policy_header_to_the_client() -> None:
    """OPA-Envoy `headers` go to the client on a denial: declared under result_names.headers they pass there,
    and only there (an allow's client headers are result_names.response_headers)."""
    names = AnswerNames.of(_config(headers=["x-ext-auth-allow"]))
    p = _Parsed(answer(denied(429, "rate_limit_error", "no", [_opt("x-ext-auth-allow", "no")]), names))
    assert p.status == 429 and p.get("x-ext-auth-allow") == ["no"]
    with pytest.raises(Undeclared):
        answer(denied(429, "rate_limit_error", "no", [_opt("x-ext-auth-allow", "no")]), NAMES)
    with pytest.raises(Undeclared):
        answer(_ok(response_headers_to_add=[_opt("x-ext-auth-allow", "yes")]), names)


def test_the_body_capture_travels_in_its_own_header() -> None:
    """Too large for a request header (the headers ext_authz adds count against the listener's limit): outside
    x-ccr-*, for Envoy's dynamic_metadata_from_headers, never copied onto the request."""
    resp = _ok()
    resp.dynamic_metadata.update({AUTHZ_BODY_CAPTURE: {"request": "eA==", "request_bytes": 1, "retention_days": 7}})
    p = _Parsed(answer(resp, NAMES))
    [sent] = p.get(H_AUTHZ_BODY_CAPTURE)
    assert json_format.MessageToDict(struct_pb2.Value.FromString(base64.b64decode(sent))) == {
        "request": "eA==", "request_bytes": 1, "retention_days": 7}
    assert not any(k.startswith("x-ccr-") for k, _ in p.headers)


def test_a_refused_answer_keeps_its_declared_facts() -> None:
    """The audit row keeps the principal and decision, and a spend reservation is still settled."""
    resp = _ok(response_headers_to_add=[_opt("x-policy-note", "hi")])
    resp.dynamic_metadata.update({"principal": "alice", "decision_id": "dec_1", "spend_reserved": 1200,
                                  "spend_counters": ["c1"], "team_tag": "undeclared"})
    with pytest.raises(Undeclared):
        answer(resp, NAMES)
    p = _Parsed(undeclared_refusal(resp, NAMES, "internal"))
    assert p.status == AUTHZ_HTTP_STATUS_STANDINS[503]
    assert json.loads(p.body) == {"type": "error", "error": {"type": "api_error", "message": "internal"}}
    assert _md(p) == {"x-ccr-md-principal": "alice", "x-ccr-md-decision-id": "dec_1",
                      "x-ccr-md-spend-reserved": 1200.0, "x-ccr-md-spend-counters": ["c1"],
                      "x-ccr-md-error-type": "api_error"}
    assert p.get("x-policy-note") == []


@pytest.mark.parametrize("status", sorted(set(AUTHZ_HTTP_STATUS_STANDINS.values())))
def test_a_refusal_with_a_stand_in_status_of_its_own_is_refused(status: int) -> None:
    """An OPA-Envoy policy may deny with any 4xx/5xx: one equal to a stand-in would reach the client as
    another status (the listener maps it), so the answer is refused (503) rather than misread."""
    with pytest.raises(Undeclared) as e:
        answer(denied(status, "permission_error", "no"), NAMES)
    assert (e.value.what, e.value.name) == ("refusal status", str(status))


@pytest.mark.parametrize(("resp", "why"), [
    (denied(429, "rate_limit_error", "slow", [_opt("x-policy-note", "no")]), "client header 'x-policy-note'"),
    (denied(403, "permission_error", "no", [_opt("retry-after", "1\r\nx-evil: 1")]), "header value of 'retry-after'"),
    (denied(AUTHZ_HTTP_STATUS_STANDINS[503], "api_error", "no"), "refusal status"),
])
def test_the_answer_check_names_what_a_refusal_cannot_carry(resp: pb.CheckResponse, why: str) -> None:
    """Authorizer.answer_check asks before it records a refusal: every refusal answer() would refuse is named
    (so the decision log records the 503 the client gets), and one it carries passes."""
    with pytest.raises(Undeclared):
        answer(resp, NAMES)
    said = NAMES.undeclared_in_answer(resp)
    assert said is not None and why in said and "policy.result_names" in said
    carried = denied(429, "rate_limit_error", "slow", [_opt("retry-after", "1")])
    assert NAMES.undeclared_in_answer(carried) is None
    answer(carried, NAMES)
