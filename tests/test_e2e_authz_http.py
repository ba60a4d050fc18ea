"""ext_authz over HTTP/1.1 (services.authz_transport: http), end to end through real Envoy.

The anthropic SDK through Envoy and extauth's HTTP front: what the gRPC transport gives (answers, refusals with
their own status and body, quota headers, the audit row's typed facts) arrives the same way, and nothing a
client or a provider sends can pose as the front's answer.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import psycopg
import pytest
from google.protobuf import struct_pb2
from psycopg.rows import dict_row

from ccr.contract import H_AUTHZ_PEER_URI, H_REGION_HINT, authz_md_header
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import REPO, emulator_mark, log_row, running_gateway

MODEL = "claude-sonnet-4-6"
BODY = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}


UNDECLARED = "x-residency-undeclared"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The shipped policies, with tenant acme-eu bound to the EU and the binding sent upstream in a header the
    config does not declare (policy.result_names): such requests cannot be carried over HTTP."""
    tmp = tmp_path_factory.mktemp("authz-http")
    pol = tmp / "policies"
    shutil.copytree(REPO / "policies", pol)
    data = json.loads((pol / "data.json").read_text())
    data["residency"]["tenants"] = {"acme-eu": "eu"}
    data["residency"]["header"] = UNDECLARED
    (pol / "data.json").write_text(json.dumps(data))

    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["authz_transport"] = "http"
        cfg["policy"]["dir"] = str(pol)
        cfg["providers"][0]["region"] = "eu"

    with running_gateway(tmp, edit) as g:
        yield g


def _dsn(gw: Gateway) -> str:
    assert gw.runtime is not None
    return gw.runtime.postgres_dsn


def _decision(gw: Gateway, decision_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with psycopg.connect(_dsn(gw), row_factory=dict_row, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT allow, status, reason FROM policy_decisions WHERE decision_id = %s",
                               (decision_id,)).fetchone()
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no policy decision {decision_id}"
            time.sleep(0.05)


def _stat(gw: Gateway, name: str) -> int:
    text = httpx.get(f"{gw.admin_url}/stats", params={"filter": f"^{name}$"}, timeout=5).text
    return sum(int(line.split(":")[1]) for line in text.splitlines() if line.strip())


def _b64_value(v: Any) -> str:
    """What the front would send for `v`: a serialized google.protobuf.Value, base64."""
    s = struct_pb2.Struct()
    s.update({"v": v})
    return base64.b64encode(s.fields["v"].SerializeToString()).decode()


def _post(gw: Gateway, key: str, headers: dict[str, str] | None = None, body: dict[str, Any] | None = None
          ) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/messages", json=body or BODY, timeout=30,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01", **(headers or {})})


def test_the_sdk_is_served_and_every_check_goes_over_http(gw: Gateway) -> None:
    grpc_before = _stat(gw, r"cluster\.ccr_extauth\.upstream_rq_total")
    http_before = _stat(gw, r"cluster\.ccr_extauth_http\.upstream_rq_total")
    rec, key = create_key(_dsn(gw), f"http-{uuid.uuid4().hex[:6]}", ["default", "eng"])
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)

    raw = client.messages.with_raw_response.create(**BODY)
    msg = raw.parse()
    assert msg.content and msg.usage.output_tokens > 0
    with client.messages.stream(**BODY) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0
    # extauth's own answer: a 200 the front sends under its stand-in status, mapped back by the listener.
    models = client.models.list()
    assert any(m.id for m in models.data)

    assert _stat(gw, r"cluster\.ccr_extauth_http\.upstream_rq_total") - http_before >= 3
    assert _stat(gw, r"cluster\.ccr_extauth\.upstream_rq_total") == grpc_before  # no gRPC Check at all
    # SPIFFE mTLS to the front (the example config runs SPIRE), never a failed handshake.
    assert _stat(gw, r"cluster\.ccr_extauth_http\.ssl\.handshake") >= 1
    assert _stat(gw, r"cluster\.ccr_extauth_http\.ssl\.connection_error") == 0

    # The audit row's facts came back typed through the answer's metadata headers.
    row = log_row(_dsn(gw), raw.headers["x-request-id"])
    assert (row["status"], row["error_type"], row["ratelimit"]) == (200, None, "ok")
    assert (row["principal_id"], row["key_id"], row["principal_kind"]) == (rec.id, rec.id, "key")
    assert row["groups"] == ["default", "eng"]  # a list, typed
    assert row["source_address"] == "127.0.0.1"  # from the peer header Envoy adds
    assert (row["endpoint"], row["model"], row["provider"]) == ("messages.create", MODEL, "anthropic")
    assert (row["input_tokens"], row["output_tokens"]) == (msg.usage.input_tokens, msg.usage.output_tokens)
    assert row["decision_id"].startswith("dec_")


def test_a_refusal_keeps_its_status_body_and_audit_facts(gw: Gateway) -> None:
    r = _post(gw, "sk-ccr-not-a-key")
    assert r.status_code == 401, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    assert not any(k.startswith("x-ccr-") for k in r.headers)  # the metadata headers were read and removed
    row = log_row(_dsn(gw), r.headers["x-request-id"])
    assert row["status"] == 401 and row["error_type"] == "authentication_error"
    assert row["decision_id"] and row["decision_id"] in r.json()["error"]["message"]


