"""Batched, retrying writer of `request_log` rows.

Rows go through a bounded queue to one writer task. The writer takes whatever
has queued up (up to `batch_max`) and inserts it in one transaction, so batches
grow by themselves under load and a row is never half-written. When PostgreSQL
fails, the same batch is retried with backoff (ON CONFLICT makes a retry
idempotent); meanwhile the queue fills and `put` waits, which holds back the
gRPC stream and lets Envoy's own bounded buffer take the overflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from psycopg import sql

from audit.entry import COLUMNS, Row

log = logging.getLogger("ccr.audit")

INSERT = sql.SQL(
    "INSERT INTO request_log ({cols}) VALUES ({vals}) ON CONFLICT (request_id) DO NOTHING"
).format(
    cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
    vals=sql.SQL(", ").join([sql.Placeholder()] * len(COLUMNS)),
)

# Errors that one row causes by its content: retrying the batch would never succeed.
_ROW_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)


class RequestLogWriter:
    def __init__(
        self, dsn: str, *, batch_max: int = 1000, queue_max: int = 50_000,
        backoff_initial: float = 0.1, backoff_max: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.batch_max = batch_max
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._queue: asyncio.Queue[Row | asyncio.Future[None]] = asyncio.Queue(queue_max)
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request_log_writer")

    async def put(self, row: Row) -> None:
        await self._queue.put(row)

    async def flush(self) -> None:
        """Return once every row put before this call is committed (or skipped as bad)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put(done)
        await done

    async def stop(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("stopping with %d access log row(s) not written: database unavailable",
                      self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()

    async def _run(self) -> None:
        while True:
            batch: list[Row] = []
            waiters: list[asyncio.Future[None]] = []
            item = await self._queue.get()
            while True:
                if isinstance(item, asyncio.Future):
                    waiters.append(item)
                    break  # write what precedes the flush marker now
                batch.append(item)
                if len(batch) >= self.batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._write(batch)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, application_name="ccr-audit", connect_timeout=5
            )
        return self._conn

    async def _write(self, batch: list[Row]) -> None:
        delay = self.backoff_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = await self._connection()
                try:
                    await self._insert(conn, batch)
                except _ROW_ERRORS as e:
                    log.warning("batch of %d rejected (%s); writing rows one by one", len(batch), e)
                    await self._insert_each(conn, batch)
                self.written += len(batch)
                if attempt > 1:
                    log.info("request_log writable again; batch of %d written after %d attempts",
                             len(batch), attempt)
                return
            except (psycopg.Error, OSError) as e:
                log.warning("request_log write failed (attempt %d, %d rows kept, retry in %.1fs): %s: %s",
                            attempt, len(batch), delay, type(e).__name__, e)
                await self._reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    async def _insert(self, conn: psycopg.AsyncConnection, rows: list[Row]) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(INSERT, rows)

    async def _insert_each(self, conn: psycopg.AsyncConnection, rows: list[Row]) -> None:
        for row in rows:
            try:
                await self._insert(conn, [row])
            except _ROW_ERRORS as e:
                log.error("skipping request_log row request_id=%r: %s", row[1], e)

    async def _reset(self) -> None:
        # After any failure the connection state is unknown; start from a fresh one.
        conn, self._conn = self._conn, None
        if conn is not None:
            # A broken connection may fail to close; there is nothing more to do with it.
            with contextlib.suppress(Exception):
                await conn.close()
