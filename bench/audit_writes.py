"""What the access-log receiver's writes cost PostgreSQL per request: request_log (hash-chained) and
spend_ledger rows in batches, as executemany (one INSERT execution per row, before) and as one COPY per
batch (after; the ledger also as one multi-row INSERT), alternated.

    .venv/bin/python bench/audit_writes.py [--rows 3000] [--batch 25] [--rounds 3] [--dsn postgresql://...]

Without --dsn an embedded PostgreSQL is started in a temp dir and stopped at the end; its CPU (the
server and its backends, from /proc) is the figure, with the writer's own (this process) beside it.
`--batch` is the rows per transaction: the gateway at ~500 req/s commits about 25 per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit import ledger  # noqa: E402
from audit.chain import CHAIN_COLUMNS, link_rows  # noqa: E402
from audit.writer import CHAIN_COVERS, TABLE, RequestLogWriter  # noqa: E402
from ccr import db  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
OLD_INSERT = sql.SQL("INSERT INTO request_log ({cols}) VALUES ({vals})").format(
    cols=sql.SQL(", ").join(map(sql.Identifier, (*CHAIN_COVERS, *CHAIN_COLUMNS))),
    vals=sql.SQL(", ").join([sql.Placeholder()] * (len(CHAIN_COVERS) + len(CHAIN_COLUMNS))))


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and every descendant (PostgreSQL forks a backend per connection)."""
    table: dict[int, tuple[int, float]] = {}
    for e in os.scandir("/proc"):
        if e.name.isdigit():
            try:
                stat = Path(f"/proc/{e.name}/stat").read_text()
            except OSError:
                continue
            f = stat.rpartition(")")[2].split()
            table[int(e.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / _TICK)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo.extend(p for p, (pp, _) in table.items() if pp == pid)
    return total


def request_row() -> tuple:
    return (datetime.now(UTC), str(uuid.uuid4()), "key_0123456789", "bench", "claude-sonnet-4-5", "POST",
            "/v1/messages", 200, 20000, 300, 0, 0, 3.2, "provider_anthropic", None, 83542, 5000, "complete", None,
            None)


def ledger_row() -> tuple:
    return (str(uuid.uuid4()), datetime.now(UTC), "key_0123456789", "bench", "api_key", "key_0123456789", None,
            ["default"], None, "claude-sonnet-4-5", "messages.create", 200, "complete", 20000, 300, 0, 0, 0, False,
            64500, None)


class ExecutemanyWriter(RequestLogWriter):
    """The writer as it was: the same dedupe and chain, then one INSERT execution per row."""

    async def _insert(self, conn, rows):  # type: ignore[no-untyped-def]
        assert self._head is not None
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT request_id FROM request_log WHERE request_id = ANY(%s)", ([r[1] for r in rows],))
            seen = {r[0] for r in await cur.fetchall()}
            fresh = [r for r in rows if r[1] not in seen]
            await cur.execute("SELECT nextval('request_log_id_seq') FROM generate_series(1, %s)", (len(fresh),))
            ids = [r[0] for r in await cur.fetchall()]
            linked, head = link_rows(TABLE, self.chain_id, CHAIN_COVERS, self._head,
                                     [(i, *r) for i, r in zip(ids, fresh, strict=True)])
            await cur.executemany(OLD_INSERT, linked)
        self._head = head
        self.written += len(fresh)


async def ledger_executemany(w: ledger.LedgerWriter, batch: list[tuple]) -> None:
    import psycopg

    if w._conn is None:
        w._conn = await psycopg.AsyncConnection.connect(w.dsn)
    async with w._conn.transaction(), w._conn.cursor() as cur:
        await cur.executemany(ledger.INSERT, batch)


_MARKS = f"({', '.join(['%s'] * len(ledger.LEDGER_COLUMNS))})"


async def ledger_multirow(w: ledger.LedgerWriter, batch: list[tuple]) -> None:
    """One INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING per batch (tried, not kept)."""
    q = (f"INSERT INTO spend_ledger ({', '.join(ledger.LEDGER_COLUMNS)}) VALUES {', '.join([_MARKS] * len(batch))}"
         " ON CONFLICT (request_id) DO NOTHING")
    assert w._conn is not None
    async with w._conn.transaction(), w._conn.cursor() as cur:
        await cur.execute(q, [v for r in batch for v in r])


async def measure(label: str, pg_pid: int, rows: int, batch: int, write) -> None:  # type: ignore[no-untyped-def]
    pg0, me0, t0 = tree_cpu(pg_pid), time.process_time(), time.perf_counter()
    for _ in range(rows // batch):
        await write(batch)
    wall = time.perf_counter() - t0
    pg, me = tree_cpu(pg_pid) - pg0, time.process_time() - me0
    n = rows // batch * batch
    print(f"  {label:<34} postgres {pg * 1e6 / n:6.0f} us/row   writer {me * 1e6 / n:6.0f} us/row   "
          f"{n / wall:7.0f} rows/s", flush=True)


async def run(dsn: str, pg_pid: int, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ccr-bench-ledger-"))
    writers = {"request_log executemany (before)": ExecutemanyWriter(dsn),
               "request_log COPY (after)": RequestLogWriter(dsn)}
    lw = ledger.LedgerWriter(dsn, ledger.Spool(tmp))
    for w in writers.values():
        await w._write([request_row()])  # connect, register the chain, read the head
    await ledger_executemany(lw, [ledger_row()])
    await lw._write([ledger_row()])

    async def new_ledger(b: int) -> None:
        await lw._write([ledger_row() for _ in range(b)])

    async def old_ledger(b: int) -> None:
        await ledger_executemany(lw, [ledger_row() for _ in range(b)])

    async def multirow_ledger(b: int) -> None:
        await ledger_multirow(lw, [ledger_row() for _ in range(b)])

    for r in range(args.rounds):
        print(f"round {r + 1} ({args.batch} rows per transaction):")
        for label, w in (writers.items() if r % 2 == 0 else reversed(writers.items())):
            await measure(label, pg_pid, args.rows, args.batch,
                          lambda b, w=w: w._write([request_row() for _ in range(b)]))
        pairs = [("spend_ledger executemany (before)", old_ledger), ("spend_ledger multi-row INSERT", multirow_ledger),
                 ("spend_ledger COPY (after)", new_ledger)]
        for label, fn in (pairs if r % 2 == 0 else reversed(pairs)):
            await measure(label, pg_pid, args.rows, args.batch, fn)
    for w in writers.values():  # never started: only their connections to close
        if w._conn is not None:
            await w._conn.close()
    if lw._conn is not None:
        await lw._conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dsn", help="an existing database (its server's CPU is then not measured)")
    ap.add_argument("--session", default="", help="libpq options for the writers' sessions, e.g. "
                    "'-c synchronous_commit=off' (to see what the commit's WAL flush costs; not what ccr runs)")
    args = ap.parse_args()
    if args.dsn:
        db.migrate(args.dsn)
        asyncio.run(run(args.dsn, -1, args))
        return
    from ccr.localservers import start_postgres

    with tempfile.TemporaryDirectory(prefix="ccr-bench-audit-") as d:
        pg = start_postgres(Path(d) / "pg", Path(d) / "logs")
        try:
            dsn = str(pg.info["dsn"])
            db.migrate(dsn)
            if args.session:
                from urllib.parse import quote

                dsn += ("&" if "?" in dsn else "?") + "options=" + quote(args.session)
            asyncio.run(run(dsn, pg.pid, args))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
