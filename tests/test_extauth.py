"""extauth: API key lifecycle in PostgreSQL and the ext_authz Check service over real gRPC."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import psycopg
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.protobuf import json_format
from google.rpc import code_pb2

from ccr.config import parse_config
from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.endpoints import ENDPOINTS, Endpoint, Kind
from extauth.keys import KeyStore, create_key, hash_key, list_keys, revoke_key
from extauth.policy import PolicyEngine
from extauth.server import Authorizer
from tests.harness import copy_policy_modules, running_service

REPO = Path(__file__).resolve().parent.parent

GATEWAY_YAML = """
version: 1
providers:
  - name: backup
  - name: anthropic
models:
  - match: claude-opus-4-1
    provider: backup
  - match: claude-*
    provider: anthropic
limits:
  requests_per_minute: 77
"""

# The same gateway with a provider in each residency region (policies/residency.rego binds requests
# to "eu" or "us"): a bound request is routed only to a target in its region (docs/routing.md).
REGIONAL_GATEWAY_YAML = """
version: 1
providers:
  - name: backup
  - name: anthropic
    region: eu
  - name: anthropic-us
    region: us
models:
  - match: claude-opus-4-1
    provider: backup
  - match: claude-*
    targets: [anthropic, anthropic-us]
limits:
  requests_per_minute: 77
