"""Shared start-up for the gRPC services: flags, port binding, readiness, shutdown.

Each service binds port 0 on the configured host (no assumed free port), then
writes its real address to `--ready-file`, which is how the supervisor learns
that it is serving and where.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from ccr.config import GatewayConfig
from ccr.runtime import Runtime

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
    ap.add_argument("--port", type=int, default=0)
    return ap.parse_args()


def write_ready(path: str | None, address: str, **extra: object) -> None:
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **extra}))
    tmp.replace(path)


Setup = Callable[[grpc.aio.Server, GatewayConfig, Runtime], Awaitable[Callable[[], Awaitable[None]] | None]]


async def serve_grpc(name: str, setup: Setup) -> None:
    """Run one gRPC service until SIGTERM/SIGINT.

    `setup` registers servicers on the server and may return an async cleanup.
    """
    args = parse_args(name)
    logging.basicConfig(level=os.environ.get("CCR_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    runtime = Runtime.load(args.runtime)
    config = runtime.config()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    cleanup = await setup(server, config, runtime)
    host = config.services.bind_host
    port = server.add_insecure_port(f"{host}:{args.port}")
    if port == 0:
        raise SystemExit(f"{name}: cannot bind {host}:{args.port}")
    await server.start()
    address = f"{host}:{port}"
    write_ready(args.ready_file, address)
    logging.info("serving on %s", address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)
    if cleanup is not None:
        await cleanup()


def run(name: str, setup: Setup) -> None:
    asyncio.run(serve_grpc(name, setup))
