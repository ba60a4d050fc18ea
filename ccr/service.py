"""Shared start-up for the gRPC services: flags, port binding, readiness, shutdown.

Each service binds port 0 on the configured host (no assumed free port), then
writes its real address to `--ready-file`, which is how the supervisor learns
that it is serving and where.

A service that names `mtls_peers` serves mutual TLS and answers only callers whose certificate
carries one of those SPIFFE IDs. Its identity comes from the SPIRE agent's Workload API when the
runtime names an agent socket (ccr/svid.py, rotated without a restart), else from the run PKI
files (ccr/pki.py) for a service started with `require_mtls` (the adapter), which refuses to
start rather than serve in plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ccr import metrics, tracing
from ccr.config import GatewayConfig
from ccr.config_sync import Follower, start_config
from ccr.contract import READY_METRICS
from ccr.logs import start_logging
from ccr.metrics import MTLS_PEER_REFUSALS, MTLS_REFUSALS
from ccr.pki import RunPki, spiffe_id, uri_sans
from ccr.rpc_observe import AioRpcObserver, RpcObserver
from ccr.runtime import Runtime
from ccr.svid import SvidSource
from ccr.tls_refusals import tap_handshake_refusals

log = logging.getLogger("ccr.service")

# Bodies of 20 MB and more cross extauth; grpcio's 4 MB default would reject them.
GRPC_MAX_MESSAGE = 512 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
]


def parse_args(name: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"ccr-{name}")
    ap.add_argument("--runtime", required=True, help="runtime.json written by `ccr up`")
    ap.add_argument("--ready-file", help="where to write {'address': 'host:port', 'pid': n}")
    ap.add_argument("--host", help="address to bind (default: services.bind_host)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--metrics-listen", help="host:port for /metrics (default: a free port on the service's host)")
    ap.add_argument("--reuse-port", action="store_true",
                    help="bind with SO_REUSEPORT: one of several workers sharing the port")
    ap.add_argument("--authz-http-port", type=int, default=0,
                    help="extauth with services.authz_transport: http: the HTTP front's port (0: any free; "
                         "with --reuse-port, shared by the workers)")
    ap.add_argument("--start-after", help="wait until this file exists before reading --runtime (the supervisor "
                                          "starts the process early, so its imports overlap the others' start-up)")
    args = ap.parse_args()
    if args.start_after:
        wait_for_file(Path(args.start_after))
    return args


def wait_for_file(path: Path, poll_s: float = 0.01) -> None:
    """Block until `path` exists. Nothing to time out: the supervisor that will create it stops this process
    (and its parent-death signal does) if it never does."""
    while not path.exists():
        time.sleep(poll_s)


def server_options(reuse_port: bool) -> list[tuple[str, Any]]:
    """GRPC_OPTIONS, with SO_REUSEPORT only for workers that share a port.

    Off otherwise: a lone service must fail to bind a port someone else holds, not share it.
    (The kernel lets only processes of the same user share a port.)
    """
    return [(k, int(reuse_port) if k == "grpc.so_reuseport" else v) for k, v in GRPC_OPTIONS]


def write_ready(path: str | None, address: str, **extra: object) -> None:
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **extra}))
    tmp.replace(path)


def server_credentials(pki: RunPki, name: str) -> grpc.ServerCredentials:
    """TLS with this service's run identity; callers must present a certificate from the run CA."""
    ident = pki.identity(name)
    return grpc.ssl_server_credentials(
        [(Path(ident.key).read_bytes(), Path(ident.cert).read_bytes())],
        root_certificates=Path(pki.ca).read_bytes(),
        require_client_auth=True,
    )


def client_credentials(pki: RunPki, name: str) -> grpc.ChannelCredentials:
    """The other side: a gRPC client that presents this run identity and trusts only the run CA."""
    ident = pki.identity(name)
    return grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(ident.key).read_bytes(),
                                        Path(ident.cert).read_bytes())


