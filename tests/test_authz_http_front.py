"""extauth/http_front.py over real sockets (uvloop, as the service runs): keep-alive, pipelining,
malformed and oversize requests, health and drain, mutual TLS with the caller's SPIFFE ID, refusals.

The Authorizer here records what it was given and answers as told: the decision itself is
tests/test_extauth.py's; what a real Envoy sends is tests/test_authz_http_parity.py's."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httptools
import pytest
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.rpc import code_pb2, status_pb2

from ccr import metrics
from ccr.config import parse_config
from ccr.contract import AUTHZ_HTTP_HEALTH_PATH, AUTHZ_HTTP_STATUS_STANDINS, H_AUTHZ_PEER_URI
from ccr.pki import issue_run_pki
from ccr.service import side_tls
from extauth.deny import Deny
from extauth.http_front import BODY_SLACK, METHOD, AuthzHttpFront

MAX_REQUEST = 64 * 1024  # gateway.max_request_bytes' least value: the front's limit is this + BODY_SLACK


def _config(max_request_bytes: int = MAX_REQUEST):
    return parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                         "models": [{"match": "claude-*", "provider": "anthropic"}],
                         "services": {"authz_transport": "http"},
                         "gateway": {"max_request_bytes": max_request_bytes}})


def _ok(model: str) -> pb.CheckResponse:
    return pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=pb.OkHttpResponse(headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-ccr-model", value=model))]))


class Recording:
    """Stands in for extauth.server.Authorizer: records each check, answers with `answer(req)`."""

    def __init__(self) -> None:
        self.checks: list[tuple[pb.CheckRequest, Any]] = []
        self.identities: list[tuple[dict[str, str], str | None]] = []
        self.hold: asyncio.Event | None = None  # a check of path /slow waits for it
        self.answer: Callable[[pb.CheckRequest], pb.CheckResponse] = lambda req: _ok(req.attributes.request.http.path)
        self.identity = SimpleNamespace(authenticate=self._authenticate)
        self.decisions = None

    async def check(self, req: pb.CheckRequest, body: Any = None) -> pb.CheckResponse:
        self.checks.append((req, body))
        if req.attributes.request.http.path == "/slow" and self.hold is not None:
            await self.hold.wait()
        return self.answer(req)

    async def _authenticate(self, headers: dict[str, str], peer: str | None) -> None:
        self.identities.append((dict(headers), peer))
        if headers.get("x-api-key") != "good":
            raise Deny(401, "authentication_error", "invalid x-api-key")

    def _record(self, *args: Any, **kw: Any) -> None:
        return None


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.keep_alive = True

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class Reader:
    """Reads HTTP answers off one connection, in order."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.done: list[Answer] = []
        self.cur = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, k: bytes, v: bytes) -> None:
        self.cur.headers.append((k.decode().lower(), v.decode()))

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()
        self.cur.keep_alive = self.parser.should_keep_alive()

    def on_body(self, b: bytes) -> None:
        self.cur.body += b

    def on_message_complete(self) -> None:
        self.done.append(self.cur)
        self.cur = Answer()

    async def answers(self, n: int) -> list[Answer]:
        while len(self.done) < n:
            data = await self.reader.read(65536)
            if not data:
                raise AssertionError(f"connection closed after {len(self.done)} of {n} answers")
            self.parser.feed_data(data)
        out, self.done = self.done[:n], self.done[n:]
        return out

    async def closed(self) -> bool:
        return await self.reader.read(65536) == b""


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait on the condition itself (bounded: a hung test fails instead of hanging the loop)."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout_s)