def test_a_rate_limit_refusal_carries_the_quota_headers(gw: Gateway) -> None:
    rec, key = create_key(_dsn(gw), f"rl-{uuid.uuid4().hex[:6]}", ["default"], rpm=1)
    ok = _post(gw, key)
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-ratelimit-limit"] and ok.headers["anthropic-ratelimit-requests-limit"] == "1"
    over = _post(gw, key)
    assert over.status_code == 429, over.text
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert int(over.headers["retry-after"]) >= 1
    assert over.headers["x-ratelimit-remaining"] == "0"
    row = log_row(_dsn(gw), over.headers["x-request-id"])
    assert row["status"] == 429 and row["key_id"] == rec.id
    assert "RL" in (row["response_flags"] or "")


def test_client_sent_answer_headers_change_nothing(gw: Gateway) -> None:
    """A client cannot pose as the front: x-ccr-* (metadata and peer headers alike) are stripped first."""
    rec, key = create_key(_dsn(gw), f"spoof-{uuid.uuid4().hex[:6]}", ["default"])
    forged = {authz_md_header("principal_id"): _b64_value("administrator"),
              authz_md_header("groups"): _b64_value(["auditor"]),
              authz_md_header("spiffe_id"): _b64_value("spiffe://ccr.local/admin"),
              H_AUTHZ_PEER_URI: "spiffe://ccr.local/envoy"}
    r = _post(gw, key, forged)
    assert r.status_code == 200, r.text
    row = log_row(_dsn(gw), r.headers["x-request-id"])
    assert (row["principal_id"], row["key_id"], row["groups"]) == (rec.id, rec.id, ["default"])
    assert row["spiffe_id"] is None


def test_a_provider_cannot_write_the_audit_rows_facts(gw: Gateway) -> None:
    """The refusal metadata filter reads x-ccr-md-* from replies on their way out: the route configuration
    removes those names from every upstream reply first, so a provider's own cannot reach the audit row."""
    rec, key = create_key(_dsn(gw), f"prov-{uuid.uuid4().hex[:6]}", ["default"])
    forged = [f"{authz_md_header('principal_id')}={_b64_value('mallory')}",
              f"{authz_md_header('groups')}={_b64_value(['admins'])}",
              f"{authz_md_header('error_type')}={_b64_value('permission_error')}"]
    r = httpx.post(f"{gw.url}/v1/messages", json=BODY, timeout=30, headers=[
        ("x-api-key", key), ("anthropic-version", "2023-06-01"),
        *(("x-emulator-response-header", f) for f in forged)])
    assert r.status_code == 200, r.text
    assert not any(k.startswith("x-ccr-") for k in r.headers)
    row = log_row(_dsn(gw), r.headers["x-request-id"])
    assert (row["principal_id"], row["groups"], row["error_type"]) == (rec.id, ["default"], None)


def test_the_emulator_does_set_the_headers_it_is_asked_for(gw: Gateway) -> None:
    """The control above could pass on an emulator that ignores the header: it does not."""
    assert gw.emulator_url and gw.emulator_key
    r = httpx.get(f"{gw.emulator_url}/v1/models", headers={
        "x-api-key": gw.emulator_key, "anthropic-version": "2023-06-01",
        "x-emulator-response-header": f"{authz_md_header('principal_id')}=forged"}, timeout=10)
    assert r.status_code == 200 and r.headers[authz_md_header("principal_id")] == "forged"


def test_a_large_body_is_refused_at_its_headers(gw: Gateway) -> None:
    """The identity-first check goes over HTTP too: a stranger's large upload is refused before buffering."""
    before = _stat(gw, r"http\.ccr\.ext_authz\.identity\.denied")
    big = {**BODY, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    r = _post(gw, "sk-ccr-not-a-key", body=big)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert _stat(gw, r"http\.ccr\.ext_authz\.identity\.denied") == before + 1


def test_an_undeclared_policy_header_is_refused_and_recorded_as_refused(gw: Gateway) -> None:
    """Envoy copies only listed names from an HTTP answer: rather than let it drop the policy's header
    silently, extauth refuses (503) and the decision log records that refusal, not an allow."""
    _, key = create_key(_dsn(gw), f"eu-{uuid.uuid4().hex[:6]}", ["default"], tenant="acme-eu")
    mark = emulator_mark(gw)
    r = _post(gw, key, {H_REGION_HINT: "eu"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "api_error"
    assert mark.arrived() == []  # nothing reached the provider
    row = log_row(_dsn(gw), r.headers["x-request-id"])
    assert (row["status"], row["error_type"]) == (503, "api_error")
    decision = _decision(gw, row["decision_id"])  # the decision log writes in batches: wait for the row
    assert (decision["allow"], decision["status"]) == (False, 503)
    assert UNDECLARED in decision["reason"] and "policy.result_names" in decision["reason"]
    # Another tenant's requests, which the policy adds nothing to, are served as before.
    _, other = create_key(_dsn(gw), f"us-{uuid.uuid4().hex[:6]}", ["default"])
    assert _post(gw, other).status_code == 200


def test_the_store_down_is_a_503_with_the_gateways_own_body(gw: Gateway) -> None:
    """A 5xx refusal cannot travel as an HTTP answer (Envoy would read it as the front failing): it goes out
    under its stand-in and the client still gets extauth's 503, body and decision id included. Last: it stops
    the run's Redis."""
    _, key = create_key(_dsn(gw), f"down-{uuid.uuid4().hex[:6]}", ["default"])
    redis_child = next(c for c in gw.children if c.name.split(".")[0] == "redis")
    redis_child.stop()
    r = _post(gw, key)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "authorization service is unavailable" not in body["error"]["message"]  # extauth's, not Envoy's
    row = log_row(_dsn(gw), r.headers["x-request-id"])
    assert row["status"] == 503 and row["error_type"] == "api_error"
