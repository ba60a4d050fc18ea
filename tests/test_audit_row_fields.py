"""The audit row's detail columns (audit/entry.py DETAIL_COLUMNS) from Envoy entries: each outcome the
gateway can reach, and what is never taken from a client header."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from audit.entry import COLUMNS, DETAIL_COLUMNS, MalformedEntry, RowFacts, entry_to_row
from audit.spool import Spool
from ccr.config import GatewayConfig
from tests.test_audit import entry

CONFIG = yaml.safe_load("""
version: 1
providers:
  - {name: anthropic, region: us}
  - {name: bedrock-eu, kind: bedrock, region: eu-west-1, endpoint: https://bedrock.example,
     aws_access_key_id_env: A, aws_secret_access_key_env: B}
models:
  - {match: "claude-sonnet-*", provider: anthropic, price: {input: 3, output: 15, cache_write: 3.75,
     cache_write_1h: 6, cache_read: 0.3}}
""")
FACTS = RowFacts(GatewayConfig.model_validate(CONFIG))


def row(e: Any, facts: RowFacts | None = FACTS) -> dict[str, Any]:
    r = entry_to_row(e, facts)
    assert r is not None
    return dict(zip(COLUMNS, r, strict=True))


def authz(e: Any, **fields: Any) -> Any:
    e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(fields)
    return e


def test_a_metered_request_costs_its_usage_at_the_configured_prices() -> None:
    usage = {"input_tokens": 1000, "output_tokens": 200, "cache_creation_input_tokens": 300,
             "cache_read_input_tokens": 50, "cache_creation_5m_input_tokens": 100,
             "cache_creation_1h_input_tokens": 100, "usage_status": "complete"}
    e = authz(entry("r1", usage=usage), principal_id="key_01", principal_kind="key", groups=["a", "b"],
              tenant="acme", decision_id="dec_1", bundle_revision="r9", endpoint="messages.create")
    e.common_properties.upstream_request_attempt_count = 1
    e.common_properties.time_to_first_downstream_tx_byte.FromTimedelta(timedelta(milliseconds=120))
    r = row(e)
    # 100 of the 300 writes were not split: listed (and priced) as 1-hour writes, as the ledger does.
    assert (r["cache_write_5m_tokens"], r["cache_write_1h_tokens"]) == (100, 200)
    assert r["cost_micro_usd"] == 1000 * 3 + 200 * 15 + 100 * 3.75 + 200 * 6 + 50 * 0.3 == 7590
    assert (r["provider"], r["region"], r["model_served"], r["attempts"]) == ("anthropic", "us", "claude-sonnet-4-5", 1)
    assert (r["principal_id"], r["principal_kind"], r["groups"], r["tenant"]) == ("key_01", "key", ["a", "b"], "acme")
    assert (r["decision_id"], r["bundle_revision"], r["ratelimit"], r["error_kind"]) == ("dec_1", "r9", "ok", None)
    assert r["ttft_ms"] == 120.0 and r["source_address"] is None  # the entry sets the XFF-derived address only


def test_the_source_is_the_connection_peer_never_a_forwarded_header() -> None:
    e = entry("r2")
    e.common_properties.downstream_direct_remote_address.socket_address.address = "192.0.2.7"
    e.request.request_headers["x-forwarded-for"] = "203.0.113.9"
    e.common_properties.downstream_remote_address.socket_address.address = "203.0.113.9"  # what XFF would give
    assert row(e)["source_address"] == "192.0.2.7"


def test_the_served_provider_comes_from_the_host_tag_and_names_its_model_spelling() -> None:
    e = authz(entry("r3", cluster="chain_claude-sonnet"), provider="anthropic")
    e.common_properties.custom_tags["ccr.served_provider"] = "bedrock-eu"
    e.common_properties.upstream_request_attempt_count = 2
    r = row(e)
    assert (r["provider"], r["region"], r["attempts"]) == ("bedrock-eu", "eu-west-1", 2)
    assert r["model_served"] == "anthropic.claude-sonnet-4-5-v1:0"
    e.common_properties.custom_tags["ccr.served_provider"] = "not-configured"
    assert row(e)["provider"] is None  # an unknown name is not invented into the row


@pytest.mark.parametrize(("status", "flags", "upstream", "kind", "err", "rl"), [
    (429, {"rate_limited": True}, False, "rate_limited", "rate_limit_error", "over_limit"),
    (402, {"rate_limited": True}, False, "budget", "billing_error", "budget"),
    (500, {"rate_limit_service_error": True}, False, "gateway", "api_error", "error"),
    (529, {}, True, "upstream", "overloaded_error", "ok"),
    (400, {}, True, "client", "invalid_request_error", "ok"),
    (503, {"no_healthy_upstream": True}, False, "gateway", "api_error", "ok"),
])
def test_each_outcome_has_its_error_and_rate_limit_columns(status: int, flags: dict[str, bool], upstream: bool,
                                                         kind: str, err: str, rl: str) -> None:
    e = authz(entry(f"r-{status}", status=status, flags=flags, upstream=upstream), principal_id="key_01")
    if upstream:
        e.common_properties.time_to_first_upstream_rx_byte.FromTimedelta(timedelta(milliseconds=9))
    r = row(e)
    assert (r["error_kind"], r["error_type"], r["ratelimit"]) == (kind, err, rl)
    if not upstream:
        assert r["cost_micro_usd"] == 0 and r["model_served"] is None  # nothing was forwarded


def test_a_refusal_takes_extauths_error_type_and_was_not_rate_checked() -> None:
    e = authz(entry("r5", status=403, upstream=False),
              principal_id="key_01", error_type="permission_error", decision_id="dec_2")
    e.common_properties.response_flags.unauthorized_details.reason = 1  # EXTERNAL_SERVICE: Envoy's UAEX
    r = row(e)
    assert (r["error_kind"], r["error_type"], r["ratelimit"], r["decision_id"]) == (
        "denied", "permission_error", "not_checked", "dec_2")


def test_malformed_groups_are_refused_not_guessed() -> None:
    with pytest.raises(MalformedEntry, match="groups"):
        entry_to_row(authz(entry("r6"), groups="admins"), FACTS)


def test_rows_spooled_before_migration_11_are_written_with_the_new_columns_empty(
        postgres_dsn: str, tmp_path: Path) -> None:
    """An older receiver's spool (rows of the old width) is replayed by a new one."""
    import psycopg

    from audit.writer import RequestLogWriter

    full = entry_to_row(entry("spooled-old-width-" + tmp_path.name[-8:]), FACTS)
    assert full is not None
    old = full[:len(COLUMNS) - len(DETAIL_COLUMNS)]  # migration 11's columns missing
    spool = Spool(tmp_path / "spool", "old-chain", 1024 * 1024)
    spool.open()
    spool.append([old])

    async def run() -> None:
        w = RequestLogWriter(postgres_dsn, spool=spool)
        w.start()
        await w.flush()
        for _ in range(200):
            if spool.empty():
                break
            await asyncio.sleep(0.05)
        await w.stop()

    asyncio.run(run())
    with psycopg.connect(postgres_dsn) as conn:
        got = conn.execute("SELECT status, provider, cost_micro_usd FROM request_log WHERE request_id = %s",
                           (full[1],)).fetchone()
    assert got == (200, None, None)