def request(path: str, body: bytes = b"", method: str = "POST", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gw.example", "x-request-id: rid", f"content-length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def run(test: Callable[[AuthzHttpFront, Recording, str], Awaitable[None]], config=None,  # noqa: ANN001
        tls: ssl.SSLContext | None = None, peers: tuple[str, ...] = ()) -> None:
    async def main() -> None:
        authz = Recording()
        front = AuthzHttpFront(authz, config or _config())  # type: ignore[arg-type]
        address = await front.start("127.0.0.1", 0, tls=tls, peers=peers)
        try:
            await test(front, authz, address)
        finally:
            await front.stop(0.5)

    uvloop.run(main())


async def connect(address: str, tls: ssl.SSLContext | None = None) -> tuple[Reader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    r, w = await asyncio.open_connection(host, int(port), ssl=tls, server_hostname="localhost" if tls else None)
    return Reader(r), w


def test_keep_alive_checks_rebuild_the_request_and_pass_the_body() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/v1/messages?beta=true", b'{"model":"m"}'))
        (a,) = await rd.answers(1)
        assert a.status == 200 and a.keep_alive and a.get("x-ccr-model") == "/v1/messages?beta=true"
        w.write(request("/ccr-authz/full/v1/models", method="GET"))
        (b,) = await rd.answers(1)
        assert b.status == 200 and b.get("x-ccr-model") == "/v1/models"
        (req, body), (req2, body2) = authz.checks
        http = req.attributes.request.http
        assert (http.method, http.path, http.host, http.id) == ("POST", "/v1/messages?beta=true", "gw.example", "rid")
        assert bytes(body) == b'{"model":"m"}' and isinstance(body, memoryview)
        assert req2.attributes.request.http.method == "GET" and body2 is None
        w.close()
    run(t)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        authz.hold = asyncio.Event()
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/slow") + request("/ccr-authz/full/b")
                + request(AUTHZ_HTTP_HEALTH_PATH, method="GET") + request("/nowhere") + request("/ccr-authz/full/c"))
        (conn,) = front.connections
        await until(lambda: len(conn.pending) >= 4)  # every later request parsed while the first is decided
        assert len(authz.checks) == 1
        assert len(rd.reader._buffer) == 0 and not rd.done  # nothing answered out of order
        authz.hold.set()
        answers = await rd.answers(5)
        assert [(a.status, a.get("x-ccr-model")) for a in answers] == [
            (200, "/slow"), (200, "/b"), (200, None), (404, None), (200, "/c")]
        assert json.loads(answers[3].body)["error"]["type"] == "not_found_error"
        w.close()
    run(t)


@pytest.mark.parametrize("raw", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /ccr-authz/full/x HTTP/1.1\r\nhost: a\r\ncontent-length: zz\r\n\r\n",
    b"GET /ccr-authz/full/x HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
])
def test_a_malformed_request_is_answered_400_and_closed(raw: bytes) -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        w.write(raw)
        (a,) = await rd.answers(1)
        assert a.status == 400 and not a.keep_alive
        assert json.loads(a.body)["error"]["type"] == "invalid_request_error"
        assert await rd.closed()
        assert authz.checks == []
    run(t)


def test_an_oversize_body_is_refused_413_before_it_is_read() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        limit = MAX_REQUEST + BODY_SLACK
        w.write(request("/ccr-authz/full/v1/messages").replace(b"content-length: 0",
                                                               f"content-length: {limit + 1}".encode()))
        (a,) = await rd.answers(1)
        assert a.status == 413 and not a.keep_alive
        assert json.loads(a.body)["error"]["type"] == "request_too_large"
        assert await rd.closed()
        # At the limit it is read and checked.
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/v1/messages", b"x" * limit))
        (a,) = await rd.answers(1)
        assert a.status == 200 and len(authz.checks[0][1]) == limit
    run(t)


def test_oversize_headers_are_refused_431() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/x", headers=(("x-big", "a" * 200_000),)))
        (a,) = await rd.answers(1)
        assert a.status == 431 and not a.keep_alive
        assert authz.checks == []
    run(t)


