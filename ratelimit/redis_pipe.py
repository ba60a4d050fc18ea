"""One pipelined Redis connection on the asyncio loop: what extauth's in-Check admission calls.

extauth decides every request on one event loop. A blocking Redis call there (redis-py) holds the
loop for the whole round trip, and under load that round trip includes waiting for Redis to be
scheduled: 0.4-0.5 ms per request at c=32 on 2 cores (docs/hot-path.md), during which no other
Check moves. Here a call writes its command and awaits the reply; the loop serves other Checks
meanwhile, and Checks that overlap share the connection, so Redis reads several commands per
wake-up. Replies come back in order (RESP), each to the caller that is first in line.

The same URL forms as redis-py (redis://, rediss://, unix://; user, password and db), read with
redis-py's own parser; replies parsed by hiredis, errors mapped to redis-py's exceptions, so
callers handle one family of errors whichever client asked.

A call that outlives `timeout_s` fails with redis.exceptions.TimeoutError and drops the connection
(a late reply must not reach the next caller). Then calls fail at once for `stall_hold_s`: a hung
store costs one timeout, not one per Check (as ratelimit/counters.py does for blocking callers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

log = logging.getLogger("ccr.ratelimit")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as e:
                self.fail(rx.ConnectionError(f"redis sent what is not RESP: {e}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream cannot be trusted any more
                self.fail(rx.ConnectionError("redis sent a reply nobody was waiting for"))
                return
            fut = waiting.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is dropped, the order kept
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(BaseParser.parse_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_waiting(rx.ConnectionError(f"connection to redis lost: {exc or 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        """Close the connection; every caller still waiting gets `error`."""
        self.closed = True
        self._fail_waiting(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, error: Exception) -> None:
        waiting = self.waiting
        while waiting:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        assert self.transport is not None
        self.transport.write(packed)
        return fut


def _ssl_context(kw: dict[str, Any]) -> ssl.SSLContext:
    """A client TLS context from rediss:// query options (redis-py's names)."""
    ctx = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
    reqs = kw.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}[reqs.lower()]
    check_hostname = kw.get("ssl_check_hostname", reqs == ssl.CERT_REQUIRED)
    if isinstance(check_hostname, str):
        check_hostname = check_hostname.lower() in ("1", "true", "yes")
    ctx.check_hostname = bool(check_hostname) and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    if kw.get("ssl_certfile"):
        ctx.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"))
    return ctx


class RedisPipe:
    """Calls to one Redis, pipelined on one connection (opened on first use, again after a failure)."""

    def __init__(self, url: str, timeout_s: float, stall_hold_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        kw = parse_url(url)
        self._kw = kw
        self._kind = kw.get("connection_class")
        if self._kind not in (None, SSLConnection, UnixDomainSocketConnection):
            raise ValueError(f"unsupported redis URL scheme for the asyncio client: {url.split(':', 1)[0]}")
        self.timeout_s = timeout_s
        self.stall_hold_s = stall_hold_s
        self.clock = clock
        self._stalled_until = 0.0
        self._conn: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None
        self._sha: dict[str | bytes, str] = {}  # script -> its SHA1 once loaded

    async def run_script(self, script: str | bytes, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA of `script`, loading it first when Redis does not have it (a restart, SCRIPT FLUSH): a
        NOSCRIPT reply means nothing ran, so loading it and running again cannot count twice."""
        sha = self._sha.get(script)
        if sha is not None:
            try:
                return await self.call("EVALSHA", sha, len(keys), *keys, *args)
            except rx.NoScriptError:
                log.info("script not in redis; loading it again")
        loaded = await self.call("SCRIPT", "LOAD", script)
        sha = self._sha[script] = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def call(self, *args: object) -> Any:
        """One command's reply. Raises redis.exceptions (ConnectionError, TimeoutError, ResponseError and its
        kinds, NoScriptError among them)."""
        if self._stalled_until and self.clock() < self._stalled_until:
            raise rx.ConnectionError("redis timed out recently; not asked again until the hold ends")
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._open()
        fut = conn.send(hiredis.pack_command(args))  # type: ignore[arg-type]
        return await self._reply(conn, fut)

    async def _reply(self, conn: _Connection, fut: asyncio.Future[Any]) -> Any:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, self._expire, conn, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _expire(self, conn: _Connection, fut: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        self._stalled_until = self.clock() + self.stall_hold_s
        fut.set_exception(rx.TimeoutError(f"redis did not answer within {self.timeout_s:g}s"))
        conn.fail(rx.ConnectionError("connection to redis dropped after a call timed out"))
        if self._conn is conn:
            self._conn = None

    async def _open(self) -> _Connection:
        """The connection, opened and authenticated once however many callers wait for it."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect())
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _connect(self) -> _Connection:
        kw = self._kw
        loop = asyncio.get_running_loop()
        try:
            if self._kind is UnixDomainSocketConnection:
                made = loop.create_unix_connection(_Connection, kw["path"])
            else:
                tls = _ssl_context(kw) if self._kind is SSLConnection else None
                made = loop.create_connection(_Connection, kw.get("host", "localhost"), int(kw.get("port", 6379)),
                                              ssl=tls)
            _, conn = await asyncio.wait_for(made, self.timeout_s)
        except OSError as e:  # refused, unreachable, timed out (TimeoutError), TLS (SSLError)
            raise rx.ConnectionError(f"cannot connect to redis: {e or type(e).__name__}") from e
        try:
            hello = []
            if kw.get("password") is not None:
                user = kw.get("username")
                auth = ("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"])
                hello.append(conn.send(hiredis.pack_command(auth)))
            if int(kw.get("db") or 0):
                hello.append(conn.send(hiredis.pack_command(("SELECT", int(kw["db"])))))
            for fut in hello:
                await self._reply(conn, fut)
        except BaseException:
            conn.fail(rx.ConnectionError("redis refused the connection's set-up"))
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(rx.ConnectionError("redis client closed"))
