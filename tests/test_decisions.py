"""The decision log: every extauth decision is one row in policy_decisions (real PostgreSQL),
joinable to request_log by Envoy's x-request-id; the id reaches the client on denial and the
ext_authz metadata on allow; a full queue drops and counts; shutdown flushes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import psycopg
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2
from psycopg.rows import dict_row

from ccr import cli
from ccr.config import parse_config
from ccr.contract import AUTHZ_DECISION_ID
from extauth.bundle import build_bundle
from extauth.decisions import DecisionLog, canonical, policy_input
from extauth.endpoints import match
from extauth.keys import KeyStore, create_key
from extauth.policy import PolicyEngine
from extauth.policy_input import RequestFacts, body_facts
from extauth.server import Authorizer, check_identity
from tests.harness import log_row, running_gateway
from tests.test_extauth import GATEWAY_YAML, REPO, denied_error, http_check, msg_body

DECISION_IN_MESSAGE = re.compile(r"\(decision (dec_[0-9a-f]+)\)$")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(REPO / "policies", tmp_path_factory.mktemp("declog") / "policy.tar.gz", "ccr/authz/decision")


def rows(dsn: str, where: str = "TRUE", args: tuple = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM policy_decisions WHERE {where} ORDER BY ts, decision_id", args)  # noqa: S608
        return cur.fetchall()


async def with_authorizer(dsn: str, bundle: Path, decisions: DecisionLog, scenario) -> Any:
    keys = KeyStore(dsn)
    await keys.start()
    auth = Authorizer(parse_config(__import__("yaml").safe_load(GATEWAY_YAML)), keys,
                      PolicyEngine.load(bundle, "ccr/authz/decision"), decisions=decisions)
    try:
        return await scenario(auth)
    finally:
        await decisions.close()
        await keys.close()
        auth.policy.close()


def test_allow_and_deny_each_one_row(postgres_dsn: str, bundle: Path) -> None:
    _, good = create_key(postgres_dsn, "declog-good")
    haiku, only_haiku = create_key(postgres_dsn, "declog-haiku", groups=["haiku-only"])
    log = DecisionLog(postgres_dsn, flush_ms=60_000)  # never flushed by time: close() must do it

    async def scenario(auth: Authorizer) -> dict[str, pb.CheckResponse]:
        await log.start()
        out = {}
        for rid, key, model in (("rid-allow-1", good, "claude-sonnet-4-5"), ("rid-allow-2", good, "claude-sonnet-4-5"),
                                ("rid-deny-403", only_haiku, "claude-sonnet-4-5")):
            out[rid] = await auth.check(http_check({"x-api-key": key, "x-request-id": rid}, body=msg_body(model)))
        out["rid-deny-401"] = await auth.check(
            http_check({"x-api-key": good[:-4] + "AAAA", "x-request-id": "rid-deny-401"}, body=msg_body()))
        return out

    got = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
    by_rid = {r["request_id"]: r for r in rows(postgres_dsn, "request_id LIKE %s", ('rid-%',))}
    assert len(rows(postgres_dsn, "request_id LIKE %s", ('rid-%',))) == 4 == len(by_rid)  # exactly one each

    # Allowed: the id is in the ext_authz metadata, per request even though the response is cached.
    ids = []
    for rid in ("rid-allow-1", "rid-allow-2"):
        assert got[rid].status.code == code_pb2.OK
        did = got[rid].dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value
        ids.append(did)
        r = by_rid[rid]
        assert r["decision_id"] == did and r["allow"] is True and r["status"] == 200 and r["phase"] == "full"
        assert (r["principal_name"], r["principal_kind"], r["endpoint"], r["model"]) == (
            "declog-good", "key", "messages.create", "claude-sonnet-4-5")
        assert (r["method"], r["path"]) == ("POST", "/v1/messages")
        assert r["eval_us"] is not None and r["eval_us"] >= 0
        assert r["bundle_digest"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert ids[0] != ids[1]
    assert by_rid["rid-allow-1"]["input_sha256"] == by_rid["rid-allow-2"]["input_sha256"]
    principal = asyncio.run(_principal(postgres_dsn, good))
    # Input v1: the credential and the request id are not in it; the body's facts and size are.
    facts = RequestFacts(host="gw.local", size=len(msg_body()), body=body_facts(orjson.loads(msg_body())))
    expected = hashlib.sha256(canonical(policy_input(principal, "POST", "/v1/messages", "claude-sonnet-4-5",
                                                     match("POST", "/v1/messages"), None, facts))).hexdigest()
    assert by_rid["rid-allow-1"]["input_sha256"] == expected

    # Denied by policy: 403 with the rule's reason, and the message names the decision.
    status, err = denied_error(got["rid-deny-403"])
    r = by_rid["rid-deny-403"]
    assert status == 403 and r["status"] == 403 and r["allow"] is False
    assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == r["decision_id"]
    assert r["principal_id"] == haiku.id and r["reason"] in err["message"] and "claude-haiku-*" in r["reason"]
    assert r["input_sha256"] not in (None, by_rid["rid-allow-1"]["input_sha256"])
    # A refusal's metadata is for the audit row only (docs/audit.md): the decision, the error type and
    # who asked; nothing a later filter would route or limit by.
    meta = MessageToDict(got["rid-deny-403"].dynamic_metadata)
    assert meta["decision_id"] == r["decision_id"] and meta["error_type"] == "permission_error"
    assert meta["principal_id"] == haiku.id and meta["model"] == "claude-sonnet-4-5"
    assert not {"provider", "cluster", "rpm", "spend", "spend_worst", "user_id", "group_list"} & set(meta), meta

    # Refused before the policy: no principal, no input, no evaluation.
    status, err = denied_error(got["rid-deny-401"])
    r = by_rid["rid-deny-401"]
    assert status == 401 == r["status"] and r["allow"] is False
    assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == r["decision_id"]
    assert (r["principal_id"], r["input_sha256"], r["eval_us"]) == (None, None, None)

    # No credential anywhere, not even the one that failed.
    dump = json.dumps([rows(postgres_dsn)], default=str)
    for secret in (good, only_haiku, good[:-4] + "AAAA"):
        assert secret not in dump and secret[-12:] not in dump


async def _principal(dsn: str, key: str):
    ks = KeyStore(dsn)
    await ks.start()
    try:
        from extauth.identity import Identity
        return await Identity(ks).authenticate({"x-api-key": key}, None)
    finally:
        await ks.close()


def test_full_queue_drops_and_counts_without_blocking(postgres_dsn: str, bundle: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _, key = create_key(postgres_dsn, "declog-flood")
    log = DecisionLog(postgres_dsn, queue_size=2, flush_ms=60_000)  # not started: nothing drains it

    async def scenario(auth: Authorizer) -> list[pb.CheckResponse]:
        # Each check must complete although the queue is full (a blocked put would time out here).
        return [await asyncio.wait_for(auth.check(http_check({"x-api-key": key, "x-request-id": f"flood-{i}"},
                                                             body=msg_body())), 5) for i in range(5)]

    with caplog.at_level(logging.WARNING, logger="extauth.decisions"):
        got = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
    assert [r.status.code for r in got] == [code_pb2.OK] * 5
    assert log.dropped == 3 and log.written == 2
    assert [r["request_id"] for r in rows(postgres_dsn, "request_id LIKE %s", ('flood-%',))] == ["flood-0", "flood-1"]
    assert any("3 decision(s) dropped" in m for m in caplog.messages)


def test_identity_phase_logs_only_refusals(postgres_dsn: str, bundle: Path) -> None:
    _, key = create_key(postgres_dsn, "declog-ident")
    log = DecisionLog(postgres_dsn, flush_ms=60_000)

    async def scenario(auth: Authorizer) -> tuple[pb.CheckResponse, pb.CheckResponse]:
        ok = await check_identity(auth, http_check({"x-api-key": key, "x-request-id": "ident-ok"}))
        bad = await check_identity(auth, http_check({"x-request-id": "ident-bad"}))
        return ok, bad

    ok, bad = asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
    assert ok.status.code == code_pb2.OK and rows(postgres_dsn, "request_id = 'ident-ok'") == []
    [r] = rows(postgres_dsn, "request_id = 'ident-bad'")
    status, err = denied_error(bad)
    assert (r["phase"], r["status"], status, r["allow"]) == ("identity", 401, 401, False)
    assert DECISION_IN_MESSAGE.search(err["message"]).group(1) == r["decision_id"]


def test_opa_shaped_file(postgres_dsn: str, bundle: Path, tmp_path: Path) -> None:
    _, key = create_key(postgres_dsn, "declog-file")
    _, haiku = create_key(postgres_dsn, "declog-file-haiku", groups=["haiku-only"])
    for include in (False, True):
        out = tmp_path / f"decisions-{include}.jsonl"
        log = DecisionLog(None, file=out, include_input=include)

        async def scenario(auth: Authorizer) -> None:
            await auth.check(http_check({"x-api-key": key, "x-request-id": "file-ok"}, body=msg_body()))
            await auth.check(http_check({"x-api-key": "nope", "x-request-id": "file-401"}, body=msg_body()))
            await auth.check(http_check({"x-api-key": haiku, "x-request-id": "file-403"}, body=msg_body()))

        asyncio.run(with_authorizer(postgres_dsn, bundle, log, scenario))
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x["request_id"] for x in lines] == ["file-ok", "file-403"]  # the 401 never reached the policy
        d, denied = lines
        assert denied["result"]["allow"] is False and "claude-haiku-*" in denied["result"]["reason"]
        assert d["decision_id"].startswith("dec_") and d["request_id"] == "file-ok"
        assert d["path"] == "ccr/authz/decision" and d["result"]["allow"] is True
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", d["timestamp"])
        assert d["metrics"]["timer_rego_query_eval_ns"] >= 0
        assert d["bundles"]["ccr"]["revision"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert ("input" in d) is include
        if include:
            assert d["input"]["principal"]["name"] == "declog-file" and d["input"]["request"]["model"]
        assert key not in out.read_text()


# -- the whole gateway ------------------------------------------------------------


def _decisions_for(dsn: str, rid: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Wait for the decision row of `rid` (written within flush_ms of the check)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = rows(dsn, "request_id = %s", (rid,))
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_gateway_decisions_join_request_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_gateway(tmp_path) as gw:
        dsn = gw.runtime.postgres_dsn
        # A client's own x-request-id never becomes the key a decision is recorded (and joined) under.
        spoof = "client-chosen-request-id"
        r = httpx.post(f"{gw.url}/v1/messages", headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01",
                                                         "x-request-id": spoof},
                       json={"model": "claude-sonnet-4-6", "max_tokens": 16,
                             "messages": [{"role": "user", "content": "hello"}]}, timeout=30)
        assert r.status_code == 200
        ok_rid = r.headers["x-request-id"]
        bad = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key[:-4] + "AAAA", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "x"}])
        deny_rid = e.value.response.headers["x-request-id"]
        deny_id = DECISION_IN_MESSAGE.search(e.value.body["error"]["message"]).group(1)  # type: ignore[index]

        allow_rows = _decisions_for(dsn, ok_rid)
        deny_rows = _decisions_for(dsn, deny_rid)
        assert len(allow_rows) == 1 and allow_rows[0]["allow"] is True
        assert ok_rid != spoof and rows(dsn, "request_id = %s", (spoof,)) == []  # same flush as ok_rid's row
        assert len(deny_rows) == 1 and deny_rows[0]["decision_id"] == deny_id and deny_rows[0]["status"] == 401
        assert log_row(dsn, ok_rid)["status"] == 200 and log_row(dsn, deny_rid)["status"] == 401
        with psycopg.connect(dsn) as conn:
            joined = conn.execute("SELECT d.decision_id, l.status FROM policy_decisions d JOIN request_log l"
                                  " USING (request_id) WHERE request_id IN (%s, %s) ORDER BY l.status",
                                  (ok_rid, deny_rid)).fetchall()
        assert joined == [(allow_rows[0]["decision_id"], 200), (deny_id, 401)]

        assert cli.main(["-c", str(gw.config_path), "policy", "why", deny_rid]) == 0
        out = capsys.readouterr().out
        assert deny_id in out and "401" in out and "deny" in out and "request_log: status 401" in out
        assert gw.api_key not in out
        assert cli.main(["-c", str(gw.config_path), "policy", "why", "no-such-request"]) == 1


def test_service_shutdown_flushes_the_queue(postgres_dsn: str, bundle: Path, tmp_path: Path) -> None:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    from ccr.service import GRPC_OPTIONS
    from tests.harness import running_service

    _, key = create_key(postgres_dsn, "declog-shutdown")
    # Neither the timer (a minute) nor the batch size (500) can write it: only the shutdown flush.
    yaml_text = GATEWAY_YAML + "policy:\n  decision_log: {flush_ms: 60000, file: decisions.jsonl}\n"
    with running_service("extauth", tmp_path, yaml_text, postgres_dsn=postgres_dsn,
                         policy_bundle=str(bundle)) as child:
        with grpc.insecure_channel(str(child.info["address"]), options=GRPC_OPTIONS) as ch:
            resp = pb_grpc.AuthorizationStub(ch).Check(
                http_check({"x-api-key": key, "x-request-id": "shutdown-1"}, body=msg_body()))
        assert resp.status.code == code_pb2.OK
        assert rows(postgres_dsn, "request_id = %s", ("shutdown-1",)) == []
    [r] = rows(postgres_dsn, "request_id = %s", ("shutdown-1",))
    assert r["decision_id"] == resp.dynamic_metadata.fields[AUTHZ_DECISION_ID].string_value
    [line] = (tmp_path / "decisions.jsonl").read_text().splitlines()  # relative to the config file
    assert json.loads(line)["decision_id"] == r["decision_id"]


def test_decision_log_config_defaults_and_strictness() -> None:
    from ccr.config import ConfigError

    base = __import__("yaml").safe_load(GATEWAY_YAML)
    s = parse_config(base).policy.decision_log
    assert (s.postgres, s.file, s.include_input) == (True, None, False)  # PostgreSQL on, file off
    with pytest.raises(ConfigError, match="decision_log"):
        parse_config({**base, "policy": {"decision_log": {"fille": "x.jsonl"}}})
    with pytest.raises(ConfigError, match="queue_size"):
        parse_config({**base, "policy": {"decision_log": {"queue_size": 0}}})