def test_a_failing_or_undeclared_answer_is_a_503_refusal_and_the_connection_survives(
        caplog: pytest.LogCaptureFixture) -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        def answer(req: pb.CheckRequest) -> pb.CheckResponse:
            path = req.attributes.request.http.path
            if path == "/boom":
                raise RuntimeError("boom")
            if path == "/undeclared":
                resp = _ok(path)
                resp.dynamic_metadata.update({"team_tag": "x"})
                return resp
            return _ok(path)
        authz.answer = answer
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/boom") + request("/ccr-authz/full/undeclared")
                + request("/ccr-authz/full/fine"))
        a, b, c = await rd.answers(3)
        standin = AUTHZ_HTTP_STATUS_STANDINS[503]
        assert (a.status, b.status, c.status) == (standin, standin, 200)
        assert json.loads(b.body)["error"]["type"] == "api_error"
        assert b.get("x-ccr-md-error-type") is not None and b.get("x-ccr-md-team-tag") is None
        assert a.keep_alive and b.keep_alive
        w.close()
    with caplog.at_level(logging.ERROR, logger="extauth.http"):
        run(t)
    assert "metadata key 'team_tag'" in caplog.text
    assert "policy.result_names" in caplog.text


def test_the_identity_prefix_asks_identity_only() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        w.write(request("/ccr-authz/identity/v1/messages", headers=(("x-api-key", "good"), (H_AUTHZ_PEER_URI, "spiffe://x/y")))
                + request("/ccr-authz/identity/v1/messages", headers=(("x-api-key", "bad"),)))
        ok, refused = await rd.answers(2)
        assert ok.status == 200 and refused.status == 401
        assert json.loads(refused.body)["error"]["type"] == "authentication_error"
        assert authz.checks == []
        assert [(h["x-api-key"], p) for h, p in authz.identities] == [("good", "spiffe://x/y"), ("bad", None)]
    run(t)


def test_health_and_drain() -> None:
    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        checker, cw = await connect(address)
        cw.write(request(AUTHZ_HTTP_HEALTH_PATH, method="GET"))
        assert (await checker.answers(1))[0].status == 200
        idle, iw = await connect(address)
        iw.write(request("/ccr-authz/full/warm"))
        await idle.answers(1)
        busy, bw = await connect(address)
        authz.hold = asyncio.Event()
        bw.write(request("/ccr-authz/full/slow"))
        await until(lambda: len(authz.checks) >= 2)

        front.begin_drain()
        since = front._clock()
        assert len(front.watchers_not_told(since, 3.0)) == 1  # the checker has not heard yet
        waiting = asyncio.ensure_future(front.until_watchers_told(since, 5.0))
        cw.write(request(AUTHZ_HTTP_HEALTH_PATH, method="GET"))
        assert (await checker.answers(1))[0].status == 503
        assert await waiting == []

        stopping = asyncio.ensure_future(front.stop(5.0))
        assert await idle.closed()  # an idle keep-alive connection is closed at once
        assert not stopping.done()
        authz.hold.set()
        (a,) = await busy.answers(1)  # the check in flight finishes, and its connection closes
        assert a.status == 200 and not a.keep_alive
        assert await busy.closed()
        await stopping
        with pytest.raises(OSError):
            await connect(address)  # no new connections
    run(t)


def test_the_http_check_is_timed_like_the_grpc_one() -> None:
    def count() -> float:
        return metrics.REGISTRY.get_sample_value("ccr_rpc_duration_seconds_count",
                                                 {"service": "extauth", "method": METHOD}) or 0.0

    before = count()

    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/a") + request("/ccr-authz/full/b"))
        await rd.answers(2)
    run(t)
    assert count() == before + 2


