"""Decision events to an HTTP service, the way OPA's decision_logs plugin sends them.

The decision log (extauth/decisions.py) hands over each flush's events, already encoded as
OPA decision-log JSON objects; `offer()` only appends them to a bounded buffer (no I/O, never
blocks). A background task POSTs them to `url` + `resource` in batches of at most
`batch_bytes` (uncompressed), as a gzip-compressed JSON array with `Content-Encoding: gzip`.

Delivery is at least once: a batch leaves the buffer only when the service answers 2xx. A
failed upload (unreachable, timeout, 5xx, 408, 429) is put back at the front and retried
after an exponential backoff with jitter, so a service that was down gets everything once it
is back; a batch whose answer was lost may arrive twice. A 4xx otherwise says the service
will never take that batch: it is dropped, counted and logged rather than retried forever.
When the buffer is over `buffer_bytes`, the oldest events are dropped (as OPA does), counted
in `ccr_policy_decision_log_dropped_total{sink="http"}` and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp

from ccr.metrics import DECISION_LOG_DROPPED, DECISION_LOG_UPLOADS

log = logging.getLogger("extauth.decisions")

_RETRY_STATUS = frozenset({408, 425, 429})  # client errors that mean "later", not "never"


class DecisionUploader:
    def __init__(self, url: str, *, token: str | None = None, ca_file: str | Path | None = None,
                 timeout_s: float = 10.0, interval_s: float = 1.0, batch_bytes: int = 1 << 20,
                 buffer_bytes: int = 64 << 20, retry_min_s: float = 0.5, retry_max_s: float = 60.0,
                 jitter: Callable[[], float] = random.random) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.batch_bytes = batch_bytes
        self.buffer_bytes = buffer_bytes
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self._jitter = jitter
        self._headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._buf: deque[bytes] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0  # events the service accepted (2xx)
        self.dropped = 0  # events dropped: buffer full, or refused for good by the service
        self.failures = 0  # uploads that failed (and were retried)
        self._in_flight = 0  # events of the batch being posted (out of the buffer until it is answered)
        self._dropped_reported = 0

    @property
    def waiting(self) -> int:
        """Events buffered, not counting a batch being posted."""
        return len(self._buf)

    @property
    def undelivered(self) -> int:
        """Events not yet accepted by the service: buffered or being posted."""
        return len(self._buf) + self._in_flight

    # -- from the decision log's flush (never blocks) ---------------------------------------

    def offer(self, events: Iterable[bytes]) -> None:
        buf = self._buf
        for e in events:
            buf.append(e)
            self._bytes += len(e)
        self._trim()
        if self._bytes >= self.batch_bytes:
            self._wake.set()

    def _trim(self) -> None:
        dropped = 0
        while self._bytes > self.buffer_bytes and self._buf:
            self._bytes -= len(self._buf.popleft())
            dropped += 1
        if dropped:
            self._drop(dropped)

    def _drop(self, n: int) -> None:
        self.dropped += n
        DECISION_LOG_DROPPED.labels("http").inc(n)

    def _report_drops(self) -> None:
        if self.dropped != self._dropped_reported:
            log.warning("decision log upload to %s: %d event(s) dropped (buffer of %d bytes full, or refused by "
                        "the service), %d since start", self.url, self.dropped - self._dropped_reported,
                        self.buffer_bytes, self.dropped)
            self._dropped_reported = self.dropped

    # -- background -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="decision-upload")

    async def _loop(self) -> None:
        failures_in_a_row = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                ok = await self.drain()
            except Exception:  # never let the uploader die: the next tick tries again
                log.exception("decision log upload failed")
                ok = False
            if ok:
                failures_in_a_row = 0
                continue
            failures_in_a_row += 1
            delay = min(self.retry_max_s, self.retry_min_s * 2 ** min(failures_in_a_row - 1, 30))
            delay *= 0.5 + self._jitter() / 2  # spread the retries of many extauth processes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _take(self) -> list[bytes]:
        """The oldest events up to batch_bytes (at least one), out of the buffer."""
        batch: list[bytes] = []
        size = 0
        buf = self._buf
        while buf and (not batch or size + len(buf[0]) + 1 <= self.batch_bytes):
            e = buf.popleft()
            batch.append(e)
            size += len(e) + 1
        self._bytes -= sum(len(e) for e in batch)
        return batch

    def _put_back(self, batch: list[bytes]) -> None:
        self._buf.extendleft(reversed(batch))
        self._bytes += sum(len(e) for e in batch)
        self._trim()  # events that arrived meanwhile may have filled the buffer: the oldest go

    async def drain(self) -> bool:
        """Upload everything buffered now; False when an upload failed (what is left stays buffered)."""
        try:
            while self._buf:
                batch = self._take()
                self._in_flight = len(batch)
                try:
                    status = await self._post(batch)
                except BaseException:  # cancelled mid-upload (shutdown): the batch is not lost
                    self._put_back(batch)
                    raise
                finally:
                    self._in_flight = 0
                if status is not None and 200 <= status < 300:
                    self.sent += len(batch)
                    DECISION_LOG_UPLOADS.labels("ok").inc()
                    continue
                DECISION_LOG_UPLOADS.labels("error").inc()
                if status is not None and 400 <= status < 500 and status not in _RETRY_STATUS:
                    log.error("decision log upload to %s: the service refused %d event(s) with HTTP %d; dropped",
                              self.url, len(batch), status)
                    self._drop(len(batch))
                    continue
                self.failures += 1
                self._put_back(batch)
                return False
            return True
        finally:
            self._report_drops()

    async def _post(self, batch: list[bytes]) -> int | None:
        """POST one batch; the HTTP status, or None when there was no answer."""
        body = await asyncio.to_thread(_gzip_array, batch)  # compression off the event loop
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  connector=aiohttp.TCPConnector(ssl=self._ssl or True))
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    log.warning("decision log upload to %s: HTTP %d; %d event(s) kept for a retry",
                                self.url, resp.status, len(batch))
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("decision log upload to %s failed (%s); %d event(s) kept for a retry",
                        self.url, str(e) or type(e).__name__, len(batch))
            return None

    async def close(self, grace_s: float | None = None) -> None:
        """Stop, then try once more to upload what is buffered, all within grace_s (default: timeout_s,
        at most 4 s: a service's shutdown must not wait on a log service that does not answer)."""
        grace = grace_s if grace_s is not None else min(self.timeout_s, 4.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            _, pending = await asyncio.wait({self._task}, timeout=grace / 2)
            for t in pending:  # an upload still in flight: its batch goes back to the buffer
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), max(0.0, deadline - loop.time()))
        if self._buf:
            log.error("decision log upload to %s: %d event(s) not delivered at shutdown", self.url, len(self._buf))
            self._drop(len(self._buf))
            self._buf.clear()
            self._bytes = 0
        if self._session is not None:
            await self._session.close()
            self._session = None


def _gzip_array(events: list[bytes]) -> bytes:
    return gzip.compress(b"[" + b",".join(events) + b"]", compresslevel=6)
