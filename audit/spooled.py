"""What the audit's table writers share: a bounded queue, one writer task, and durability through
PostgreSQL or an fsync'd local spool (audit/spool.py), with backoff while PostgreSQL fails.

A subclass says how a batch is written (`_write`), and what happens when the spool is full
(`_spool_full`: the request_log writer waits, the body writer drops). The spool is written back in
order whenever PostgreSQL answers again; a stopped receiver's spool is adopted every `adopt_every_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from audit.spool import Spool, SpoolFull

log = logging.getLogger("ccr.audit")

# Errors that one row causes by its content: retrying the batch would never succeed.
ROW_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
DB_ERRORS = (psycopg.Error, OSError, TimeoutError)


class SpooledWriter:
    TABLE = ""  # the table, for log lines
    KEPT = "rows"  # what a failed write keeps, for log lines
    RESOLVE_ON_ERROR = False  # a cycle that failed unexpectedly still answers its flush() waiters

    def __init__(self, dsn: str, *, spool: Spool | None, batch_max: int, queue_max: int, write_timeout: float,
                 backoff_initial: float, backoff_max: float, adopt_every_s: float,
                 clock: Callable[[], float]) -> None:
        self.dsn = dsn
        self.spool = spool
        self.batch_max = batch_max
        self.write_timeout = write_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.adopt_every_s = adopt_every_s
        self.clock = clock
        self._adopted_at = clock()
        self._queue: asyncio.Queue[Any] = asyncio.Queue(queue_max)
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._delay = backoff_initial
        self._next_attempt = 0.0  # clock() before which PostgreSQL is not tried again
        self._failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.TABLE}_writer")

    async def mark(self) -> asyncio.Future[None]:
        """A future done once everything put before this call is durable: written, spooled, or
        given up (skipped as bad, or dropped and counted)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(done)
        return done

    async def flush(self) -> None:
        await (await self.mark())

    # -- hooks -----------------------------------------------------------------------------

    async def _write(self, batch: list[Any]) -> None:
        raise NotImplementedError

    async def _spool_full(self, pending: list[Any]) -> list[Any]:
        """Not even one item of `pending` fits the spool: what is left to spool (empty: done)."""
        raise NotImplementedError

    def _item_bytes(self, item: Any) -> int:
        return 0  # a batch is bounded by batch_max items only

    batch_max_bytes: int | None = None

    def _more_wake(self, wake: list[float]) -> None:
        """Other times the writer task must wake up at (the request_log writer's checkpoints)."""

    async def _after_cycle(self) -> None:
        """Work after each round of the writer task."""

    def _spooled(self, rows: list[Any]) -> list[Any]:
        """Rows read back from the spool, as `_write` takes them."""
        return rows

    # -- the writer task -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            wake: list[float] = []
            if self.spool is not None and not self.spool.empty():
                wake.append(self._next_attempt)
            if self.spool is not None:  # another receiver's spool, left when it stopped
                wake.append(self._adopted_at + self.adopt_every_s)
            self._more_wake(wake)
            timeout = max(0.0, min(wake) - self.clock()) if wake else None
            try:
                item: Any = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                item = None
            batch: list[Any] = []
            waiters: list[asyncio.Future[None]] = []
            size = 0
            while item is not None:
                if isinstance(item, asyncio.Future):
                    waiters.append(item)
                else:
                    batch.append(item)
                    size += self._item_bytes(item)
                if (len(batch) >= self.batch_max or self._queue.empty()
                        or (self.batch_max_bytes is not None and size >= self.batch_max_bytes)):
                    break
                item = self._queue.get_nowait()
            try:
                if batch:
                    await self._accept(batch)
                _resolve(waiters)
                if self.spool is not None and self.clock() >= self._adopted_at + self.adopt_every_s:
                    self._adopted_at = self.clock()
                    self.spool.adopt_orphans()
                if self.spool is not None and not self.spool.empty() and self.clock() >= self._next_attempt:
                    await self._drain(max_batches=20)
                await self._after_cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # the writer must outlive any one surprise; what it holds stays queued or spooled
                log.exception("%s writer error", self.TABLE)
                if self.RESOLVE_ON_ERROR:
                    _resolve(waiters)

    async def _accept(self, batch: list[Any]) -> None:
        """Make `batch` durable: written, or (PostgreSQL failing or slow) spooled behind what waits there."""
        if self.spool is None:
            await self._write_retrying(batch)
            return
        if self.spool.empty() and self.clock() >= self._next_attempt:
            try:
                await asyncio.wait_for(self._write(batch), self.write_timeout)
                self._succeeded()
                return
            except DB_ERRORS as e:
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
                pending = await self._spool_full(pending)
                size = len(pending)

    async def _drain(self, max_batches: int) -> None:
        assert self.spool is not None
        for _ in range(max_batches):
            rows = self.spool.peek()
            if rows is None:
                return
            try:
                await asyncio.wait_for(self._write(self._spooled(rows)), self.write_timeout)
            except DB_ERRORS as e:
                await self._failed(e, self.spool.rows)
                return
            self._succeeded()
            self.spool.consume(len(rows))

    async def _write_retrying(self, batch: list[Any]) -> None:
        """Without a spool: retry the batch until it is written (the queue holds the rest)."""
        while True:
            try:
                await self._write(batch)
                self._succeeded()
                return
            except DB_ERRORS as e:
                await self._failed(e, len(batch))
                await asyncio.sleep(max(0.0, self._next_attempt - self.clock()))

    def _succeeded(self) -> None:
        if self._failures:
            log.info("%s writable again after %d failed attempt(s)", self.TABLE, self._failures)
        self._failures = 0
        self._delay = self.backoff_initial
        self._next_attempt = 0.0

    async def _failed(self, e: BaseException, waiting: int) -> None:
        self._failures += 1
        # Every attempt while PostgreSQL is down would be a line every few seconds: the first
        # few, then at powers of two.
        n = self._failures
        level = logging.WARNING if n <= 3 or n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "%s write failed (attempt %d, %d %s kept, retry in %.1fs): %s: %s",
                self.TABLE, n, waiting, self.KEPT, self._delay, type(e).__name__, e)
        self._next_attempt = self.clock() + self._delay
        self._delay = min(self._delay * 2, self.backoff_max)
        await self._reset()

    async def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                await conn.close()


def _resolve(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)