def test_a_20_mb_body_is_held_once(tmp_path: Path) -> None:
    body = b"x" * (20 * 1024 * 1024)
    payload = request("/ccr-authz/full/v1/messages", body)

    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address)
        tracemalloc.start()
        try:
            w.write(payload)
            (a,) = await rd.answers(1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert a.status == 200
        got = authz.checks[0][1]
        assert len(got) == len(body) and bytes(got[-3:]) == b"xxx"
        # The client's copy was made before tracing: what the front allocated is one buffer and its reads.
        assert peak < 1.5 * len(body), peak
    run(t, _config(max_request_bytes=32 * 1024 * 1024))


# -- mutual TLS


def _tls(tmp: Path) -> tuple[ssl.SSLContext, Any]:
    pki = issue_run_pki(tmp / "pki", ["extauth", "envoy", "ratelimit"])
    ctx = side_tls("extauth", SimpleNamespace(mtls=pki), None)  # type: ignore[arg-type]
    assert ctx is not None
    return ctx, pki


def _client(pki: Any, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    ident = pki.identity(name)
    ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def test_mtls_serves_envoy_and_refuses_another_identity(tmp_path: Path) -> None:
    server_ctx, pki = _tls(tmp_path)
    envoy_id = pki.identity("envoy").spiffe_id

    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        rd, w = await connect(address, _client(pki, "envoy"))
        w.write(request("/ccr-authz/full/a"))
        assert (await rd.answers(1))[0].status == 200
        before = metrics.MTLS_REFUSALS.labels("extauth", "wrong_spiffe_id")._value.get()
        rd, w = await connect(address, _client(pki, "ratelimit"))
        w.write(request("/ccr-authz/full/b"))
        with pytest.raises((AssertionError, ConnectionError, ssl.SSLError)):
            await rd.answers(1)
        assert metrics.MTLS_REFUSALS.labels("extauth", "wrong_spiffe_id")._value.get() == before + 1
        assert [r.attributes.request.http.path for r, _ in authz.checks] == ["/a"]
        # Without a client certificate the handshake itself fails, and is counted.
        failed = metrics.MTLS_REFUSALS.labels("extauth", "handshake_failed")
        before = failed._value.get()
        rd, w = await connect(address, ssl.create_default_context(cafile=pki.ca))
        w.write(request("/ccr-authz/full/c"))
        with pytest.raises((AssertionError, ConnectionError, ssl.SSLError)):
            await rd.answers(1)
        assert len(authz.checks) == 1
        await until(lambda: failed._value.get() != before)
        assert failed._value.get() == before + 1
    run(t, tls=server_ctx, peers=(envoy_id,))


def test_tls_without_an_allowed_peer_is_refused_at_start(tmp_path: Path) -> None:
    server_ctx, _ = _tls(tmp_path)

    async def main() -> None:
        front = AuthzHttpFront(Recording(), _config())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="allowed peer"):
            await front.start("127.0.0.1", 0, tls=server_ctx, peers=())

    uvloop.run(main())


def test_a_new_config_version_changes_what_an_answer_may_name() -> None:
    def declared(note: bool):  # noqa: ANN202
        return parse_config({"version": 1, "providers": [{"name": "anthropic"}],
                             "models": [{"match": "claude-*", "provider": "anthropic"}],
                             "services": {"authz_transport": "http"},
                             "policy": {"result_names": {"response_headers": ["x-policy-note"] if note else []}}})

    async def t(front: AuthzHttpFront, authz: Recording, address: str) -> None:
        def answer(req: pb.CheckRequest) -> pb.CheckResponse:
            resp = _ok("m")
            resp.ok_response.response_headers_to_add.add().header.CopyFrom(
                base_pb2.HeaderValue(key="x-policy-note", value="hi"))
            return resp
        authz.answer = answer
        rd, w = await connect(address)
        w.write(request("/ccr-authz/full/a"))
        assert (await rd.answers(1))[0].status == AUTHZ_HTTP_STATUS_STANDINS[503]
        front.use_config(declared(True))  # as ccr/config_sync.py applies a new version
        w.write(request("/ccr-authz/full/a"))
        (a,) = await rd.answers(1)
        assert a.status == 200 and a.get("x-policy-note") == "hi"
    run(t, declared(False))
