"""extauth's HTTP/1.1 front: Envoy's ext_authz `http_service` checks, decided by the same Authorizer.

Why: over mTLS, Envoy's HTTP/1.1 call to an asyncio server parsing with httptools costs about 0.47 ms
less CPU per request than the gRPC Check, grpcio's per-call floor (docs/hot-path.md). The gRPC server
keeps running next to it (health, and the gRPC Check still works).

One asyncio Protocol per connection (uvloop's loop in the service process): keep-alive, pipelined
requests answered in order, bounded headers and body, a malformed request answered 400 and the
connection closed. A check request is rebuilt into the CheckRequest the gRPC Check receives
(extauth/http_wire.py); its body goes to Authorizer.check as a view of the one buffer it was read into.
With mTLS the caller must be Envoy: its SPIFFE ID is checked once per connection, at the handshake.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import httptools
from envoy.service.auth.v3 import external_auth_pb2 as pb

from ccr import metrics, tracing
from ccr.config import GatewayConfig
from ccr.contract import AUTHZ_HTTP_HEALTH_PATH, H_REQUEST_ID, READY_AUTHZ_HTTP
from ccr.logs import REQUEST_ID
from ccr.metrics import MTLS_PEER_REFUSALS, MTLS_REFUSALS
from ccr.svid import peer_uri_sans
from extauth.http_wire import (
    FULL,
    AnswerNames,
    Undeclared,
    answer,
    check_request,
    error_answer,
    plain_answer,
    split_target,
    undeclared_refusal,
)
from extauth.server import Authorizer, check_identity

log = logging.getLogger("extauth.http")

# Envoy's check request carries the client's headers (the listener allows 96 KiB) plus the peer
# certificate it adds (URL-encoded PEM, a few KiB): anything larger is not Envoy's.
MAX_HEADER_BYTES = 160 * 1024
MAX_HEADERS = 256
# Bytes past gateway.max_request_bytes a check may carry (Envoy never sends more than that limit).
BODY_SLACK = 64 * 1024
# Pipelined requests waiting on one connection before it stops reading (Envoy sends one at a time).
MAX_PENDING, RESUME_PENDING = 8, 2
METHOD = "Authorization/CheckHTTP"  # ccr_rpc_duration_seconds{method}: the gRPC Check is Authorization/Check
_INTERNAL = ("the gateway could not authorize this request due to an internal error; retry shortly, and "
             "contact your gateway administrator if it persists")


class _Refuse(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass(slots=True)
class _Request:
    """One parsed request, or a refusal decided while parsing (`ready`: its answer, bytes)."""

    keep_alive: bool
    phase: str | None = None
    method: str = ""
    path: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray | None = None
    health: bool = False
    ready: bytes | None = None


class AuthzHttpFront:
    """The server: `start()` binds and serves; `begin_drain()`, `until_watchers_told()` and `stop()`
    take it down as serve_grpc takes the gRPC server down (ccr/service.py)."""

    ready_key = READY_AUTHZ_HTTP
    port_arg = "authz_http_port"

    def __init__(self, authorizer: Authorizer, config: GatewayConfig, *, service: str = "extauth",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.authorizer = authorizer
        self.service = service
        self._clock = clock
        self.use_config(config)
        self._timer = metrics.Timer(service, METHOD) if config.telemetry.metrics else None
        self.draining = False  # health answers 503
        self.closing = False  # answers close their connection; idle connections are closed
        self.allowed_peers: frozenset[str] = frozenset()
        self.connections: set[_Connection] = set()
        self._none_left = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._asked: dict[str, tuple[float, int]] = {}  # health checker -> (when, the status it was told)

    def use_config(self, config: GatewayConfig) -> None:
        """A new config version (ccr/config_sync.py): its declared names and body limit, from the next check."""
        self.names = AnswerNames.of(config)
        self.authorizer.answer_check = self.names.undeclared_in_answer
        self.body_limit = config.gateway.max_request_bytes + BODY_SLACK

    async def start(self, host: str, port: int, *, reuse_port: bool = False, tls: ssl.SSLContext | None = None,
                    peers: Collection[str] = ()) -> str:
        """Bind host:port (0: any free; `reuse_port`: SO_REUSEPORT, one of several workers) and serve;
        the bound "host:port". With `tls`, only callers whose SPIFFE ID is one of `peers` are served."""
        if tls is not None and not peers:
            raise ValueError("TLS without an allowed peer identity would serve any certificate of the trust domain")
        self.allowed_peers = frozenset(peers)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host.strip("[]"), port))
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self, tls is not None), sock=sock, ssl=tls,
                                                backlog=1024)
        bound = sock.getsockname()[1]
        return f"{host}:{bound}"

    # -- drain

    def begin_drain(self) -> None:
        """Health answers 503 from now on; checks are still answered."""
        self.draining = True

    def watchers_not_told(self, since: float, recent_s: float) -> list[str]:
        return [peer for peer, (at, status) in self._asked.items()
                if since - recent_s <= at and not (at >= since and status == 503)]

    async def until_watchers_told(self, since: float, timeout_s: float, recent_s: float = 3.0) -> list[str]:
        """Wait (at most `timeout_s`) for every recent health checker to hear 503; those that did not."""
        deadline = self._clock() + timeout_s
        while (left := self.watchers_not_told(since, recent_s)) and self._clock() < deadline:
            await asyncio.sleep(0.05)
        return left

    async def stop(self, grace_s: float) -> None:
        """Take no new connections, close idle ones, let in-flight checks finish (their answers close
        their connections), and after `grace_s` close whatever is left."""
        self.draining = self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            self._none_left.clear()
            try:
                await asyncio.wait_for(self._none_left.wait(), grace_s)
            except TimeoutError:
                log.warning("closing %d connection(s) with checks still in flight", len(self.connections))
                for conn in list(self.connections):
                    conn.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _gone(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._none_left.set()

    # -- one request

    def health(self, peer: str, keep_alive: bool) -> bytes:
        status = 503 if self.draining else 200
        now = self._clock()
        if len(self._asked) >= 1024:  # checkers that reconnect come back as new peers: forget the old ones
            self._asked = {p: v for p, v in self._asked.items() if now - v[0] < 60.0}
        self._asked[peer] = (now, status)
        return plain_answer(status, keep_alive)

    async def decide(self, r: _Request, keep_alive: bool) -> bytes:
        """The answer to one check request; never raises (an error is a 503 refusal)."""
        timer = self._timer
        start = time.perf_counter()
        failed = False
        resp: pb.CheckResponse | None = None
        try:
            body = r.body if r.body is not None else b""
            req = check_request(r.method, r.path, r.headers, len(body), r.phase or FULL)
            REQUEST_ID.set(req.attributes.request.http.headers.get(H_REQUEST_ID) or None)
            parent = tracing.parent_from_metadata(r.headers) if tracing.TRACER is not None else None
            if parent is None:
                resp = await self._decide(req, r.phase, body)
            else:
                with tracing.server_span(f"{self.service} {METHOD}", parent):
                    resp = await self._decide(req, r.phase, body)
            keep_alive = keep_alive and not self.closing  # a drain that began meanwhile closes the connection
            return answer(resp, self.names, keep_alive)
        except Undeclared as e:
            failed = True
            log.error("refused an authorization answer Envoy would have cut short: %s (declare it in "
                      "policy.result_names, or change the policy)", e)
            if resp is None:
                return error_answer(503, "api_error", _INTERNAL, keep_alive)
            return undeclared_refusal(resp, self.names, _INTERNAL, keep_alive)
        except Exception:
            failed = True
            log.exception("the HTTP authorization front failed; refusing")
            return error_answer(503, "api_error", _INTERNAL, keep_alive)
        finally:
            if timer is not None:
                timer.done(start, failed)

    async def _decide(self, req: pb.CheckRequest, phase: str | None, body: bytearray | bytes) -> pb.CheckResponse:
        if phase == FULL:
            return await self.authorizer.check(req, memoryview(body) if body else None)
        return await check_identity(self.authorizer, req)


def _handshake_refused(made: list[bool], service: str) -> None:
    if not made[0]:
        log.warning("refused a TLS connection to the HTTP authorization front: the handshake failed (plaintext, "
                    "no client certificate, or one the trust bundle does not verify)")
        MTLS_REFUSALS.labels(service, "handshake_failed").inc()


class _Connection(asyncio.Protocol):
    """One connection from Envoy: parses with httptools, answers in order."""

    def __init__(self, front: AuthzHttpFront, tls: bool) -> None:
        self.front = front
        self.tls = tls
        self._made = [False]
        if tls:  # a refused handshake never reaches connection_made, and the loop reports it nowhere
            weakref.finalize(self, _handshake_refused, self._made, front.service)
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None  # made once connected (it refers back to us)
        self.peer = ""
        self.pending: collections.deque[_Request] = collections.deque()
        self.running = False
        self.paused = False
        self.broken = False  # a refusal that closes the connection is queued: read nothing more
        # The message being parsed.
        self._in_message = False
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._body: bytearray | None = None
        self._body_at = 0
        self._phase: str | None = None
        self._discard = False

    # -- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made[0] = True
        self.transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        if self.tls:  # once per connection: the handshake is done when the protocol is connected
            uris = peer_uri_sans(transport.get_extra_info("peercert"))
            peer = uris[0] if len(uris) == 1 else None
            if peer not in self.front.allowed_peers:
                log.warning("refused an HTTP authorization connection from %s (peer identity %s; allowed: %s)",
                            self.peer, peer, sorted(self.front.allowed_peers))
                MTLS_PEER_REFUSALS.labels(peer or "none").inc()
                MTLS_REFUSALS.labels(self.front.service, "wrong_spiffe_id").inc()
                transport.abort()
                return
        self.parser = httptools.HttpRequestParser(self)
        self.front.connections.add(self)
        if self.front.closing:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self.pending.clear()
        self.parser = None  # the reference cycle, broken without the cyclic GC
        self.front._gone(self)

    def close_if_idle(self) -> None:
        if not self.running and not self.pending and not self._in_message and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if self.broken or parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refuse = e.__context__ if isinstance(e.__context__, _Refuse) else None
            if refuse is None:
                log.error("the HTTP authorization front could not read a request: %r", e.__context__)
                refuse = _Refuse(400, "invalid_request_error", "malformed authorization request")
            self._fail(refuse)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(_Refuse(400, "invalid_request_error", f"malformed authorization request: {e}"))

    def _fail(self, refuse: _Refuse) -> None:
        """Answer `refuse` after what is already queued, then close; read nothing more."""
        self.broken = True
        self._in_message = False
        self._body = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.pending.append(_Request(keep_alive=False, ready=error_answer(refuse.status, refuse.kind,
                                                                          refuse.message, keep_alive=False)))
        self._kick()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = []
        self._headers = []
        self._header_bytes = 0
        self._body = None
        self._body_at = 0
        self._phase = None
        self._discard = False

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refuse(431, "invalid_request_error", "the authorization request's headers are too large")
        if len(self._headers) >= MAX_HEADERS:
            raise _Refuse(431, "invalid_request_error", "too many headers in the authorization request")
        self._headers.append((name.decode("latin-1").lower(), value.decode("utf-8", "replace")))

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refuse(431, "invalid_request_error", "the authorization request's headers are too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        if parser.should_upgrade():
            raise _Refuse(400, "invalid_request_error", "an authorization request cannot upgrade")
        target = b"".join(self._url).decode("latin-1")
        split = split_target(target)
        if split is None:
            self._discard = True  # a 404 or the health answer: the body, if any, is not kept
            return
        self._phase = split[0]
        length = None
        for name, value in self._headers:
            if name == "content-length":
                length = int(value) if value.isdigit() else -1
        limit = self.front.body_limit
        if length is not None and (length < 0 or length > limit):
            raise _Refuse(413, "request_too_large", f"request body exceeds the gateway's limit of {limit} bytes")
        # One buffer of the announced size; the body is read into it and handed on as a view.
        self._body = bytearray(length) if length else None

    def on_body(self, chunk: bytes) -> None:
        if self._discard:
            return
        end = self._body_at + len(chunk)
        if self._body is None:
            self._body = bytearray()
        if end > len(self._body):  # chunked (never from Envoy, which sends a Content-Length)
            if end > self.front.body_limit:
                raise _Refuse(413, "request_too_large",
                              f"request body exceeds the gateway's limit of {self.front.body_limit} bytes")
            self._body.extend(chunk)
        else:
            self._body[self._body_at:end] = chunk
        self._body_at = end

    def on_message_complete(self) -> None:
        self._in_message = False
        parser = self.parser
        assert parser is not None
        keep_alive = parser.should_keep_alive()
        target = b"".join(self._url).decode("latin-1")
        if self._phase is not None:
            split = split_target(target)
            assert split is not None
            body = self._body
            if body is not None and self._body_at != len(body):  # cannot happen with a well-framed request
                del body[self._body_at:]
            r = _Request(keep_alive, self._phase, parser.get_method().decode("latin-1"), split[1], self._headers,
                         body)
        elif target.partition("?")[0] == AUTHZ_HTTP_HEALTH_PATH:
            r = _Request(keep_alive, health=True)
        else:
            r = _Request(keep_alive, ready=error_answer(404, "not_found_error",
                                                        "not an authorization request path", keep_alive))
        self._body = None
        self.pending.append(r)
        if len(self.pending) >= MAX_PENDING and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._kick()

    # -- answering, in order

    def _kick(self) -> None:
        if not self.running and self.pending:
            self.running = True
            asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        front = self.front
        try:
            while self.pending:
                r = self.pending.popleft()
                keep_alive = r.keep_alive and not front.closing
                if r.ready is not None:
                    out = r.ready
                elif r.health:
                    out = front.health(self.peer, keep_alive)
                else:
                    out = await front.decide(r, keep_alive)
                    keep_alive = keep_alive and not front.closing
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                transport.write(out)
                if not keep_alive:
                    transport.close()
                    return
                if self.paused and len(self.pending) <= RESUME_PENDING and not self.broken:
                    self.paused = False
                    transport.resume_reading()
        finally:
            self.running = False
