"""`python -m router`: the ADS server Envoy gets its listener, routes, clusters and endpoints from,
and (with a GPU pool configured) the workers' registration API (router/pools.py).

The config file is re-read when it changes and distributed as one version to Envoy and every
service (router/config_push.py); an edit that fails validation is logged and the last good
version stays in place everywhere. A worker joining or leaving changes only the pool clusters'
endpoints, pushed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc

from audit.admin_changes import AdminRecorder
from ccr.config import GatewayConfig
from ccr.config_sync import load_version, publish_initial
from ccr.contract import ID_ENVOY
from ccr.runtime import Runtime
from ccr.service import run
from router import resources
from router.config_push import Distributor, current_version, watch_file
from router.pools import Registry, api, expire_loop
from router.xds import AdsServer, Snapshot

log = logging.getLogger("ccr.router")
# Where the registration API's address is written (in the run directory), for `ccr up` and tests.
POOLS_ADDRESS_FILE = "router-pools.json"


def snapshot_for(config: GatewayConfig, runtime: Runtime) -> Snapshot:
    if runtime.listen_port is None:
        raise ValueError("runtime.listen_port is not set")
    return Snapshot.of(resources.build(config, runtime, runtime.listen_port))


class Publisher:
    """The config's snapshot plus the registered workers, published to the ADS server on every change."""

    def __init__(self, ads: AdsServer, base: Snapshot, registry: Registry) -> None:
        self.ads, self.base, self.registry = ads, base, registry
        self._pending: asyncio.Task[None] | None = None

    def current(self) -> Snapshot:
        return self.base.with_endpoints(self.registry.assignments(resources.provider_cluster_names))

    async def publish(self) -> None:
        await self.ads.update(self.current())

    def changed(self) -> None:
        """Called by the registry (synchronously, from a request or the expiry loop): push at once."""
        self._pending = asyncio.get_running_loop().create_task(self.publish())


async def _serve_registration(registry: Registry, config: GatewayConfig, runtime: Runtime) -> web.AppRunner | None:
    """The registration API, only when a pool is configured and its token is set (never open)."""
    if not config.pool_providers:
        return None
    token = os.environ.get(config.pools.token_env, "")
    if not token:
        log.error("GPU pools are configured but %s is empty: the worker registration API stays closed",
                  config.pools.token_env)
        return None
    runner = web.AppRunner(api(registry, token), access_log=None, handle_signals=False)
    await runner.setup()
    listen = config.pools.listen
    await web.TCPSite(runner, listen.host, listen.port).start()
    host, port = runner.addresses[0][:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    tmp = Path(runtime.run_dir) / f"{POOLS_ADDRESS_FILE}.tmp"
    tmp.write_text(json.dumps({"address": address}))
    tmp.replace(Path(runtime.run_dir) / POOLS_ADDRESS_FILE)
    log.info("worker registration API on http://%s", address)
    return runner


async def setup(
    server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime
) -> Callable[[], Awaitable[None]]:
    # The version the run serves: a restarted router continues from it (the file may have moved on:
    # the watcher then distributes that edit as usual); a run without one starts at version 1.
    got = current_version(runtime)
    if got is None:
        version = publish_initial(runtime.run_dir, runtime.config_path, runtime.config_followers)
        config = load_version(runtime.run_dir, version)
    else:
        version, config = got
    base = snapshot_for(config, runtime)
    ads = AdsServer(base)
    registry = Registry(config)
    pub = Publisher(ads, base, registry)
    registry.on_change = pub.changed
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    dist = Distributor(pub, runtime, config, version, lambda c: snapshot_for(c, runtime),
                       AdminRecorder(runtime.postgres_dsn))
    await dist.record_start()
    tasks = [asyncio.create_task(watch_file(dist, Path(runtime.config_path))),
             asyncio.create_task(expire_loop(registry))]
    runner = await _serve_registration(registry, config, runtime)

    async def cleanup() -> None:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if runner is not None:
            await runner.cleanup()

    return cleanup


if __name__ == "__main__":
    run("router", setup, mtls_peers=(ID_ENVOY,))