def peer_spiffe_id(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's SPIFFE ID: the single URI SAN of its verified certificate, else None."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    pems = auth.get("x509_pem_cert") or []
    return _svid_id(pems[0]) if len(pems) == 1 else None


@functools.lru_cache(maxsize=64)
def _svid_id(pem: bytes) -> str | None:
    # Parsed once per certificate, not per stream. An X.509-SVID has exactly one URI SAN;
    # anything else is not an identity we understand.
    uris = uri_sans(pem)
    return uris[0] if len(uris) == 1 else None


class PeerIdentityCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC whose verified peer is not one of `allowed` (SPIFFE IDs).

    TLS with require_client_auth proves the caller holds a run certificate; this proves it
    is the *right* process of the run (a run CA issues identities to several processes).
    """

    def __init__(self, allowed: Collection[str], service: str = "") -> None:
        self._allowed = frozenset(allowed)
        self._service = service

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        peer = peer_spiffe_id(context)
        if peer not in self._allowed:
            log.warning("refused a call from %s (peer identity %s; allowed: %s)", context.peer(), peer,
                        sorted(self._allowed))
            MTLS_PEER_REFUSALS.labels(peer or "none").inc()
            MTLS_REFUSALS.labels(self._service, "wrong_spiffe_id").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"peer identity {peer} may not call this service")

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        check = self._check

        async def drain(result: Any) -> AsyncIterator[Any]:
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write() and returns None
                await result

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await handler.unary_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(uu, **kw)
        if handler.stream_unary:
            async def su(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await handler.stream_unary(requests, context)
            return grpc.stream_unary_rpc_method_handler(su, **kw)
        if handler.unary_stream:
            async def us(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await check(context)
                async for item in drain(handler.unary_stream(request, context)):
                    yield item
            return grpc.unary_stream_rpc_method_handler(us, **kw)

        async def ss(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for item in drain(handler.stream_stream(requests, context)):
                yield item
        return grpc.stream_stream_rpc_method_handler(ss, **kw)


def _observers(name: str, config: GatewayConfig, args: argparse.Namespace, *, aio: bool) -> list[Any]:
    """Telemetry (docs/observability.md): this process's /metrics port, its tracer, and the interceptor
    that times (and, with tracing on, traces) each unary call."""
    tracing.setup(config, name)
    if not config.telemetry.metrics:
        return []
    metrics.serve(*metrics_address(config, args))
    return [AioRpcObserver(name) if aio else RpcObserver(name)]


def metrics_address(config: GatewayConfig, args: argparse.Namespace) -> tuple[str, int]:
    if args.metrics_listen:
        host, _, port = args.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)
    return args.host or config.services.bind_host, 0


def _metrics_ready() -> dict[str, object]:
    return {READY_METRICS: metrics.address} if metrics.address else {}


class SyncPeerIdentityCheck(grpc.ServerInterceptor):
    """PeerIdentityCheck for grpcio's sync server (ratelimit)."""

    def __init__(self, allowed: Collection[str], service: str = "") -> None:
        self._allowed = frozenset(allowed)
        self._service = service

    def _check(self, context: grpc.ServicerContext) -> None:
        peer = peer_spiffe_id(context)  # type: ignore[arg-type]
        if peer not in self._allowed:
            log.warning("refused a call from %s (peer identity %s; allowed: %s)", context.peer(), peer,
                        sorted(self._allowed))
            MTLS_PEER_REFUSALS.labels(peer or "none").inc()
            MTLS_REFUSALS.labels(self._service, "wrong_spiffe_id").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"peer identity {peer} may not call this service")

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        check = self._check
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            def uu(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return handler.unary_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(uu, **kw)
        if handler.stream_unary:
            def su(requests: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return handler.stream_unary(requests, context)
            return grpc.stream_unary_rpc_method_handler(su, **kw)
        if handler.unary_stream:
            def us(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                yield from handler.unary_stream(request, context)
            return grpc.unary_stream_rpc_method_handler(us, **kw)

        def ss(requests: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            yield from handler.stream_stream(requests, context)
        return grpc.stream_stream_rpc_method_handler(ss, **kw)


def mtls_credentials(name: str, runtime: Runtime, peers: Collection[str], required: bool
                     ) -> tuple[grpc.ServerCredentials | None, frozenset[str], SvidSource | None]:
    """(server credentials, allowed peer SPIFFE IDs, the SVID source to close) for a service.

    (None, {}, None): plaintext, only without a SPIFFE agent and when mTLS is not `required`.
    """
    if not peers:
        return None, frozenset(), None
    if runtime.spiffe_socket:
        source = SvidSource(runtime.spiffe_socket)
        own = source.material().spiffe_id
        trust_domain = own.removeprefix("spiffe://").split("/", 1)[0]
        if own != spiffe_id(name, trust_domain):
            log.warning("the Workload API gave this process %s, not %s", own, spiffe_id(name, trust_domain))
        return source.server_credentials(), frozenset(spiffe_id(p, trust_domain) for p in peers), source
    # Without SPIFFE, the run PKI (ccr/pki.py) covers only the hop that must be mTLS (the adapter).
    if required and runtime.mtls is not None and name in runtime.mtls.identities:
        return (server_credentials(runtime.mtls, name),
                frozenset(spiffe_id(p, runtime.mtls.trust_domain) for p in peers), None)
    if required:
        raise SystemExit(f"{name}: serves only mutual TLS, but the runtime has neither a SPIFFE agent socket "
                         "nor a run PKI identity for it")
    return None, frozenset(), None


def _start_config(name: str, runtime: Runtime, args: argparse.Namespace) -> tuple[GatewayConfig, Follower | None]:
    """The run's current config version when this service follows them (ccr/config_sync.py), else the file."""
    return start_config(name, runtime.run_dir, args.ready_file, runtime.config_path,
                        name in runtime.config_followers)


Setup = Callable[[grpc.aio.Server, GatewayConfig, Runtime], Awaitable[Callable[[], Awaitable[None]] | None]]

# Called once a draining service's health checkers were told NOT_SERVING, before the server stops
# taking calls (the access log receiver ends its streams there: audit/service.py).
_drain_hooks: list[Callable[[], None]] = []


def on_drain(hook: Callable[[], None]) -> None:
    _drain_hooks.append(hook)


class SideListener(Protocol):
    """A second server of the same process, next to its gRPC port (extauth's HTTP front), started
    after setup on the same loop, reported in the ready file under `ready_key`, drained with the gRPC
    server: told first (health), then stopped with the same grace."""

    ready_key: str
    port_arg: str  # the parse_args attribute holding its port

    async def start(self, host: str, port: int, *, reuse_port: bool = False, tls: ssl.SSLContext | None = None,
                    peers: Collection[str] = ()) -> str: ...

    def begin_drain(self) -> None: ...

    async def until_watchers_told(self, since: float, timeout_s: float) -> list[str]: ...

    async def stop(self, grace_s: float) -> None: ...


_side_listeners: list[SideListener] = []


def add_listener(listener: SideListener) -> None:
    """Called from a service's setup: serve `listener` too (with this service's mTLS peers when it has any)."""
    _side_listeners.append(listener)


def side_tls(name: str, runtime: Runtime, svids: SvidSource | None) -> ssl.SSLContext | None:
    """The TLS of a side listener when the gRPC port serves mTLS: the SPIFFE agent's SVID (reloaded in
    place on rotation), else the run PKI identity (a service started with require_mtls)."""
    if svids is not None:
        return svids.ssl_server_context()
    if runtime.mtls is None or name not in runtime.mtls.identities:
        raise SystemExit(f"{name}: its gRPC port serves mTLS but there is no identity for its HTTP port")
    ident = runtime.mtls.identity(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.load_verify_locations(runtime.mtls.ca)
    return ctx


class ObservedHealth(health.aio.HealthServicer):
    """grpc.health.v1 that remembers which health checkers asked, and what they were told.

    A draining replica must leave Envoy's rotation before it refuses work: Envoy learns it only
    from its next health check (every second), and until then may still choose this replica for a
    new call or a new access log stream, which a stopped server refuses (the access log loses the
    entries sent on a refused stream: the protocol has no acknowledgement). So on SIGTERM the
    service answers NOT_SERVING and waits until every checker that was watching it has heard so.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._asked: dict[str, tuple[float, int]] = {}  # peer -> (when, the status it was told)

    async def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802 - gRPC method name
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        response = await super().Check(request, context)
        if response is not None:
            self._asked[context.peer()] = (self._clock(), response.status)
        return response

    def watchers_not_told(self, since: float, recent_s: float) -> list[str]:
        """Checkers that asked within `recent_s` before `since` and were not told NOT_SERVING after it."""
        told = health_pb2.HealthCheckResponse.NOT_SERVING
        return [peer for peer, (at, status) in self._asked.items()
                if since - recent_s <= at and not (at >= since and status == told)]

    async def until_watchers_told(self, since: float, timeout_s: float, recent_s: float = 3.0) -> list[str]:
        """Wait (at most `timeout_s`) for every recent checker to hear NOT_SERVING; those that did not."""
        deadline = self._clock() + timeout_s
        while (left := self.watchers_not_told(since, recent_s)) and self._clock() < deadline:
            await asyncio.sleep(0.05)
        return left


def _bind(server: grpc.Server | grpc.aio.Server, name: str, host: str, port: int,
          creds: grpc.ServerCredentials | None) -> str:
    bind = f"{host}:{port}"
    bound = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {bind}")
    return f"{host}:{bound}"


async def serve_grpc(name: str, setup: Setup, mtls_peers: Collection[str] = (), require_mtls: bool = False) -> None:
    """Run one gRPC service until SIGTERM/SIGINT.

    `setup` registers servicers on the server and may return an async cleanup.
    `mtls_peers` (identity names, e.g. contract.ID_ENVOY): serve mutual TLS only, to them, when the
    run gives this service an identity (always, with `require_mtls`).
    """
    args = parse_args(name)
    runtime = Runtime.load(args.runtime)
    config, follower = _start_config(name, runtime, args)
    if mtls_peers:
        tap_handshake_refusals(name)
    start_logging(name, config.services.log_format)
    creds, allowed, svids = mtls_credentials(name, runtime, mtls_peers, require_mtls)
    interceptors: list[grpc.aio.ServerInterceptor] = [PeerIdentityCheck(allowed, name)] if creds else []
    interceptors += _observers(name, config, args, aio=True)
    server = grpc.aio.server(options=server_options(args.reuse_port), interceptors=interceptors)
    checks = ObservedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    _side_listeners.clear()
    cleanup = await setup(server, config, runtime)
    host = args.host or config.services.bind_host
    address = _bind(server, name, host, args.port, creds)
    sides = list(_side_listeners)
    side_addresses: dict[str, object] = {}
    for side in sides:
        tls = side_tls(name, runtime, svids) if creds else None
        port = getattr(args, side.port_arg)
        try:
            side_addresses[side.ready_key] = await side.start(host, port, reuse_port=args.reuse_port, tls=tls,
                                                              peers=allowed)
        except OSError as e:
            raise SystemExit(f"{name}: cannot bind {host}:{port} for {side.ready_key}: {e.strerror}") from None
    frozen = freeze_startup_heap()  # extauth decides limits in its Check too: the same GC stalls (see there)
    await server.start()
    # SERVING only now: setup has reached the service's dependencies (stores, bundles).
    for service in ("", name):
        await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    write_ready(args.ready_file, address, **_metrics_ready(), **side_addresses)
    logging.info("serving on %s%s (%d start-up objects frozen out of the cyclic GC)", address,
                 "".join(f", {k} on {v}" for k, v in side_addresses.items()), frozen)
    if follower is not None:
        follower.start_async()  # on this loop: a new config is swapped in between two requests

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    drain = config.services.drain_timeout_s
    logging.info("stopping: health NOT_SERVING, draining in-flight calls for up to %.0fs", drain)
    flipped = time.monotonic()
    await checks.enter_graceful_shutdown()
    for side in sides:
        side.begin_drain()
    if follower is not None:
        follower.stop()
    # Out of Envoy's rotation first (a few health-check intervals at most), then stop taking calls.
    told = min(5.0, drain / 2)
    missed = [m for ms in await asyncio.gather(checks.until_watchers_told(flipped, told),
                                               *(side.until_watchers_told(flipped, told) for side in sides))
              for m in ms]
    if missed:
        logging.warning("draining although %d health checker(s) did not ask again: %s", len(missed), missed)
    logging.info("out of rotation: refusing new calls; draining")
    for hook in _drain_hooks:  # no await before them: no handler runs between that line and these
        hook()
    grace = max(0.0, drain - (time.monotonic() - flipped))
    await asyncio.gather(server.stop(grace=grace), *(side.stop(grace) for side in sides))
    if cleanup is not None:
        await cleanup()
    tracing.shutdown()
    if svids is not None:
        svids.close()
    logging.info("stopped")


def run(name: str, setup: Setup, mtls_peers: Collection[str] = (), *, fast_loop: bool = False,
        require_mtls: bool = False) -> None:
    """`fast_loop`: run on uvloop, which cut the hot-path services' CPU per call by about a tenth
    (bench/profiles.md); opt-in per service, the others keep asyncio's loop."""
    if fast_loop:
        import uvloop

        uvloop.run(serve_grpc(name, setup, mtls_peers, require_mtls))
    else:
        asyncio.run(serve_grpc(name, setup, mtls_peers, require_mtls))


SyncSetup = Callable[[grpc.Server, GatewayConfig, Runtime], Callable[[], None] | None]


def freeze_startup_heap() -> int:
    """Move what start-up built (modules, grpcio, protobuf, config: ~90k objects) out of the cyclic
    GC's sight. A full collection walks every tracked object, and over that heap it took 35-130 ms
    on this machine, a stall every call in flight waits out (a p99 spike at 500 req/s); after the
    freeze it walks only what calls created since. Start-up's garbage is collected first, so none
    of it is kept; frozen objects are still freed by reference counting (only a start-up object
    in a reference cycle dropped later, e.g. on a config reload, is never collected: once, bounded)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_threaded(name: str, setup: SyncSetup, threads: int, mtls_peers: Collection[str] = ()) -> None:
    """Run one gRPC service on grpcio's sync server (a pool of `threads`) until SIGTERM/SIGINT.

    For handlers that only block on I/O (ratelimit: one Redis call). grpcio's sync server costs
    less CPU per call than grpc.aio, with asyncio's loop or uvloop (bench/profiles.md).
    """
    args = parse_args(name)
    runtime = Runtime.load(args.runtime)
    config, follower = _start_config(name, runtime, args)
    if mtls_peers:
        tap_handshake_refusals(name)
    start_logging(name, config.services.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    creds, allowed, svids = mtls_credentials(name, runtime, mtls_peers, False)
    server = grpc.server(futures.ThreadPoolExecutor(threads, thread_name_prefix=name),
                         options=server_options(args.reuse_port),
                         interceptors=([SyncPeerIdentityCheck(allowed, name)] if creds else [])
                         + _observers(name, config, args, aio=False))
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    cleanup = setup(server, config, runtime)
    address = _bind(server, name, args.host or config.services.bind_host, args.port, creds)
    frozen = freeze_startup_heap()
    server.start()
    for service in ("", name):
        checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    logging.info("serving on %s (%d threads; %d start-up objects frozen out of the cyclic GC)", address, threads,
                 frozen)
    write_ready(args.ready_file, address, **_metrics_ready())
    if follower is not None:
        follower.start_thread()
    stop.wait()
    if follower is not None:
        follower.stop()
    drain = config.services.drain_timeout_s
    logging.info("stopping: health NOT_SERVING, draining in-flight calls for up to %.0fs", drain)
    checks.enter_graceful_shutdown()
    server.stop(grace=drain).wait()
    if cleanup is not None:
        cleanup()
    tracing.shutdown()
    if svids is not None:
        svids.close()
    logging.info("stopped")
