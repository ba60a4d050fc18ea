"""Batched writer of `request_log` rows: one hash chain per process, a durable spool, checkpoints.

Rows go through a bounded queue to one writer task. The writer takes whatever has queued up
(up to `batch_max`) and makes it durable in one step: a transaction that links every row into
this process's hash chain (audit/chain.py) and inserts them, or, when PostgreSQL fails or is
slower than `write_timeout`, an fsync'd append to the local spool (audit/spool.py). While the
spool holds rows, new batches go behind them, and the spool is replayed in order whenever
PostgreSQL answers again, so rows reach the table in the order they arrived.

`flush()` returns once every row put before it is durable (committed or spooled); the
receiver awaits it per message, so a message Envoy sent is read after the previous one is safe.
When the spool is full the writer waits, the queue fills, `put` waits, and the gRPC stream is
no longer read: back-pressure to Envoy instead of dropping here.

The chain head is never trusted across a failure: after any error the connection is replaced
and the head re-read from the table, so a transaction whose commit was not confirmed is either
there (its rows are then skipped as duplicates by request_id) or not (they are linked again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from audit.chain import ADMIN_CHAIN, CHAIN_COLUMNS, Head, canonical, checkpoint_message, key_id, link_rows
from audit.entry import COLUMNS, Row
from audit.spool import Spool
from audit.spooled import DB_ERRORS, ROW_ERRORS, SpooledWriter

log = logging.getLogger("ccr.audit")

TABLE = "request_log"
CHAIN_COVERS: tuple[str, ...] = ("id", *COLUMNS)
# A batch's rows go in with one COPY: executemany was one INSERT execution per row, and the COPY
# costs PostgreSQL and this process a half to a third less per row (bench/audit_writes.py,
# docs/hot-path.md). COPY FROM needs only the INSERT privilege the writer role has.
COPY = sql.SQL("COPY request_log ({cols}) FROM STDIN").format(
    cols=sql.SQL(", ").join(map(sql.Identifier, (*CHAIN_COVERS, *CHAIN_COLUMNS))))



def new_chain_id() -> str:
    """Fresh per process start; sorts by start time (spool directories are named after it)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"