"""


# -- key lifecycle -------------------------------------------------------------


def test_create_list_revoke(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "lifecycle", groups=["haiku-only", "default"], rpm=30)
    assert key.startswith("ccr_") and len(key) == 4 + 43
    assert rec.id.startswith("key_") and len(rec.id) == 16
    assert rec.groups == ("haiku-only", "default") and rec.rpm == 30 and rec.active
    assert key.startswith(rec.key_prefix) and len(rec.key_prefix) == 12

    rec2, key2 = create_key(postgres_dsn, "defaults")
    assert rec2.groups == ("default",) and rec2.rpm is None and key2 != key

    ids = [r.id for r in list_keys(postgres_dsn)]
    assert rec.id in ids and rec2.id in ids

    assert revoke_key(postgres_dsn, rec.id) is True
    assert revoke_key(postgres_dsn, rec.id) is False  # already revoked
    assert revoke_key(postgres_dsn, "key_doesnotexist") is False
    assert rec.id not in [r.id for r in list_keys(postgres_dsn)]
    revoked = [r for r in list_keys(postgres_dsn, include_revoked=True) if r.id == rec.id]
    assert len(revoked) == 1 and revoked[0].revoked_at is not None and not revoked[0].active


def test_only_the_hash_is_stored(postgres_dsn: str) -> None:
    rec, key = create_key(postgres_dsn, "hash-only")
    secret_part = key[len(rec.key_prefix):]
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
        stored_hash = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (rec.id,)).fetchone()[0]
    assert bytes(stored_hash) == hash_key(key)
    dump = repr(rows)
    assert key not in dump and secret_part not in dump
    for row in rows:  # also not as raw bytes in any column
        for col in row:
            if isinstance(col, (bytes, memoryview)):
                assert key.encode() not in bytes(col)


def test_create_key_rejects_bad_input(postgres_dsn: str) -> None:
    with pytest.raises(ValueError, match="rpm"):
        create_key(postgres_dsn, "x", rpm=0)
    with pytest.raises(ValueError, match="name"):
        create_key(postgres_dsn, "  ")


# -- the service over gRPC -----------------------------------------------------


def http_check(
    headers: dict[str, str], method: str = "POST", path: str = "/v1/messages", body: bytes = b""
) -> pb.CheckRequest:
    return pb.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=method, path=path, host="gw.local", headers=headers, raw_body=body
                )
            )
        )
    )


def msg_body(model: object = "claude-sonnet-4-5") -> bytes:
    return orjson.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})


def ok_headers(resp: pb.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def denied_error(resp: pb.CheckResponse) -> tuple[int, dict]:
    d = resp.denied_response
    assert {h.header.key: h.header.value for h in d.headers}["content-type"] == "application/json"
    body = json.loads(d.body)
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return d.status.code, body["error"]


@pytest.fixture(scope="module")
def service(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = tmp_path_factory.mktemp("extauth")
    bundle = build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
    with running_service("extauth", run, GATEWAY_YAML, postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as child:
        yield str(child.info["address"])


@pytest.fixture(scope="module")
def stub(service: str) -> Iterator[pb_grpc.AuthorizationStub]:
    with grpc.insecure_channel(service, options=GRPC_OPTIONS) as ch:
        yield pb_grpc.AuthorizationStub(ch)


@pytest.fixture(scope="module")
def key(postgres_dsn: str) -> tuple[str, str]:
    rec, k = create_key(postgres_dsn, "svc-default", rpm=42)
    return rec.id, k


def test_valid_key_via_x_api_key(stub, key) -> None:
    kid, k = key
    resp = stub.Check(http_check({"x-api-key": k, "content-type": "application/json"}, body=msg_body()))
    assert resp.status.code == code_pb2.OK and resp.HasField("ok_response")
    assert ok_headers(resp) == {
        "x-ccr-principal-id": kid, "x-ccr-key-id": kid, "x-ccr-principal": "svc-default",
        "x-ccr-model": "claude-sonnet-4-5",
        "x-ccr-provider": "anthropic", "x-ccr-cluster": "provider_anthropic",
    }
    # Overwrite, not append, so a client value can never survive next to ours.
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in resp.ok_response.headers)
    meta = json_format.MessageToDict(resp.dynamic_metadata)
    assert re.fullmatch(r"dec_[0-9a-f]+", meta.pop("decision_id"))  # this request's decision (policy_decisions)
    # The worst-case cost (spend, docs/spend.md: 0 here, the test config has no prices); no budget
    # applies, so nothing to reserve (no `spend`).
    assert meta.pop("spend_worst") == 0 and "spend" not in meta
    assert meta == {
        "key_id": kid, "principal": "svc-default", "principal_id": kid, "principal_kind": "key",
        "groups": ["default"], "group_list": "default",  # the groups as one string, for rate limit descriptors
        "model": "claude-sonnet-4-5", "model_requested": "claude-sonnet-4-5", "endpoint": "messages.create",
        "provider": "anthropic", "cluster": "provider_anthropic",
        "rpm": {"requests_per_unit": 42.0, "unit": "MINUTE"},
        # The shipped policy's result: the tier as an audit label and a rate-limit descriptor value.
        "policy_labels": {"tier": "standard"}, "policy_ratelimit": {"tier": "standard"},
    }


def test_valid_key_via_bearer_and_default_rpm(stub, postgres_dsn) -> None:
    rec, k = create_key(postgres_dsn, "bearer-user")
    resp = stub.Check(http_check({"authorization": f"Bearer {k}"}, body=msg_body("claude-opus-4-1")))
    assert resp.status.code == code_pb2.OK
    h = ok_headers(resp)
    assert h["x-ccr-key-id"] == rec.id and h["x-ccr-principal"] == "bearer-user"
    assert h["x-ccr-provider"] == "backup" and h["x-ccr-cluster"] == "provider_backup"
    meta = json_format.MessageToDict(resp.dynamic_metadata)
    assert meta["rpm"] == {"requests_per_unit": 77.0, "unit": "MINUTE"}


def test_spoofed_ccr_headers_are_removed(stub, key) -> None:
    _, k = key
    resp = stub.Check(http_check(
        {"x-api-key": k, "x-ccr-principal": "admin", "x-ccr-budget": "unlimited"}, body=msg_body()))
    assert resp.status.code == code_pb2.OK
    assert ok_headers(resp)["x-ccr-principal"] == "svc-default"  # overwritten
    assert list(resp.ok_response.headers_to_remove) == ["x-ccr-budget"]


def test_beta_query_and_count_tokens(stub, key) -> None:
    _, k = key
    paths = ("/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true", "/v1/messages/count_tokens")
    for path in paths:
        resp = stub.Check(http_check({"x-api-key": k}, path=path, body=msg_body("claude-haiku-4-5")))
        assert resp.status.code == code_pb2.OK, path
        assert ok_headers(resp)["x-ccr-model"] == "claude-haiku-4-5"


def models_answer(resp: pb.CheckResponse) -> dict:
    """The gateway's own GET /v1/models reply (extauth/models_api.py): a 200 nothing is forwarded for."""
    assert resp.HasField("denied_response") and not resp.HasField("ok_response")
    d = resp.denied_response
    assert d.status.code == 200
    assert {h.header.key: h.header.value for h in d.headers}["content-type"] == "application/json"
    return json.loads(d.body)


