"""OPA-Envoy compatibility, the pure parts: the input built from a CheckRequest, the result read
from a policy's answer, and what the gateway refuses to let a policy do."""

from __future__ import annotations

import orjson
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2, status_pb2
from opapywasm import UNDEFINED

from extauth.opa_envoy import (
    REDACTED,
    OpaEnvoyError,
    Result,
    apply_allowed,
    check_input,
    deny_status,
    parsed_body,
    parsed_path_and_query,
    redacted,
    response_headers,
    result_of,
)


def check(method: str = "GET", path: str = "/v1/models", headers: dict[str, str] | None = None,
          body: bytes = b"") -> pb.CheckRequest:
    return pb.CheckRequest(attributes=ac.AttributeContext(
        source=ac.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.1.2.3", port_value=4242)),
            principal="spiffe://example.org/ns/batch/sa/job"),
        request=ac.AttributeContext.Request(http=ac.AttributeContext.HttpRequest(
            id="7", method=method, path=path, host="gw.local", protocol="HTTP/1.1",
            headers=headers or {}, raw_body=body))))


def test_parsed_path_and_query_as_opa_envoy_computes_them() -> None:
    assert parsed_path_and_query("/v1/messages") == (["v1", "messages"], {})
    assert parsed_path_and_query("/") == ([""], {})
    # The path is decoded before it is split (Go's url.URL.Path), so %2F splits too.
    assert parsed_path_and_query("/a//b%2Fc/d%20e?x=1&x=2&y=&z") == (
        ["a", "", "b", "c", "d e"], {"x": ["1", "2"], "y": [""], "z": [""]})
    assert parsed_path_and_query("//host/b") == (["b"], {})  # a network-path reference, as Go parses it
    assert parsed_path_and_query("/v1/models?limit=5&after_id=m%201") == (
        ["v1", "models"], {"limit": ["5"], "after_id": ["m 1"]})


def test_parsed_body_only_for_json_and_truncated_when_short() -> None:
    js = {"content-type": "application/json"}
    assert parsed_body(js, '{"a": [1, 2]}') == ({"a": [1, 2]}, False)
    assert parsed_body({"content-type": "text/plain"}, '{"a": 1}') == (None, False)
    assert parsed_body(js, "") == (None, False)
    # Envoy sent fewer bytes than the request has: OPA-Envoy marks it truncated and parses nothing.
    assert parsed_body({**js, "content-length": "100"}, '{"a": 1}') == (None, True)
    assert parsed_body({**js, "content-length": "8"}, '{"a": 1}') == ({"a": 1}, False)
    with pytest.raises(OpaEnvoyError, match="not valid JSON"):
        parsed_body(js, "{nope")


