"""The audit side of spend: ledger rows, settlement of reservations, threshold webhooks, the spool.

A real audit process (gRPC ALS), real PostgreSQL and Redis, a real local HTTP server as the webhook.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc

from ccr import db
from ccr.budgets import Budget, Facts, Period, SubjectKind, counter_key, set_budget, spend_facts_json, window
from ccr.config import SpendSettings
from ccr.contract import AUTHZ_NS, AUTHZ_SPEND, RATELIMIT_NS, USAGE_NS
from ccr.procs import Child, wait_until
from ratelimit.spend import BudgetSource, SpendGate
from tests.harness import create_database, running_service
from tests.test_audit import messages
from tests.test_spend_admission import spend_req

NOW = datetime.now(UTC)


class Hook:
    """A webhook receiver on a free loopback port, recording every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers["content-length"])
                hook.posts.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/budget-alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def dsn(postgres_server: dict[str, object]) -> str:
    d = create_database(str(postgres_server["admin_dsn"]), "ledger")
    db.migrate(d)
    return d


def config(webhook: str | None = None) -> str:
    hook = f", webhook_url: {webhook!r}" if webhook else ""
    return f"""
version: 1
providers: [{{name: anthropic}}]
models: [{{match: "claude-*", provider: anthropic,
          price: {{input: 3, output: 15, cache_write: 3.75, cache_write_1h: 6, cache_read: 0.3}}}}]
storage: {{data_dir: data}}
spend: {{alert_thresholds: [80, 90, 100]{hook}}}
"""


def entry(rid: str, principal_id: str, *, usage: dict[str, Any] | None, reservation: Any = None,
          tenant: str | None = None, endpoint: str = "messages.create", spend: str | None = None,
          upstream: bool = True) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.access_log_type = accesslog_pb2.DownstreamEnd
    c.start_time.FromDatetime(NOW)
    c.time_to_last_downstream_tx_byte.FromTimedelta(timedelta(milliseconds=50))
    if upstream:
        c.time_to_first_upstream_tx_byte.FromTimedelta(timedelta(milliseconds=4))
    authz: dict[str, Any] = {"principal": "svc", "principal_id": principal_id, "principal_kind": "key",
                             "key_id": principal_id, "groups": ["eng", "ops"], "model": "claude-sonnet-4-5",
                             "endpoint": endpoint}
    if tenant:
        authz["tenant"] = tenant
    if spend:
        authz[AUTHZ_SPEND] = spend
    c.metadata.filter_metadata[AUTHZ_NS].update(authz)
    if usage is not None:
        c.metadata.filter_metadata[USAGE_NS].update(usage)
    if reservation is not None:
        c.metadata.filter_metadata[RATELIMIT_NS].CopyFrom(reservation)
    e.request.request_id = rid
    e.request.path = "/v1/messages"
    e.response.response_code.value = 200
    return e


def send(child: Child, entries: list[accesslog_pb2.HTTPAccessLogEntry]) -> None:
    with grpc.insecure_channel(str(child.info["address"])) as ch:
        als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(messages(entries, 2), timeout=60)