class RequestLogWriter(SpooledWriter):
    TABLE = TABLE

    def __init__(
        self, dsn: str, *, spool: Spool | None = None, signer: Ed25519PrivateKey | None = None,
        chain_id: str | None = None, batch_max: int = 1000, queue_max: int = 20_000,
        write_timeout: float = 5.0, backoff_initial: float = 0.1, backoff_max: float = 2.0,
        checkpoint_every_s: float = 30.0, checkpoint_every_rows: int = 10_000,
        checkpoint_log: Path | None = None, adopt_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(dsn, spool=spool, batch_max=batch_max, queue_max=queue_max, write_timeout=write_timeout,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, adopt_every_s=adopt_every_s,
                         clock=clock)
        self.signer = signer
        self.chain_id = chain_id or new_chain_id()
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_rows = checkpoint_every_rows
        self.checkpoint_log = checkpoint_log
        self._head: Head | None = None  # None: unknown, read it from the table
        self._registered = False
        self._checkpointed_seq = 0
        self._checkpointed_at = clock()
        self.written = 0

    async def put(self, row: Row) -> None:
        await self._queue.put(row)

    async def stop(self, timeout: float | None = None) -> None:
        # The writer's own bound on a flush: a batch PostgreSQL does not take within write_timeout
        # is spooled (and every batch after it goes straight to the spool), so twice that plus the
        # fsyncs covers it. A fixed 5 s dropped the queued rows of a receiver stopping while
        # PostgreSQL was slow (a 5 s write, then the spool append, past the 5 s).
        if timeout is None:
            timeout = 2 * self.write_timeout + 5.0
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("stopping with %d access log row(s) neither written nor spooled", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(*DB_ERRORS):
            await asyncio.wait_for(self.checkpoint(force=True), self.write_timeout)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        if self.spool is not None:
            self.spool.close()

    # -- SpooledWriter hooks ---------------------------------------------------------------

    def _more_wake(self, wake: list[float]) -> None:
        # Sign rows written before a quiet spell.
        if self.signer is not None and self._head is not None and self._head.seq != self._checkpointed_seq:
            wake.append(self._checkpointed_at + self.checkpoint_every_s)

    async def _after_cycle(self) -> None:
        await self._maybe_checkpoint()

    async def _spool_full(self, pending: list[Row]) -> list[Row]:
        assert self.spool is not None
        if self.spool.empty():  # not even one row fits an empty spool: hold it in memory
            await self._write_retrying(pending)
            return []
        # Nothing is dropped here: wait for PostgreSQL to take some of the spool.
        await asyncio.sleep(max(0.0, self._next_attempt - self.clock()))
        await self._drain(max_batches=20)
        return pending

    def _spooled(self, rows: list[Row]) -> list[Row]:
        if any(len(r) < len(COLUMNS) for r in rows):
            # Spooled by a receiver from before migration 11: its rows lack the appended columns.
            rows = [(*r, *([None] * (len(COLUMNS) - len(r)))) for r in rows]
        return rows

    # -- PostgreSQL ------------------------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, application_name="ccr-audit", connect_timeout=5, autocommit=True)
        if not self._registered:
            await self._conn.execute(
                "INSERT INTO audit_chains (chain_id, log_table, columns, host, pid) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (chain_id) DO NOTHING",
                (self.chain_id, TABLE, list(CHAIN_COVERS), socket.gethostname(), os.getpid()))
            self._registered = True
        if self._head is None:
            cur = await self._conn.execute(
                "SELECT chain_seq, row_hash FROM request_log WHERE chain_id = %s ORDER BY chain_seq DESC LIMIT 1",
                (self.chain_id,))
            last = await cur.fetchone()
            self._head = Head(last[0], bytes(last[1])) if last else Head()
        return self._conn

    async def _write(self, batch: list[Row]) -> None:
        conn = await self._connection()
        try:
            try:
                await self._insert(conn, batch)
            except psycopg.errors.UniqueViolation:  # some request id is there already: skip it
                await self._insert(conn, batch, lookup=True)
        except ROW_ERRORS as e:
            log.warning("batch of %d rejected (%s); writing rows one by one", len(batch), e)
            for row in batch:
                try:
                    await self._insert(conn, [row], lookup=True)
                except ROW_ERRORS as err:
                    log.error("skipping request_log row request_id=%r: %s", row[1], err)

    async def _insert(self, conn: psycopg.AsyncConnection, rows: list[Row], lookup: bool = False) -> None:
        """Link and insert the rows not yet in the table (first of a request_id wins), in one transaction.

        `lookup`: first read which request ids the table has. Without it a row already there fails the
        batch (unique violation) and `_write` tries again with it: a request id arrives twice only after
        a commit that was not confirmed, so the common batch saves the round trip."""
        assert self._head is not None
        async with conn.transaction(), conn.cursor() as cur:
            seen: set[object] = set()
            if lookup:
                await cur.execute("SELECT request_id FROM request_log WHERE request_id = ANY(%s)",
                                  ([r[1] for r in rows],))
                seen = {r[0] for r in await cur.fetchall()}
            fresh = []
            for r in rows:
                if r[1] not in seen:
                    seen.add(r[1])
                    fresh.append(r)
            if not fresh:
                return
            await cur.execute("SELECT nextval('request_log_id_seq') FROM generate_series(1, %s)", (len(fresh),))
            ids = [r[0] for r in await cur.fetchall()]
            linked, head = link_rows(TABLE, self.chain_id, CHAIN_COVERS, self._head,
                                     [(i, *r) for i, r in zip(ids, fresh, strict=True)])
            async with cur.copy(COPY) as copy:
                for r in linked:
                    await copy.write_row(r)
        self._head = head
        self.written += len(fresh)

    async def _reset(self) -> None:
        # After any failure the connection and the chain head are unknown; start from fresh ones.
        self._head = None
        await super()._reset()

    # -- checkpoints ------------------------------------------------------------------------

    async def _maybe_checkpoint(self) -> None:
        if self.signer is None or self._head is None or self._head.seq == self._checkpointed_seq:
            return
        due = (self._head.seq - self._checkpointed_seq >= self.checkpoint_every_rows
               or self.clock() - self._checkpointed_at >= self.checkpoint_every_s)
        if due:
            try:
                await asyncio.wait_for(self.checkpoint(), self.write_timeout)
            except DB_ERRORS as e:
                log.warning("audit checkpoint not written (next attempt later): %s: %s", type(e).__name__, e)
                self._checkpointed_at = self.clock()
                await self._reset()

    async def checkpoint(self, force: bool = False) -> None:
        """Sign this chain's head, and the admin chain's when it moved on, into audit_checkpoints."""
        if self.signer is None:
            return
        conn = await self._connection()
        assert self._head is not None
        heads = [(TABLE, self.chain_id, self._head)]
        cur = await conn.execute("SELECT chain_seq, row_hash FROM admin_log WHERE chain_id = %s"
                                 " ORDER BY chain_seq DESC LIMIT 1", (ADMIN_CHAIN,))
        admin = await cur.fetchone()
        if admin is not None:
            heads.append(("admin_log", ADMIN_CHAIN, Head(admin[0], bytes(admin[1]))))
        kid = key_id(self.signer.public_key())
        lines = []
        async with conn.transaction():
            for table, chain, head in heads:
                if head.seq == 0:
                    continue
                ts = datetime.now(UTC)
                sig = self.signer.sign(checkpoint_message(table, chain, head.seq, head.hash, ts))
                await conn.execute(
                    "INSERT INTO audit_checkpoints (ts, log_table, chain_id, chain_seq, row_hash, key_id, signature)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chain_id, chain_seq) DO NOTHING",
                    (ts, table, chain, head.seq, head.hash, kid, sig))
                lines.append(canonical({"ts": ts, "table": table, "chain": chain, "seq": head.seq, "hash": head.hash,
                                        "key_id": kid, "signature": sig}) + b"\n")
        if self.checkpoint_log is not None and lines:
            # A copy outside the database: `verify` finds chains or tails removed with their checkpoints.
            try:
                fd = os.open(self.checkpoint_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, b"".join(lines))  # one write per checkpoint round: O_APPEND keeps lines whole
                finally:
                    os.close(fd)
            except OSError as e:
                log.warning("audit checkpoint copy not written to %s: %s", self.checkpoint_log, e)
        self._checkpointed_seq = self._head.seq
        self._checkpointed_at = self.clock()
        if force:
            log.info("audit checkpoint: chain %s at seq %d", self.chain_id, self._head.seq)