def test_input_is_the_check_request_in_protojson_names() -> None:
    body = b'{"model": "claude-haiku-4-5", "max_tokens": 8}'
    req = check("POST", "/v1/messages?beta=true",
                {"content-type": "application/json", "authorization": "Bearer sk-secret", "x-team": "red"}, body)
    doc = check_input(req)
    http = doc["attributes"]["request"]["http"]
    assert http["method"] == "POST" and http["path"] == "/v1/messages?beta=true" and http["host"] == "gw.local"
    # OPA-Envoy passes every header, credentials included (the decision log redacts them).
    assert http["headers"] == {"content-type": "application/json", "authorization": "Bearer sk-secret",
                               "x-team": "red"}
    assert http["body"] == body.decode() and "rawBody" not in http
    # protojson's lowerCamelCase names, as OPA-Envoy's input has them.
    assert doc["attributes"]["source"]["address"]["socketAddress"] == {"address": "10.1.2.3", "portValue": 4242}
    assert doc["attributes"]["source"]["principal"] == "spiffe://example.org/ns/batch/sa/job"
    assert doc["parsed_path"] == ["v1", "messages"] and doc["parsed_query"] == {"beta": ["true"]}
    assert doc["parsed_body"] == {"model": "claude-haiku-4-5", "max_tokens": 8}
    assert doc["truncated_body"] is False
    assert doc["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    # The same names MessageToDict gives the message (what the policy would see from OPA-Envoy).
    assert MessageToDict(req)["attributes"]["request"]["http"]["headers"] == http["headers"]


def test_input_takes_a_body_split_off_the_message() -> None:
    req = check("POST", "/v1/messages", {"content-type": "application/json"})
    doc = check_input(req, memoryview(b'{"model": "m"}'))
    assert doc["parsed_body"] == {"model": "m"}
    assert doc["attributes"]["request"]["http"]["body"] == '{"model": "m"}'


def test_redacted_input_has_no_credentials_and_no_text() -> None:
    req = check("POST", "/v1/messages", {"content-type": "application/json", "x-api-key": "ccr_secret",
                                         "Authorization": "Bearer tok", "cookie": "s=1", "x-team": "red"},
                b'{"model": "m", "messages": [{"role": "user", "content": "my SSN"}]}')
    doc = check_input(req)
    out = redacted(doc)
    dump = orjson.dumps(out).decode()
    for secret in ("ccr_secret", "Bearer tok", "s=1", "my SSN"):
        assert secret not in dump
    assert out["attributes"]["request"]["http"]["headers"]["x-team"] == "red"
    assert out["attributes"]["request"]["http"]["headers"]["x-api-key"] == REDACTED
    assert "parsed_body" not in out and "body" not in out["attributes"]["request"]["http"]
    # The input the policy saw is not changed by redacting a copy.
    assert doc["attributes"]["request"]["http"]["headers"]["x-api-key"] == "ccr_secret"
    assert redacted(doc, include_text=True)["parsed_body"]["messages"][0]["content"] == "my SSN"


def test_result_boolean_and_object() -> None:
    assert result_of(True) == Result(True)
    assert result_of(False) == Result(False)
    r = result_of({"allowed": False, "http_status": 429, "body": "slow down",
                   "headers": {"X-Reason": "quota", "retry-after": ["1", "2"]},
                   "response_headers_to_add": {"x-policy": "v1"}, "request_headers_to_remove": ["X-Debug"],
                   "dynamic_metadata": {"team": "red"}})
    assert r.allowed is False and r.http_status == 429 and r.body == "slow down"
    assert r.headers == (("x-reason", "quota"), ("retry-after", "1"), ("retry-after", "2"))
    assert r.response_headers_to_add == (("x-policy", "v1"),)
    assert r.request_headers_to_remove == ("x-debug",)
    assert r.dynamic_metadata == {"team": "red"}
    assert deny_status(r) == 429 and deny_status(Result(False)) == 403
    assert [h.header.key for h in response_headers(r)] == ["x-reason", "retry-after", "retry-after"]


@pytest.mark.parametrize("value, why", [
    (UNDEFINED, "undefined"),
    (None, "undefined"),
    ("yes", "boolean or an object"),
    ({"headers": {}}, "boolean `allowed`"),
    ({"allowed": "true"}, "boolean `allowed`"),
    ({"allowed": True, "http_status": "200"}, "http_status"),
    ({"allowed": True, "http_status": 1000}, "http_status"),
    ({"allowed": True, "headers": ["x-a"]}, "headers must be an object"),
    ({"allowed": True, "headers": {"bad name": "v"}}, "not a header name"),
    ({"allowed": True, "headers": {"x-a": "v\r\nx-ccr-principal-id: admin"}}, "without CR, LF"),
    ({"allowed": True, "headers": {"x-a": 1}}, "must be a string"),
    ({"allowed": True, "body": {"a": 1}}, "body must be a string"),
    ({"allowed": True, "dynamic_metadata": [1]}, "dynamic_metadata"),
    ({"allowed": True, "request_headers_to_remove": "x-a"}, "list of header names"),
])
def test_results_the_gateway_does_not_understand_are_errors(value, why: str) -> None:
    with pytest.raises(OpaEnvoyError, match=why):
        result_of(value)


@pytest.mark.parametrize("field", ["headers", "response_headers_to_add", "request_headers_to_remove"])
@pytest.mark.parametrize("name", ["x-ccr-principal-id", "X-CCR-Cluster", "x-ccr-anything", "x-request-id",
                                  "X-Client-Request-Id", "host"])
def test_a_policy_may_never_touch_the_gateways_identity_headers(field: str, name: str) -> None:
    value = [name] if field == "request_headers_to_remove" else {name: "admin"}
    with pytest.raises(OpaEnvoyError, match="reserved for the gateway"):
        result_of({"allowed": True, field: value})


def test_a_denial_status_must_deny() -> None:
    with pytest.raises(OpaEnvoyError, match="does not deny"):
        deny_status(result_of({"allowed": False, "http_status": 200}))


def ok_response() -> pb.CheckResponse:
    meta = struct_pb2.Struct()
    meta.update({"principal_id": "key_1", "cluster": "anthropic", "decision_id": "dec_1"})
    return pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=pb.OkHttpResponse(
        headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-ccr-principal-id", value="key_1"))]),
        dynamic_metadata=meta)


def test_apply_allowed_adds_headers_and_metadata() -> None:
    resp = ok_response()
    apply_allowed(resp, result_of({"allowed": True, "headers": {"x-team": "red"},
                                   "response_headers_to_add": {"x-policy": "v1"},
                                   "request_headers_to_remove": ["x-debug"], "dynamic_metadata": {"team": "red"}}))
    assert [(h.header.key, h.header.value) for h in resp.ok_response.headers] == [
        ("x-ccr-principal-id", "key_1"), ("x-team", "red")]
    assert [(h.header.key, h.header.value) for h in resp.ok_response.response_headers_to_add] == [("x-policy", "v1")]
    assert list(resp.ok_response.headers_to_remove) == ["x-debug"]
    assert resp.dynamic_metadata["team"] == "red" and resp.dynamic_metadata["principal_id"] == "key_1"


@pytest.mark.parametrize("key", ["principal_id", "cluster", "decision_id", "spend", "spend_worst"])
def test_apply_allowed_never_replaces_the_gateways_metadata(key: str) -> None:
    resp = ok_response()
    with pytest.raises(OpaEnvoyError, match="gateway's keys"):
        apply_allowed(resp, result_of({"allowed": True, "dynamic_metadata": {key: "other"}}))
    assert resp.dynamic_metadata["principal_id"] == "key_1"


def test_input_without_the_body_is_what_opa_envoy_sees_without_with_request_body() -> None:
    req = check("POST", "/v1/messages", {"content-type": "application/json", "content-length": "14"},
                b'{"model": "m"}')
    doc = check_input(req, with_body=False)
    assert "body" not in doc["attributes"]["request"]["http"] and "rawBody" not in doc["attributes"]["request"]["http"]
    assert (doc["parsed_body"], doc["truncated_body"]) == (None, False)
    assert check_input(req)["parsed_body"] == {"model": "m"}


def test_a_body_over_the_bound_is_cut_and_marked_truncated() -> None:
    body = b'{"model": "m", "pad": "' + b"x" * 100 + b'"}'
    req = check("POST", "/v1/messages", {"content-type": "application/json"}, body)  # no content-length
    doc = check_input(req, max_body_bytes=32)
    assert doc["attributes"]["request"]["http"]["body"] == body[:32].decode()
    assert (doc["parsed_body"], doc["truncated_body"]) == (None, True)
    doc = check_input(req, max_body_bytes=len(body))
    assert (doc["parsed_body"]["model"], doc["truncated_body"]) == ("m", False)