def ledger(dsn: str, principal_id: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM spend_ledger WHERE principal_id = %s", (principal_id,))
        return {r["request_id"]: r for r in cur.fetchall()}


def complete(inp: int, out: int, **extra: int) -> dict[str, Any]:
    return {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": extra.get("w", 0),
            "cache_read_input_tokens": extra.get("r", 0), "usage_status": "complete",
            **({"cache_creation_5m_input_tokens": extra["w5"], "cache_creation_1h_input_tokens": extra["w1"]}
               if "w5" in extra else {})}


def test_ledger_rows_settlement_and_threshold_alerts(tmp_path: Path, dsn: str, redis_url: str, hook: Hook) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    b = Budget(f"b{uuid.uuid4().hex[:8]}", SubjectKind.KEY, key, Period.DAY, 1_000_000, mode="soft")
    with psycopg.connect(dsn) as conn:
        set_budget(conn, b, "test")
    source = BudgetSource(dsn, 60)
    source.load_once()
    r = redis.Redis.from_url(redis_url)
    gate = SpendGate(r, dsn, SpendSettings(), source)
    counter = counter_key(b, "", window(Period.DAY, "UTC", float(r.time()[0])))

    with running_service("audit", tmp_path, config(hook.url), postgres_dsn=dsn, redis_url=redis_url) as audit:
        sent = []
        # 84%, then 93%, then 100.5% of the $1 budget: each threshold crossed once, in order.
        for i, usage in enumerate([complete(0, 56_000), complete(10_000, 4_000), complete(0, 5_000)]):
            rid = f"{key}-{i}"
            resv = gate.decide(spend_req(2_000_000, principal=key, rid=rid)).dynamic_metadata
            assert int(r.get(counter)) >= 2_000_000  # type: ignore[arg-type]  # reserved while in flight
            e = entry(rid, key, usage=usage, reservation=resv)
            send(audit, [e])
            sent.append(e)
        assert int(r.get(counter)) == 840_000 + 90_000 + 75_000  # type: ignore[arg-type]
        wait_until(audit, lambda: len(hook.posts) >= 3, 15, "three webhook alerts")
        assert [p["threshold_percent"] for p in hook.posts] == [80, 90, 100]
        assert hook.posts[0]["budget"] == b.name and hook.posts[0]["cap_usd"] == "1.000000"
        assert hook.posts[2]["spent_micro_usd"] == 1_005_000

        # Envoy re-sends the same entries (a retried stream): nothing moves, no row is doubled.
        send(audit, sent)
        assert int(r.get(counter)) == 1_005_000  # type: ignore[arg-type]
        rows = ledger(dsn, key)
        assert [rows[f"{key}-{i}"]["cost_micro_usd"] for i in range(3)] == [840_000, 90_000, 75_000]
        assert rows[f"{key}-0"]["reserved_micro_usd"] == 2_000_000

        # Cache writes by lifetime, reads, an unreadable usage (charged its worst case), a
        # count_tokens-like reply (not billable: 0), and a refused request (never forwarded: 0).
        worst = spend_facts_json(777, Facts(key, "key", key), "claude-sonnet-4-5")
        send(audit, [
            entry(f"{key}-cache", key, usage=complete(10, 10, w=300, w5=200, w1=100, r=1000)),
            entry(f"{key}-unknown", key, usage={"usage_status": "unknown", "input_tokens": None}, spend=worst),
            entry(f"{key}-free", key, usage={**complete(0, 0), "usage_status": "not_billable"}),
            entry(f"{key}-refused", key, usage=None, upstream=False),
        ])
        rows = ledger(dsn, key)
        assert rows[f"{key}-cache"]["cost_micro_usd"] == 30 + 150 + 750 + 600 + 300
        cache = rows[f"{key}-cache"]
        assert (cache["cache_write_5m_tokens"], cache["cache_write_1h_tokens"]) == (200, 100)
        assert rows[f"{key}-unknown"]["cost_micro_usd"] == 777
        assert rows[f"{key}-free"]["cost_micro_usd"] == 0
        refused = rows[f"{key}-refused"]
        assert refused["cost_micro_usd"] == 0 and refused["usage_status"] == "not_forwarded"
        assert rows[f"{key}-0"]["groups"] == ["eng", "ops"]
    assert len(hook.posts) == 3


def test_a_failed_ledger_write_is_spooled_durably_and_replayed(tmp_path: Path, dsn: str, redis_url: str) -> None:
    key = f"key_{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "data" / "spool"
    with psycopg.connect(dsn, autocommit=True) as admin:
        with running_service("audit", tmp_path, config(), postgres_dsn=dsn, redis_url=redis_url) as audit:
            send(audit, [entry(f"{key}-before", key, usage=complete(1, 1))])
            admin.execute("ALTER TABLE spend_ledger RENAME TO spend_ledger_away")  # PostgreSQL refuses writes
            # The stream is answered (not held), its rows are on disk.
            send(audit, [entry(f"{key}-during{i}", key, usage=complete(1, 1)) for i in range(5)])
            files = sorted(spool.glob("ledger-*.jsonl"))
            assert files, "nothing spooled"
            spooled = [json.loads(line)["request_id"] for f in files for line in f.read_text().splitlines()]
            assert sorted(spooled) == [f"{key}-during{i}" for i in range(5)]
        # The audit process stopped with PostgreSQL still refusing: the spool survives the restart.
        assert sorted(spool.glob("ledger-*.jsonl")) == files
        admin.execute("ALTER TABLE spend_ledger_away RENAME TO spend_ledger")
        with running_service("audit", tmp_path, config(), postgres_dsn=dsn, redis_url=redis_url) as audit:
            wait_until(audit, lambda: len(ledger(dsn, key)) == 6, 20, "the spool to be replayed")
            wait_until(audit, lambda: not list(spool.glob("ledger-*.jsonl")), 20, "the spool files to go")
    assert set(ledger(dsn, key)) == {f"{key}-before", *(f"{key}-during{i}" for i in range(5))}


def test_a_row_postgresql_refuses_never_blocks_its_batch(tmp_path: Path, dsn: str) -> None:
    import asyncio

    from audit.ledger import LEDGER_COLUMNS, LedgerWriter, Spool

    key = f"key_{uuid.uuid4().hex[:8]}"

    def row(rid: str, cost: int) -> tuple[Any, ...]:
        vals = {c: None for c in LEDGER_COLUMNS}
        vals.update(request_id=rid, ts=NOW, principal_id=key, groups=[], status=200, batch=False,
                    cost_micro_usd=cost)
        return tuple(vals[c] for c in LEDGER_COLUMNS)

    async def go() -> LedgerWriter:
        w = LedgerWriter(dsn, Spool(tmp_path / "spool"))
        w.start()
        for r in (row(f"{key}-a", 1), row(f"{key}-bad", -1), row(f"{key}-b", 2)):  # -1 breaks a CHECK
            await w.put(r)
        await w.stop()
        return w

    w = asyncio.run(go())
    assert set(ledger(dsn, key)) == {f"{key}-a", f"{key}-b"} and w.written == 2
    (rejected,) = (tmp_path / "spool").glob("rejected-*.jsonl")
    assert json.loads(rejected.read_text())["request_id"] == f"{key}-bad"
    assert not list((tmp_path / "spool").glob("ledger-*.jsonl"))  # nothing left to replay


def test_a_request_already_in_the_ledger_keeps_its_first_row(tmp_path: Path, dsn: str) -> None:
    """Batches go in by COPY after a look-up of the ids already there: a request id written by an
    earlier batch (or a spool replay) is skipped, and a repeat inside one batch keeps the first."""
    import asyncio

    from audit.ledger import LEDGER_COLUMNS, LedgerWriter, Spool

    key = f"key_{uuid.uuid4().hex[:8]}"

    def row(rid: str, cost: int) -> tuple[Any, ...]:
        vals = {c: None for c in LEDGER_COLUMNS}
        vals.update(request_id=rid, ts=NOW, principal_id=key, groups=["eng", "ops"], status=200, batch=False,
                    cost_micro_usd=cost)
        return tuple(vals[c] for c in LEDGER_COLUMNS)

    async def write(batch: list[tuple[Any, ...]]) -> None:
        w = LedgerWriter(dsn, Spool(tmp_path / "spool"))
        await w._write(batch)  # one batch, as the writer task hands it over
        assert w.spooled == 0
        if w._conn is not None:
            await w._conn.close()

    asyncio.run(write([row(f"{key}-a", 1)]))
    asyncio.run(write([row(f"{key}-a", 9), row(f"{key}-b", 2), row(f"{key}-b", 8)]))
    got = ledger(dsn, key)
    assert {r: v["cost_micro_usd"] for r, v in got.items()} == {f"{key}-a": 1, f"{key}-b": 2}
    assert got[f"{key}-b"]["groups"] == ["eng", "ops"]


def test_the_audit_writer_role_appends_ledger_rows_and_changes_nothing(tmp_path: Path, dsn: str) -> None:
    """Under `ccr up` the receiver writes the ledger as ccr_audit_writer (migration 10): its rows go in,
    directly and from the spool; it can neither change nor remove them, nor touch the budgets."""
    import asyncio

    from audit.ledger import LEDGER_COLUMNS, LedgerWriter, Spool
    from ccr.audit_role import audit_role_dsn

    role = audit_role_dsn(dsn, tmp_path / "audit.password")
    key = f"key_{uuid.uuid4().hex[:8]}"

    def row(rid: str) -> tuple[Any, ...]:
        vals = {c: None for c in LEDGER_COLUMNS}
        vals.update(request_id=rid, ts=NOW, principal_id=key, groups=["eng"], status=200, batch=False,
                    cost_micro_usd=7)
        return tuple(vals[c] for c in LEDGER_COLUMNS)

    async def go() -> LedgerWriter:
        w = LedgerWriter(role, Spool(tmp_path / "spool"))
        w.start()
        for r in (row(f"{key}-a"), row(f"{key}-b"), row(f"{key}-a")):  # a repeat is a no-op, not an error
            await w.put(r)
        await w.stop()
        return w

    w = asyncio.run(go())
    assert w.written == 3 and w.spooled == 0
    spool = Spool(tmp_path / "spool2")
    spool.write([row(f"{key}-c")])
    assert spool.replay(role) == 1
    assert set(ledger(dsn, key)) == {f"{key}-a", f"{key}-b", f"{key}-c"}
    with psycopg.connect(role, autocommit=True) as conn:
        for stmt in ("UPDATE spend_ledger SET cost_micro_usd = 0 WHERE principal_id = %(k)s",
                     "DELETE FROM spend_ledger WHERE principal_id = %(k)s",
                     "TRUNCATE spend_ledger",
                     "SELECT name FROM budgets",
                     "DELETE FROM budgets",
                     "INSERT INTO budgets (name, subject_kind, subject, period, amount_micro_usd, mode, scope,"
                     " on_redis_down) VALUES ('x', 'key', %(k)s, 'day', 0, 'hard', 'single', 'open')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(stmt, {"k": key})
    assert set(ledger(dsn, key)) == {f"{key}-a", f"{key}-b", f"{key}-c"}