def test_models_list_is_answered_by_the_gateway(stub, key) -> None:
    _, k = key
    # A client's x-ccr-* header changes nothing (they are stripped before ext_authz; ignored here too).
    got = models_answer(stub.Check(http_check({"x-api-key": k, "x-ccr-model": "spoof", "x-ccr-cluster": "x"},
                                               method="GET", path="/v1/models")))
    # GATEWAY_YAML: only claude-opus-4-1 is an exact id (claude-* is a glob and lists nothing by itself).
    assert got == {"data": [{"type": "model", "id": "claude-opus-4-1", "display_name": "claude-opus-4-1",
                             "created_at": "1970-01-01T00:00:00Z"}],
                   "has_more": False, "first_id": "claude-opus-4-1", "last_id": "claude-opus-4-1"}
    one = models_answer(stub.Check(http_check({"x-api-key": k}, method="GET", path="/v1/models/claude-opus-4-1")))
    assert one["id"] == "claude-opus-4-1" and one["type"] == "model"
    status, err = denied_error(stub.Check(http_check({"x-api-key": k}, method="GET",
                                                     path="/v1/models/claude-sonnet-4-5")))
    assert status == 404 and err["type"] == "not_found_error"
    status, err = denied_error(stub.Check(http_check({"x-api-key": k}, method="GET", path="/v1/models?limit=0")))
    assert status == 400 and "limit" in err["message"]


def test_missing_key_401(stub) -> None:
    for headers in ({}, {"authorization": "Basic dXNlcjpwdw=="}, {"x-api-key": ""}):
        resp = stub.Check(http_check(headers, body=msg_body()))
        assert resp.status.code == code_pb2.UNAUTHENTICATED
        status, err = denied_error(resp)
        assert status == 401 and err["type"] == "authentication_error"
        assert "x-api-key" in err["message"] and "Bearer" in err["message"]


def test_bad_key_401(stub) -> None:
    for bad in ("ccr_" + "A" * 43, "sk-ant-notours"):
        resp = stub.Check(http_check({"x-api-key": bad}, body=msg_body()))
        assert resp.status.code == code_pb2.UNAUTHENTICATED
        status, err = denied_error(resp)
        assert status == 401 and err["type"] == "authentication_error"
        assert err["message"].startswith("invalid API key")


def test_revoked_key_401_within_a_second(stub, postgres_dsn) -> None:
    rec, k = create_key(postgres_dsn, "to-revoke")
    req = http_check({"x-api-key": k}, body=msg_body())
    assert stub.Check(req).status.code == code_pb2.OK  # now cached in extauth
    assert stub.Check(req).status.code == code_pb2.OK
    assert revoke_key(postgres_dsn, rec.id)
    t0 = time.monotonic()
    while True:
        resp = stub.Check(req)
        if resp.status.code != code_pb2.OK:
            break
        assert time.monotonic() - t0 < 1.0, "revoked key still accepted after 1 s"
        time.sleep(0.02)
    status, err = denied_error(resp)
    assert status == 401 and err["type"] == "authentication_error"


def test_key_created_after_a_failed_attempt_works(stub, postgres_dsn) -> None:
    # A negative cache entry must not outlive the key's creation (NOTIFY on create).
    resp = stub.Check(http_check({"x-api-key": "ccr_" + "B" * 43}, body=msg_body()))
    assert resp.status.code == code_pb2.UNAUTHENTICATED
    rec, k = create_key(postgres_dsn, "fresh")
    t0 = time.monotonic()
    while stub.Check(http_check({"x-api-key": k}, body=msg_body())).status.code != code_pb2.OK:
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"model": "claude-sonnet-4-5", ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"max_tokens": 5}', "model: Field required"),
        (b'{"model": 42}', "model: Input should be"),
    ],
)
def test_bad_body_400(stub, key, body: bytes, needle: str) -> None:
    _, k = key
    resp = stub.Check(http_check({"x-api-key": k}, body=body))
    assert resp.status.code == code_pb2.INVALID_ARGUMENT
    status, err = denied_error(resp)
    assert status == 400 and err["type"] == "invalid_request_error" and needle in err["message"]


