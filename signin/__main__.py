"""`python -m signin --runtime RUN/runtime.json --ready-file F`: the sign-in HTTP service."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from ccr import metrics
from ccr.config import GatewayConfig
from ccr.contract import ID_ENVOY, READY_METRICS
from ccr.logs import start_logging
from ccr.metrics import MTLS_PEER_REFUSALS, MTLS_REFUSALS
from ccr.runtime import Runtime
from ccr.service import metrics_address, parse_args, write_ready
from signin.idp import IdpClient
from signin.keys import (
    PUBLIC_KEYS,
    SIGNING_KEY,
    KeyFile,
    Sealer,
    ensure_keys,
    load_public_keys,
    load_signing_key,
)
from signin.service import SigninService
from signin.store import SessionStore

log = logging.getLogger("ccr.signin")


def gateway_url(config: GatewayConfig, runtime_path: str) -> str:
    """Where browsers reach the gateway: `identity.signin.public_url`, else the listener."""
    s = config.identity.signin
    if s is not None and s.public_url:
        return s.public_url.rstrip("/")
    host = config.gateway.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = config.gateway.listen.port or Runtime.load(runtime_path).listen_port
    if not port:
        raise RuntimeError("the gateway's listen port is not known yet")
    scheme = "https" if config.gateway.tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve() -> None:
    args = parse_args("signin")
    runtime = Runtime.load(args.runtime)
    config = runtime.config()
    start_logging("signin", config.services.log_format)
    settings = config.identity.signin
    if settings is None:
        raise SystemExit("signin: identity.signin is not configured")
    if not runtime.signin_key_dir:
        raise SystemExit("signin: the runtime names no signin_key_dir")
    secret = None
    if settings.client_secret_env:
        secret = os.environ.get(settings.client_secret_env)
        if not secret:
            raise SystemExit(f"signin: identity.signin.client_secret_env names {settings.client_secret_env}, "
                             f"which is not set")
    key_dir = ensure_keys(runtime.signin_key_dir)
    sealer = Sealer.load(key_dir)
    url_cache: list[str] = []

    def public_url() -> str:
        if not url_cache:
            url_cache.append(gateway_url(config, args.runtime))
        return url_cache[0]

    async with aiohttp.ClientSession() as http:
        issuer = next(i for i in config.identity.oidc if i.issuer == settings.issuer)  # checked by the config
        idp = IdpClient(issuer, settings.client_id, secret, settings.scopes, http)
        store = SessionStore(runtime.postgres_dsn, sealer)
        await store.start()
        service = SigninService(settings, idp, store, KeyFile(key_dir / SIGNING_KEY, load_signing_key),
                                KeyFile(key_dir / PUBLIC_KEYS, load_public_keys), sealer, public_url)
        app = service.app()
        if config.telemetry.metrics:
            app.middlewares.append(metrics.http_middleware("signin"))
        ssl_context = None
        svids = None
        if runtime.spiffe_socket:  # SPIFFE mTLS: only Envoy may call (docs/spiffe.md)
            from ccr.svid import SvidSource

            svids = SvidSource(runtime.spiffe_socket)
            ssl_context = svids.ssl_server_context()
            own = svids.material().spiffe_id
            app.middlewares.insert(0, only_peers({own.rsplit("/", 1)[0] + "/" + ID_ENVOY}))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host = args.host or config.services.bind_host
        await web.TCPSite(runner, host, args.port, ssl_context=ssl_context).start()
        address = f"{host}:{runner.addresses[0][1]}"
        ready = {}
        if config.telemetry.metrics:
            ready[READY_METRICS] = metrics.serve(*metrics_address(config, args))
        write_ready(args.ready_file, address, **ready)
        log.info("serving on %s (IdP %s, client %s)", address, settings.issuer, settings.client_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await store.close()
        if svids is not None:
            svids.close()


def only_peers(allowed: set[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuses (403) a TLS peer whose certificate's single URI SAN is not in `allowed`."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        from ccr.svid import peer_uri_sans

        transport = request.transport
        uris = peer_uri_sans(transport.get_extra_info("peercert") if transport is not None else None)
        peer = uris[0] if len(uris) == 1 else None
        if peer not in allowed:
            log.warning("refused a call from %s (peer identity %s; allowed: %s)", request.remote, peer,
                        sorted(allowed))
            MTLS_PEER_REFUSALS.labels(peer or "none").inc()
            MTLS_REFUSALS.labels("signin", "wrong_spiffe_id").inc()
            raise web.HTTPForbidden(text=f"peer identity {peer} may not call this service")
        return await handler(request)

    return check


if __name__ == "__main__":
    asyncio.run(serve())
