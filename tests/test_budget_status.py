"""Current spend per budget: `ccr budgets list|status` and the ratelimit service's ccr_budget_* gauges,
against the real rate limit service, Redis and PostgreSQL. Reservations in flight (Redis counter minus
ledger), settled spend (ledger), cap, reset; per-seat budgets stay one series each."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
import yaml
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ccr import db
from ccr.budget_usage import budget_usage
from ccr.budgets import Budget, Period, SubjectKind, set_budget, window
from ccr.cli import main
from ccr.contract import READY_METRICS
from tests.harness import create_database, running_service
from tests.test_spend_admission import CONFIG, W, _settle, _settlement, spend_req

REPO = Path(__file__).resolve().parent.parent
OK = rls_pb2.RateLimitResponse.OK


@pytest.fixture(scope="module")
def dsn(postgres_server: dict[str, object]) -> str:
    d = create_database(str(postgres_server["admin_dsn"]), "bstatus")
    db.migrate(d)
    return d


def _ledger(dsn: str, rid: str, principal: str, groups: list[str], cost: int) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO spend_ledger (request_id, ts, principal_id, principal_kind, key_id, groups, "
                     "status, cost_micro_usd, reserved_micro_usd) VALUES (%s, now(), %s, 'key', %s, %s, 200, %s, %s)",
                     (rid, principal, principal, groups, cost, W))


def _scrape(address: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("ccr_budget_"):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_spent_reserved_cap_and_reset_in_the_cli_and_as_metrics(tmp_path: Path, dsn: str, redis_url: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    pool = Budget(f"pool-{group}", SubjectKind.GROUP, group, Period.DAY, 10 * W, scope="shared")
    seat = Budget(f"seat-{group}", SubjectKind.GROUP, group, Period.MONTH, 3 * W, scope="per_seat")
    with psycopg.connect(dsn) as conn:
        set_budget(conn, pool, "test")
        set_budget(conn, seat, "test")
    (tmp_path / "rl").mkdir()
    with running_service("ratelimit", tmp_path / "rl", CONFIG, redis_url=redis_url, postgres_dsn=dsn) as svc, \
            grpc.insecure_channel(str(svc.info["address"])) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        alice = []
        for _ in range(3):
            rid = uuid.uuid4().hex
            resp = stub.ShouldRateLimit(spend_req(W, principal="alice", groups=(group,), rid=rid), timeout=10)
            assert resp.overall_code == OK
            alice.append((rid, resp))
        assert stub.ShouldRateLimit(spend_req(W, principal="bob", groups=(group,)), timeout=10).overall_code == OK
        # One of alice's requests completes: ledger row, then settlement to 40% of its worst case.
        rid, resp = alice[0]
        _ledger(dsn, rid, "alice", [group], 4 * W // 10)
        _settle(redis_url, [_settlement(rid, resp, 4 * W // 10)])

        # Shared pool: counter 0.4 + 2 (alice in flight) + 1 (bob in flight); ledger 0.4; reserved 3.
        # Per seat: the seat nearest its cap is alice's (2.4 of 3); bob has no ledger row yet.
        got = _scrape(str(svc.info[READY_METRICS]))
        p = (("budget", pool.name), ("period", "day"))
        s = (("budget", seat.name), ("period", "month"))
        assert got["ccr_budget_limit_usd"] == {p: 10.0, s: 3.0}
        assert got["ccr_budget_spend_usd"] == {p: 0.4, s: 0.4}
        assert got["ccr_budget_reserved_usd"] == {p: 3.0, s: 2.0}
        assert got["ccr_budget_used_ratio"][p] == pytest.approx(0.34)
        assert got["ccr_budget_used_ratio"][s] == pytest.approx(2.4 / 3)
        assert got["ccr_budget_seats"] == {s: 1.0}  # per-seat only
        now = time.time()
        assert got["ccr_budget_period_end_timestamp_seconds"][p] == window(Period.DAY, "UTC", now).end
        assert got["ccr_budget_period_end_timestamp_seconds"][s] == window(Period.MONTH, "UTC", now).end
        # Bounded cardinality: one series per budget and gauge, no principal in any label.
        for series in got.values():
            for labels in series:
                assert {k for k, _ in labels} == {"budget", "period"}
                assert all("alice" not in v and "bob" not in v for _, v in labels)

    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"].update(data_dir=str(tmp_path / "data"), postgres_dsn=dsn, redis_url=redis_url)
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-c", str(path), "budgets", "list", "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    r = rows[pool.name]
    assert (r["spent_micro_usd"], r["reserved_micro_usd"], r["counter_micro_usd"], r["amount_micro_usd"]) == (
        4 * W // 10, 3 * W, 34 * W // 10, 10 * W)
    today = datetime.now(UTC).date().isoformat()
    assert (r["used"], r["left_usd"], r["current_period"]) == ("34.0%", "6.600000", today)
    r = rows[seat.name]
    assert (r["seat"], r["seats"], r["spent_micro_usd"], r["reserved_micro_usd"], r["used"]) == (
        "alice", 1, 4 * W // 10, 2 * W, "80.0%")
    # `status NAME`: the table for one budget, with its reserved and reset columns.
    assert main(["-c", str(path), "budgets", "status", pool.name]) == 0
    header, line = capsys.readouterr().out.splitlines()
    cols = dict(zip(header.split(), line.split(), strict=True))
    assert (cols["name"], cols["spent_usd"], cols["reserved_usd"], cols["left_usd"]) == (
        pool.name, "0.400000", "3.000000", "6.600000")
    assert cols["resets_at"] == datetime.fromtimestamp(window(Period.DAY, "UTC", time.time()).end, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_without_redis_the_status_is_the_ledger_and_reserved_is_unknown(tmp_path: Path, dsn: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    b = Budget(f"pool-{group}", SubjectKind.GROUP, group, Period.DAY, 2 * W, scope="shared")
    _ledger(dsn, uuid.uuid4().hex, "carol", [group], W // 2)
    with psycopg.connect(dsn) as conn:
        u = budget_usage(conn, b, "UTC", time.time())
        set_budget(conn, b, "test")
    assert (u.spent, u.counter, u.reserved, u.used) == (W // 2, None, None, W // 2)
    # The CLI with a Redis that does not answer: the ledger's figures, reserved unknown, said once.
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"].update(data_dir=str(tmp_path / "data"), postgres_dsn=dsn, redis_url="redis://127.0.0.1:1/0")
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-c", str(path), "budgets", "status", b.name, "--format", "json"]) == 0
    out = capsys.readouterr()
    (row,) = json.loads(out.out)["rows"]
    assert (row["spent_micro_usd"], row["reserved_micro_usd"], row["used"]) == (W // 2, None, "25.0%")
    assert out.err.count("counters not readable") == 1