def test_unknown_model_404(stub, key) -> None:
    _, k = key
    resp = stub.Check(http_check({"x-api-key": k}, body=msg_body("gpt-4o")))
    status, err = denied_error(resp)
    assert status == 404 and err["type"] == "not_found_error"
    assert re.fullmatch(r"model: gpt-4o is not a model this gateway serves; GET /v1/models lists the models "
                        r"you may use \(decision dec_[0-9a-f]+\)", err["message"])


def test_policy_denied_model_403(stub, postgres_dsn) -> None:
    rec, k = create_key(postgres_dsn, "haiku-bot", groups=["haiku-only"])
    allowed = stub.Check(http_check({"x-api-key": k}, body=msg_body("claude-haiku-4-5")))
    assert allowed.status.code == code_pb2.OK
    resp = stub.Check(http_check({"x-api-key": k}, body=msg_body("claude-sonnet-4-5")))
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    status, err = denied_error(resp)
    assert status == 403 and err["type"] == "permission_error"
    assert "haiku-bot" in err["message"] and "claude-sonnet-4-5" in err["message"]
    assert "claude-haiku-*" in err["message"]


# -- endpoints: every path is governed ------------------------------------------


def _concrete(e: Endpoint, bedrock_model: str = "us.anthropic.claude-haiku-4-5-20251001-v1:0") -> str:
    return (e.template.replace("{model_id}", "claude-haiku-4-5").replace("{batch_id}", "msgbatch_01abc")
            .replace("{file_id}", "file_01abc").replace("{bedrock_model}", bedrock_model))


# Batches need a batch body and owned ids: tests/test_extauth_objects.py decides those.
@pytest.mark.parametrize("e", [e for e in ENDPOINTS if e.kind not in (Kind.FILES, Kind.BATCHES)],
                         ids=lambda e: e.name)
def test_every_endpoint_gets_a_decision(stub, postgres_dsn, e: Endpoint) -> None:
    _, k = create_key(postgres_dsn, f"haiku-{e.name}", groups=["haiku-only"])
    body = msg_body("claude-haiku-4-5") if e.method == "POST" else b""
    resp = stub.Check(http_check({"x-api-key": k}, method=e.method, path=_concrete(e) + "?beta=true", body=body))
    if e.name == "models.list":  # answered by the gateway, as the policy allows (extauth/models_api.py)
        assert models_answer(resp)["data"] == []  # haiku-only may not use the one listed model (claude-opus-4-1)
        return
    if e.name == "models.get":  # decided (endpoint granted), then not listed for this caller: 404
        assert denied_error(resp)[0] == 404
        return
    assert resp.status.code == code_pb2.OK, denied_error(resp)
    assert json_format.MessageToDict(resp.dynamic_metadata)["endpoint"] == e.name
    if e.model_in_body:  # the model check still applies
        denied = stub.Check(http_check({"x-api-key": k}, method=e.method, path=_concrete(e),
                                       body=msg_body("claude-sonnet-4-5")))
        assert denied_error(denied)[0] == 403
    if e.model_in_path:  # a Bedrock client's model is the path's, decided as the Anthropic API's id
        assert json_format.MessageToDict(resp.dynamic_metadata)["model"] == "claude-haiku-4-5-20251001"
        denied = stub.Check(http_check({"x-api-key": k}, method=e.method, body=body,
                                       path=_concrete(e, "us.anthropic.claude-sonnet-4-5-20250929-v1:0")))
        assert denied_error(denied)[0] == 403


@pytest.mark.parametrize("path,why", [
    ("/v1/messages/", "trailing slash"), ("//v1/messages", "'//'"), ("/v1/./messages", "dot segment"),
    ("/v1/x/../messages", "dot segment"), ("/v1/%6Dessages", "percent-encoding"), ("/v1/messages%2F", "percent"),
    ("/v1/messages\x00", "control character"), ("/v1/messages;a", "character outside"),
    ("/v1/" + "m" * 600, "longer than"),
])
def test_non_canonical_path_is_refused_before_anything(stub, key, path: str, why: str) -> None:
    """Even with a valid key and an allowed model: the path is refused, not interpreted."""
    _, k = key
    resp = stub.Check(http_check({"x-api-key": k}, path=path, body=msg_body("claude-haiku-4-5")))
    status, err = denied_error(resp)
    assert status == 400 and err["type"] == "invalid_request_error" and why in err["message"], err


