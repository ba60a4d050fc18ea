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
from audit.spool import Spool, SpoolFull

log = logging.getLogger("ccr.audit")

TABLE = "request_log"
CHAIN_COVERS: tuple[str, ...] = ("id", *COLUMNS)
# A batch's rows go in with one COPY: executemany was one INSERT execution per row, and the COPY
# costs PostgreSQL and this process a half to a third less per row (bench/audit_writes.py,
# docs/hot-path.md). COPY FROM needs only the INSERT privilege the writer role has.
COPY = sql.SQL("COPY request_log ({cols}) FROM STDIN").format(
    cols=sql.SQL(", ").join(map(sql.Identifier, (*CHAIN_COVERS, *CHAIN_COLUMNS))))

# Errors that one row causes by its content: retrying the batch would never succeed.
_ROW_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
_DB_ERRORS = (psycopg.Error, OSError, TimeoutError)


def new_chain_id() -> str:
    """Fresh per process start; sorts by start time (spool directories are named after it)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"


class RequestLogWriter:
    def __init__(
        self, dsn: str, *, spool: Spool | None = None, signer: Ed25519PrivateKey | None = None,
        chain_id: str | None = None, batch_max: int = 1000, queue_max: int = 20_000,
        write_timeout: float = 5.0, backoff_initial: float = 0.1, backoff_max: float = 2.0,
        checkpoint_every_s: float = 30.0, checkpoint_every_rows: int = 10_000,
        checkpoint_log: Path | None = None, adopt_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn = dsn
        self.spool = spool
        self.signer = signer
        self.chain_id = chain_id or new_chain_id()
        self.batch_max = batch_max
        self.write_timeout = write_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_rows = checkpoint_every_rows
        self.checkpoint_log = checkpoint_log
        self.clock = clock
        self.adopt_every_s = adopt_every_s
        self._adopted_at = clock()
        self._queue: asyncio.Queue[Row | asyncio.Future[None]] = asyncio.Queue(queue_max)
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._head: Head | None = None  # None: unknown, read it from the table
        self._registered = False
        self._delay = backoff_initial
        self._next_attempt = 0.0  # clock() before which PostgreSQL is not tried again
        self._failures = 0
        self._checkpointed_seq = 0
        self._checkpointed_at = clock()
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request_log_writer")

    async def put(self, row: Row) -> None:
        await self._queue.put(row)

    async def mark(self) -> asyncio.Future[None]:
        """A future done once every row put before this call is durable: committed, spooled, or
        skipped as bad."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(done)
        return done

    async def flush(self) -> None:
        await (await self.mark())

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
        with contextlib.suppress(*_DB_ERRORS):
            await asyncio.wait_for(self.checkpoint(force=True), self.write_timeout)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        if self.spool is not None:
            self.spool.close()

    # -- the writer task ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # Wake up for the next spool drain attempt, and to sign rows written before a quiet spell.
            wake: list[float] = []
            if self.spool is not None and not self.spool.empty():
                wake.append(self._next_attempt)
            if self.spool is not None:  # another receiver's spool, left when it stopped
                wake.append(self._adopted_at + self.adopt_every_s)
            if self.signer is not None and self._head is not None and self._head.seq != self._checkpointed_seq:
                wake.append(self._checkpointed_at + self.checkpoint_every_s)
            timeout = max(0.0, min(wake) - self.clock()) if wake else None
            try:
                item: Row | asyncio.Future[None] | None = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                item = None
            batch: list[Row] = []
            waiters: list[asyncio.Future[None]] = []
            while item is not None:
                if isinstance(item, asyncio.Future):
                    waiters.append(item)
                else:
                    batch.append(item)
                if len(batch) >= self.batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            try:
                if batch:
                    await self._accept(batch)
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
                if self.spool is not None and self.clock() >= self._adopted_at + self.adopt_every_s:
                    self._adopted_at = self.clock()
                    self.spool.adopt_orphans()
                if self.spool is not None and not self.spool.empty() and self.clock() >= self._next_attempt:
                    await self._drain(max_batches=20)
                await self._maybe_checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception:  # the writer must outlive any one surprise; the rows stay queued or spooled
                log.exception("access log writer error")

    async def _accept(self, batch: list[Row]) -> None:
        """Make `batch` durable: committed, or (PostgreSQL failing or slow) spooled behind earlier rows."""
        if self.spool is None:
            await self._write_retrying(batch)
            return
        if self.spool.empty() and self.clock() >= self._next_attempt:
            try:
                await asyncio.wait_for(self._write(batch), self.write_timeout)
                self._succeeded()
                return
            except _DB_ERRORS as e:
                await self._failed(e, len(batch))
        pending, size = batch, len(batch)
        while pending:
            try:
                self.spool.append(pending[:size])
                pending = pending[size:]
                size = len(pending)
            except SpoolFull:
                if size > 1:  # a smaller piece may fit in the room left
                    size //= 2
                    continue
                if self.spool.empty():  # not even one row fits an empty spool: hold it in memory
                    await self._write_retrying(pending)
                    return
                # Nothing is dropped here: wait for PostgreSQL to take some of the spool.
                await asyncio.sleep(max(0.0, self._next_attempt - self.clock()))
                await self._drain(max_batches=20)
                size = len(pending)

    async def _drain(self, max_batches: int) -> None:
        assert self.spool is not None
        for _ in range(max_batches):
            rows = self.spool.peek()
            if rows is None:
                return
            if any(len(r) < len(COLUMNS) for r in rows):
                # Spooled by a receiver from before migration 11: its rows lack the appended columns.
                rows = [(*r, *([None] * (len(COLUMNS) - len(r)))) for r in rows]
            try:
                await asyncio.wait_for(self._write(rows), self.write_timeout)
            except _DB_ERRORS as e:
                await self._failed(e, self.spool.rows)
                return
            self._succeeded()
            self.spool.consume(len(rows))

    async def _write_retrying(self, batch: list[Row]) -> None:
        """Without a spool: retry the batch until it is written (the queue holds the rest)."""
        while True:
            try:
                await self._write(batch)
                self._succeeded()
                return
            except _DB_ERRORS as e:
                await self._failed(e, len(batch))
                await asyncio.sleep(max(0.0, self._next_attempt - self.clock()))

    def _succeeded(self) -> None:
        if self._failures:
            log.info("request_log writable again after %d failed attempt(s)", self._failures)
        self._failures = 0
        self._delay = self.backoff_initial
        self._next_attempt = 0.0

    async def _failed(self, e: BaseException, rows: int) -> None:
        self._failures += 1
        # Every attempt while PostgreSQL is down would be a line every few seconds: the first
        # few, then at powers of two.
        n = self._failures
        level = logging.WARNING if n <= 3 or n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "request_log write failed (attempt %d, %d rows kept, retry in %.1fs): %s: %s",
                n, rows, self._delay, type(e).__name__, e)
        self._next_attempt = self.clock() + self._delay
        self._delay = min(self._delay * 2, self.backoff_max)
        await self._reset()

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
        except _ROW_ERRORS as e:
            log.warning("batch of %d rejected (%s); writing rows one by one", len(batch), e)
            for row in batch:
                try:
                    await self._insert(conn, [row], lookup=True)
                except _ROW_ERRORS as err:
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
        conn, self._conn, self._head = self._conn, None, None
        if conn is not None:
            # A broken connection may fail to close; there is nothing more to do with it.
            with contextlib.suppress(Exception):
                await conn.close()

    # -- checkpoints ------------------------------------------------------------------------

    async def _maybe_checkpoint(self) -> None:
        if self.signer is None or self._head is None or self._head.seq == self._checkpointed_seq:
            return
        due = (self._head.seq - self._checkpointed_seq >= self.checkpoint_every_rows
               or self.clock() - self._checkpointed_at >= self.checkpoint_every_s)
        if due:
            try:
                await asyncio.wait_for(self.checkpoint(), self.write_timeout)
            except _DB_ERRORS as e:
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
