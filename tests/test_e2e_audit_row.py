"""What one request's audit row holds, end to end: the anthropic SDK through the real Envoy, extauth
(a built policy bundle with a revision), the rate limit service, the emulator as the provider, and the
access-log receiver. Unstreamed, streamed and denied; each row's fields checked against what the
gateway, the policy decision log and the provider's reply say, and the chain still verifies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import psycopg
import pytest
from psycopg.rows import dict_row

from ccr.cli import main
from ccr.supervisor import Gateway
from extauth.bundle import build_bundle
from extauth.keys import create_key
from tests.harness import REPO, running_gateway

SONNET = "claude-sonnet-4-5"
REVISION = "audit-rev-7"
# USD per million tokens of the example config's claude-sonnet-* entry = micro-USD per token.
PRICE = {"input": 3, "output": 15, "w5": 3.75, "w1": 6, "read": 0.3}


# Both ext_authz transports: over HTTP the facts travel as answer headers (router/authz_http.py), and every row
# field must come out the same.
@pytest.fixture(scope="module", params=["grpc", "http"])
def gw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("audit-row")
    bundle = build_bundle(REPO / "policies", tmp / "bundle.tar.gz", "ccr/authz/decision", revision=REVISION)

    def edit(cfg: dict[str, Any]) -> None:
        cfg["services"]["authz_transport"] = request.param
        cfg["providers"][0]["region"] = "eu"
        cfg["policy"].pop("dir", None)
        cfg["policy"]["bundle"] = {"path": str(bundle)}

    with running_gateway(tmp, edit) as g:
        yield g


def _row(dsn: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        while True:
            row = conn.execute("SELECT * FROM request_log WHERE request_id = %s", (request_id,)).fetchone()
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no request_log row for {request_id}"
            time.sleep(0.05)


def _decision(dsn: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        while True:
            row = conn.execute("SELECT * FROM policy_decisions WHERE request_id = %s", (request_id,)).fetchone()
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no policy decision for {request_id}"
            time.sleep(0.05)


def _cost(u: anthropic.types.Usage) -> float:
    split = u.cache_creation
    w5 = split.ephemeral_5m_input_tokens if split else 0
    w1 = split.ephemeral_1h_input_tokens if split else 0
    return (u.input_tokens * PRICE["input"] + u.output_tokens * PRICE["output"] + w5 * PRICE["w5"]
            + w1 * PRICE["w1"] + (u.cache_read_input_tokens or 0) * PRICE["read"])


def _cached_prompt(tag: str) -> list[dict[str, Any]]:
    # Two cache breakpoints, one of each lifetime: the emulator reports writes split by lifetime.
    return [{"type": "text", "text": f"{tag} policy manual " * 400, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": f"{tag} style guide " * 400, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]


def _check_served(row: dict[str, Any], dsn: str, key_id: str, usage: anthropic.types.Usage, model: str,
                  stream: bool) -> None:
    decision = _decision(dsn, row["request_id"])
    assert decision["allow"] is True
    assert row["decision_id"] == decision["decision_id"] and row["decision_id"].startswith("dec_")
    assert row["bundle_revision"] == decision["bundle_revision"] == REVISION
    assert (row["principal_id"], row["key_id"], row["principal_kind"]) == (key_id, key_id, "key")
    assert row["principal"] == "audit-row-e2e"
    assert row["groups"] == ["default", "auditors"] and row["tenant"] == "acme"
    assert row["spiffe_id"] is None  # an API key over plain HTTP: no client certificate
    assert row["source_address"] == "127.0.0.1"
    assert row["endpoint"] == "messages.create" and row["model"] == SONNET
    assert row["model_served"] == model == SONNET  # the emulator names the model it served
    assert (row["provider"], row["region"]) == ("anthropic", "eu")
    assert row["upstream_cluster"] == "provider_anthropic" and row["attempts"] == 1
    assert (row["status"], row["error_type"], row["error_kind"]) == (200, None, None)
    assert row["ratelimit"] == "ok"
    assert row["usage_status"] == "complete"
    split = usage.cache_creation
    assert split is not None
    assert (row["input_tokens"], row["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert row["cache_read_input_tokens"] == usage.cache_read_input_tokens
    assert row["cache_creation_input_tokens"] == usage.cache_creation_input_tokens
    assert (row["cache_write_5m_tokens"], row["cache_write_1h_tokens"]) == (
        split.ephemeral_5m_input_tokens, split.ephemeral_1h_input_tokens)
    assert row["cache_write_5m_tokens"] > 0 and row["cache_write_1h_tokens"] > 0, "the prompt wrote both caches"
    expected = _cost(usage)
    assert expected > 0 and expected <= row["cost_micro_usd"] < expected + 1  # exact, rounded up to a micro-USD
    assert 0 < row["ttft_ms"] <= row["latency_ms"]
    if stream:
        # The client got the stream's first event well before its end (the emulator paces tokens).
        assert row["ttft_ms"] < row["latency_ms"] * 0.8, (row["ttft_ms"], row["latency_ms"])


def test_rows_of_an_unstreamed_a_streamed_and_a_denied_request(gw: Gateway) -> None:
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    rec, key = create_key(dsn, "audit-row-e2e", ["default", "auditors"], tenant="acme")
    tag = uuid.uuid4().hex[:8]
    # A client-sent identity or audit header changes nothing in the row.
    c = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, default_headers={
        "x-ccr-principal-id": "mallory", "x-forwarded-for": "203.0.113.9", "x-ccr-provider": "evil"})

    raw = c.messages.with_raw_response.create(model=SONNET, max_tokens=32, system=_cached_prompt(tag),
                                              messages=[{"role": "user", "content": "hi"}])
    msg = raw.parse()
    rid = raw.headers["x-request-id"]
    _check_served(_row(dsn, rid), dsn, rec.id, msg.usage, msg.model, stream=False)

    with c.messages.stream(model=SONNET, max_tokens=64, system=_cached_prompt(tag + "s"),
                           messages=[{"role": "user", "content": "hello"}],
                           extra_headers={"x-emulator-tokens-per-second": "400"}) as s:
        final = s.get_final_message()
        srid = s.response.headers["x-request-id"]
    _check_served(_row(dsn, srid), dsn, rec.id, final.usage, final.model, stream=True)

    # Denied by the policy (the group may use only haiku models): who asked, why, under which bundle.
    _, limited = create_key(dsn, "audit-row-contractor", ["contractors"], tenant="acme")
    d = anthropic.Anthropic(base_url=gw.url, api_key=limited, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        d.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    drid = e.value.response.headers["x-request-id"]
    row = _row(dsn, drid)
    decision = _decision(dsn, drid)
    assert decision["allow"] is False
    assert row["decision_id"] == decision["decision_id"] and row["decision_id"] in e.value.message
    assert row["bundle_revision"] == REVISION
    assert (row["status"], row["error_type"], row["error_kind"]) == (403, "permission_error", "denied")
    assert row["principal"] == "audit-row-contractor" and row["principal_kind"] == "key"
    assert row["groups"] == ["contractors"] and row["tenant"] == "acme"
    assert row["model"] == SONNET and row["endpoint"] == "messages.create"
    assert (row["provider"], row["region"], row["model_served"], row["upstream_cluster"]) == (None, None, None, None)
    assert row["attempts"] is None and row["ratelimit"] == "not_checked"
    assert row["usage_status"] == "not_forwarded" and row["input_tokens"] is None
    assert row["cost_micro_usd"] == 0
    assert row["source_address"] == "127.0.0.1"

    # Unauthenticated: nobody to name, still a decision and an error type.
    bad = anthropic.Anthropic(base_url=gw.url, api_key="sk-ccr-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e2:
        bad.messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    row = _row(dsn, e2.value.response.headers["x-request-id"])
    assert (row["status"], row["error_type"], row["error_kind"]) == (401, "authentication_error", "denied")
    assert row["principal_id"] is None and row["decision_id"] is not None and row["ratelimit"] == "not_checked"


def test_new_rows_are_covered_by_the_chain(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """The chain a receiver registers covers the new columns, and `ccr audit verify` passes."""
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    with psycopg.connect(dsn) as conn:
        covers = [cols for (cols,) in conn.execute(
            "SELECT columns FROM audit_chains WHERE log_table = 'request_log'")]
    assert covers and all({"cost_micro_usd", "decision_id", "groups", "ratelimit"} <= set(c) for c in covers)
    capsys.readouterr()
    code = main(["audit", "verify", "-c", str(gw.config_path)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("OK: "), out


def test_a_changed_new_column_is_caught(gw: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    """Editing one of the new columns in place (as the owner, trigger off) is named by verify."""
    assert gw.runtime is not None
    dsn = gw.runtime.postgres_dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        (rid, request_id) = conn.execute("SELECT id, request_id FROM request_log WHERE cost_micro_usd > 0"
                                         " ORDER BY id LIMIT 1").fetchone() or (None, None)
        assert rid is not None
        conn.execute("ALTER TABLE request_log DISABLE TRIGGER request_log_append_only")
        try:
            conn.execute("UPDATE request_log SET cost_micro_usd = 0 WHERE id = %s", (rid,))
        finally:
            conn.execute("ALTER TABLE request_log ENABLE TRIGGER request_log_append_only")
    capsys.readouterr()
    code = main(["audit", "verify", "-c", str(gw.config_path)])
    out = capsys.readouterr().out
    assert code == 1 and f"request_id={request_id!r}" in out and "content changed" in out, out