@pytest.mark.parametrize("method,path", [
    ("POST", "/V1/messages"), ("POST", "/v1/Messages"), ("GET", "/v1/messages"), ("POST", "/v1/complete"),
    ("POST", "/v1/messages/batches/b1/results"), ("PUT", "/v1/messages"), ("GET", "/v1/organizations/me"),
    ("GET", "/"),
])
def test_unknown_endpoint_is_404_with_or_without_key(stub, key, method: str, path: str) -> None:
    _, k = key
    for headers in ({"x-api-key": k}, {}):
        resp = stub.Check(http_check(headers, method=method, path=path, body=msg_body("claude-haiku-4-5")))
        status, err = denied_error(resp)
        assert status == 404 and err["type"] == "not_found_error", (method, path, err)


def test_files_api_is_403_unless_enabled(stub, key, postgres_dsn, tmp_path: Path) -> None:
    _, k = key
    files = [e for e in ENDPOINTS if e.kind is Kind.FILES]
    for e in files:
        resp = stub.Check(http_check({"x-api-key": k}, method=e.method, path=_concrete(e)))
        status, err = denied_error(resp)
        assert status == 403 and "files" in err["message"] and "disabled" in err["message"], e.name
    enabled = parse_config({**__import__("yaml").safe_load(GATEWAY_YAML), "files": {"enabled": True}})
    bundle = build_bundle(REPO / "policies", tmp_path / "b.tar.gz", "ccr/authz/decision")

    async def scenario() -> list[pb.CheckResponse]:
        keys = KeyStore(postgres_dsn)
        await keys.start()
        auth = Authorizer(enabled, keys, PolicyEngine.load(bundle, "ccr/authz/decision"))
        try:
            return [await auth.check(http_check({"x-api-key": k}, method=e.method, path=_concrete(e)))
                    for e in files]
        finally:
            await keys.close()
            auth.policy.close()

    assert [r.status.code for r in asyncio.run(scenario())] == [code_pb2.OK] * len(files)


def test_policy_decides_per_endpoint(postgres_dsn: str, tmp_path: Path) -> None:
    src = tmp_path / "policies"
    src.mkdir()
    copy_policy_modules(src)
    (src / "data.json").write_text(json.dumps({
        "endpoint_access": {"*": ["messages.*", "models.list"], "batchers": ["batches.*"]},
        "model_access": {"default": ["claude-*"], "batchers": ["claude-*"]}}))
    bundle = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    config = parse_config(__import__("yaml").safe_load(GATEWAY_YAML))
    _, plain = create_key(postgres_dsn, "plain", groups=["default"])
    _, batcher = create_key(postgres_dsn, "batcher", groups=["batchers"])

    async def scenario() -> dict[tuple[str, str], pb.CheckResponse]:
        keys = KeyStore(postgres_dsn)
        await keys.start()
        auth = Authorizer(config, keys, PolicyEngine.load(bundle, "ccr/authz/decision"))
        out = {}
        try:
            for who, k in (("plain", plain), ("batcher", batcher)):
                for method, path in (("GET", "/v1/messages/batches"), ("GET", "/v1/models"),
                                     ("GET", "/v1/models/claude-haiku-4-5")):
                    out[(who, path)] = await auth.check(http_check({"x-api-key": k}, method=method, path=path))
        finally:
            await keys.close()
            auth.policy.close()
        return out

    got = asyncio.run(scenario())
    assert got[("batcher", "/v1/messages/batches")].status.code == code_pb2.OK
    status, err = denied_error(got[("plain", "/v1/messages/batches")])
    assert status == 403 and "batches.list" in err["message"] and "plain" in err["message"]
    assert models_answer(got[("plain", "/v1/models")]) == models_answer(got[("batcher", "/v1/models")])
    assert denied_error(got[("plain", "/v1/models/claude-haiku-4-5")])[0] == 403  # only models.list granted


