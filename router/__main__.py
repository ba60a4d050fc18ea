"""`python -m router`: the ADS server Envoy gets its listener, routes and clusters from.

The config file is re-read when it changes; a version that fails validation is
logged and the last good one stays in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from ccr.config import ConfigError, GatewayConfig, load_config
from ccr.contract import ID_ENVOY
from ccr.runtime import Runtime
from ccr.service import run
from router import resources
from router.xds import AdsServer, Snapshot

log = logging.getLogger("ccr.router")


def snapshot_for(config: GatewayConfig, runtime: Runtime) -> Snapshot:
    if runtime.listen_port is None:
        raise ValueError("runtime.listen_port is not set")
    return Snapshot.of(resources.build(config, runtime, runtime.listen_port))


async def _watch_config(ads: AdsServer, runtime: Runtime, interval: float = 1.0) -> None:
    path = Path(runtime.config_path)
    seen = path.stat().st_mtime_ns
    while True:
        await asyncio.sleep(interval)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        if mtime == seen:
            continue
        seen = mtime
        try:
            await ads.update(snapshot_for(load_config(path), runtime))
        except (ConfigError, ValueError) as e:
            log.error("config change not applied, keeping the last good version: %s", e)


async def setup(
    server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime
) -> Callable[[], Awaitable[None]]:
    ads = AdsServer(snapshot_for(config, runtime))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    watcher = asyncio.create_task(_watch_config(ads, runtime))

    async def cleanup() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    return cleanup


if __name__ == "__main__":
    run("router", setup, mtls_peers=(ID_ENVOY,))
