"""Spend path throughput: ledger rows/s into PostgreSQL, reservations and settlements/s on Redis.

    .venv/bin/python bench/spend_ledger.py --duration 2
    .venv/bin/python bench/spend_ledger.py --dsn postgresql://... --redis-url redis://...

Without --dsn / --redis-url it starts an embedded PostgreSQL and Redis under a temporary directory.
Reports:
- ledger: rows/s the access-log receiver's LedgerWriter commits with the producer never waiting
  (the gateway's ceiling is ~800 req/s, so the ledger must stay above that), and the queue left
  after a paced run at --rate rows/s (0 = it keeps up);
- reserve: SpendGate decisions/s and p50/p99 (in-process, three budgets per request), with the Redis
  round trips per decision counted from Redis's own command stats;
- settle: Settler settlements/s (one EVALSHA each).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
import redis  # noqa: E402
from _common import database  # noqa: E402
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: E402
from envoy.service.ratelimit.v3 import rls_pb2  # noqa: E402

from audit.ledger import LEDGER_COLUMNS, LedgerWriter, Settlement, Settler, Spool  # noqa: E402
from ccr.budgets import Budget, Facts, Period, SubjectKind, set_budget, spend_facts_json  # noqa: E402
from ccr.config import SpendSettings  # noqa: E402
from ccr.contract import SPEND_COUNTERS, SPEND_DOMAIN, SPEND_RESERVED  # noqa: E402
from ratelimit.spend import BudgetSource, SpendGate  # noqa: E402


def _row(i: int, run: str) -> tuple:
    vals = {"request_id": f"{run}-{i}", "ts": datetime.now(UTC), "principal_id": f"key_{i % 50}",
            "principal": "bench", "principal_kind": "key", "key_id": f"key_{i % 50}", "tenant": "acme",
            "groups": ["eng"], "spiffe_id": None, "model": "claude-sonnet-4-6", "endpoint": "messages.create",
            "status": 200, "usage_status": "complete", "input_tokens": 2000, "output_tokens": 300,
            "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 0, "cache_read_tokens": 0, "batch": False,
            "cost_micro_usd": 10_500, "reserved_micro_usd": 90_000}
    return tuple(vals[c] for c in LEDGER_COLUMNS)


async def ledger_rate(dsn: str, spool: Path, seconds: float, rate: float) -> tuple[float, int]:
    """(rows/s committed unpaced, queue depth after a paced run at `rate`)."""
    w = LedgerWriter(dsn, Spool(spool))
    w.start()
    run = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        await w.put(_row(i, run))
        i += 1
    await w.flush()
    unpaced = w.written / (time.perf_counter() - t0)
    # Paced: `rate` rows/s, as a gateway at that many requests/s would produce.
    run = uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    n = 0
    while (el := time.perf_counter() - t0) < seconds:
        due = int(el * rate)
        while n < due:
            await w.put(_row(n, run))
            n += 1
        await asyncio.sleep(0.001)
    depth = w._queue.qsize()
    await w.stop()
    assert w.spooled == 0, "rows were spooled: PostgreSQL refused writes during the bench"
    return unpaced, depth


def reserve_rate(dsn: str, url: str, seconds: float) -> tuple[list[float], float, float, list[tuple[str, object]]]:
    r = redis.Redis.from_url(url)
    tag = uuid.uuid4().hex[:6]
    with psycopg.connect(dsn) as conn:
        for b in (Budget(f"t-{tag}", SubjectKind.TENANT, f"acme-{tag}", Period.MONTH, 10**15, scope="shared"),
                  Budget(f"g-{tag}", SubjectKind.GROUP, f"eng-{tag}", Period.DAY, 10**15, scope="per_seat"),
                  Budget(f"k-{tag}", SubjectKind.KEY, f"key-{tag}", Period.WEEK, 10**15)):
            set_budget(conn, b, "bench")
    src = BudgetSource(dsn, 3600)
    src.load_once()
    gate = SpendGate(r, dsn, SpendSettings(), src)
    facts = spend_facts_json(90_000, Facts(f"key-{tag}", "key", f"key-{tag}", (f"eng-{tag}",), f"acme-{tag}"), "m")

    def req() -> tuple[str, rls_pb2.RateLimitRequest]:
        rid = uuid.uuid4().hex
        d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "spend", "value": facts},
                                                       {"key": "request_id", "value": rid}])
        return rid, rls_pb2.RateLimitRequest(domain=SPEND_DOMAIN, descriptors=[d])

    gate.decide(req()[1])  # warm: counters built from the ledger, script loaded
    before = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    lat: list[float] = []
    done: list[tuple[str, object]] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rid, q = req()
        s = time.perf_counter()
        resp = gate.decide(q)
        lat.append(time.perf_counter() - s)
        done.append((rid, resp))
    wall = time.perf_counter() - t0
    calls = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) - before
    return lat, wall, calls / len(lat), done


async def settle_rate(url: str, done: list[tuple[str, object]]) -> float:
    s = Settler(url, [80, 90, 100], None)
    items = []
    for rid, resp in done:
        md = resp.dynamic_metadata.fields  # type: ignore[attr-defined]
        counters = [dict(v.struct_value) for v in md[SPEND_COUNTERS].list_value.values]
        items.append(Settlement(rid, 10_500, int(md[SPEND_RESERVED].number_value), counters))
    t0 = time.perf_counter()
    for x in items:
        await s._settle(x)
    wall = time.perf_counter() - t0
    await s.stop()
    return len(items) / wall


def _pct(lat: list[float], q: float) -> float:
    xs = sorted(lat)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn")
    ap.add_argument("--redis-url")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=800.0, help="paced ledger rows/s (the gateway's ceiling)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-spend-") as tmp:
        run = Path(tmp)
        redis_child = None
        url = args.redis_url
        if url is None:
            from ccr.localservers import start_redis

            redis_child = start_redis(run / "redis", run / "logs")
            url = str(redis_child.info["url"])
        try:
            with database(run, args.dsn) as dsn:
                unpaced, depth = asyncio.run(ledger_rate(dsn, run / "spool", args.duration, args.rate))
                print(f"ledger   {unpaced:8.0f} rows/s committed (unpaced); queue after {args.rate:.0f} rows/s "
                      f"for {args.duration:g}s: {depth}")
                lat, wall, trips, done = reserve_rate(dsn, url, args.duration)
                print(f"reserve  n={len(lat):>6}  p50={statistics.median(lat) * 1e6:7.1f} us  "
                      f"p99={_pct(lat, 0.99):7.1f} us  {len(lat) / wall:7.0f} decisions/s  "
                      f"redis round trips/decision={trips:.2f} (3 budgets)")
                print(f"settle   {asyncio.run(settle_rate(url, done)):8.0f} settlements/s")
        finally:
            if redis_child is not None:
                redis_child.stop()


if __name__ == "__main__":
    main()