def test_20mb_body(stub, key) -> None:
    _, k = key
    big = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "x" * (20 * 1024 * 1024)}]})
    resp = stub.Check(http_check({"x-api-key": k}, body=big), timeout=30)
    assert resp.status.code == code_pb2.OK
    assert ok_headers(resp)["x-ccr-model"] == "claude-sonnet-4-5"


def test_agent_request_fixture(stub, key, agent_request_bytes: bytes) -> None:
    _, k = key
    model = orjson.loads(agent_request_bytes)["model"]
    resp = stub.Check(http_check({"authorization": f"Bearer {k}", "anthropic-beta": "x"},
                                 path="/v1/messages?beta=true", body=agent_request_bytes))
    assert resp.status.code == code_pb2.OK
    assert ok_headers(resp)["x-ccr-model"] == model


# -- fail closed ---------------------------------------------------------------


def test_database_failure_denies_503(postgres_dsn: str, tmp_path: Path) -> None:
    config = parse_config(__import__("yaml").safe_load(GATEWAY_YAML))
    policy = PolicyEngine.load(build_bundle(REPO / "policies", tmp_path / "b.tar.gz", "ccr/authz/decision"),
                               "ccr/authz/decision")
    _, k = create_key(postgres_dsn, "db-down")

    async def scenario() -> pb.CheckResponse:
        keys = KeyStore(postgres_dsn)
        await keys.start()
        await keys.close()  # the database is now unreachable for this store
        return await Authorizer(config, keys, policy).check(http_check({"x-api-key": k}, body=msg_body()))

    try:
        resp = asyncio.run(scenario())
    finally:
        policy.close()
    assert resp.status.code == code_pb2.UNAVAILABLE and not resp.HasField("ok_response")
    status, err = denied_error(resp)
    assert status == 503 and err["type"] == "api_error"


def test_cached_key_needs_no_database(postgres_dsn: str) -> None:
    rec, k = create_key(postgres_dsn, "cached")

    async def scenario() -> None:
        keys = KeyStore(postgres_dsn)
        await keys.start()
        try:
            first = await asyncio.gather(*(keys.lookup(k) for _ in range(20)))  # one shared query
            assert {r.id for r in first} == {rec.id}
        finally:
            await keys.close()
        # The pool is closed: only the cache can answer now.
        assert (await keys.lookup(k)) == first[0]
        assert (await keys.lookup("not-a-ccr-key")) is None  # rejected without a query
        with pytest.raises(Exception, match="closed"):
            await keys.lookup("ccr_" + "C" * 43)

    asyncio.run(scenario())


def test_bundle_hot_reload(postgres_dsn: str, tmp_path: Path) -> None:
    from extauth.bundle_source import BundleLoader, FileSource

    config = parse_config(__import__("yaml").safe_load(GATEWAY_YAML))
    src = tmp_path / "policies"
    src.mkdir()
    copy_policy_modules(src)
    grant = {"*": ["messages.*"]}
    (src / "data.json").write_text(json.dumps({"endpoint_access": grant, "model_access": {"default": ["claude-*"]}}))
    bundle = build_bundle(src, tmp_path / "b.tar.gz", "ccr/authz/decision")
    _, k = create_key(postgres_dsn, "reload")
    req = http_check({"x-api-key": k}, body=msg_body("claude-sonnet-4-5"))

    async def scenario() -> None:
        keys = KeyStore(postgres_dsn)
        await keys.start()
        loader = BundleLoader(None, FileSource(bundle), "ccr/authz/decision")
        auth = Authorizer(config, keys, await loader.load_initial())
        loader.holder = auth
        try:
            assert (await auth.check(req)).status.code == code_pb2.OK
            # A broken bundle is rejected and the current policy stays.
            bundle.write_bytes(b"garbage")
            assert await loader.poll_once() == "refused"
            assert (await auth.check(req)).status.code == code_pb2.OK
            # A new bundle takes effect without a restart; cached decisions do not linger.
            (src / "data.json").write_text(json.dumps({"endpoint_access": grant,
                                                       "model_access": {"default": ["claude-haiku-*"]}}))
            build_bundle(src, bundle, "ccr/authz/decision")
            assert await loader.poll_once() == "loaded"
            resp = await auth.check(req)
            assert denied_error(resp)[0] == 403
        finally:
            await loader.close()
            await keys.close()
            auth.policy.close()

    asyncio.run(scenario())
