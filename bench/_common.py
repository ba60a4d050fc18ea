"""What the ext_authz benchmarks share: latency lines, Check requests, a closed-loop gRPC run, a database.

Imported by the scripts in bench/ (run as `python bench/<script>.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ccr import db
from ccr.service import GRPC_OPTIONS


def summary(label: str, lat_s: list[float], wall_s: float, width: int = 34) -> str:
    """One line: count, p50 and p99 in microseconds, and throughput."""
    lat = sorted(x * 1e6 for x in lat_s)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return (f"{label:<{width}} n={len(lat):>6}  p50={statistics.median(lat):8.1f} us  "
            f"p99={p99:8.1f} us  {len(lat) / wall_s:8.0f} req/s")


def check_request(body: bytes, headers: dict[str, str], spiffe: str | None = None) -> pb.CheckRequest:
    """A Check for POST /v1/messages with `body`; `spiffe` as Envoy sets it for a verified client certificate."""
    http = ac.AttributeContext.HttpRequest(
        method="POST", path="/v1/messages?beta=true", host="gw",
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01", **headers},
        raw_body=body)
    attrs = ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    if spiffe:
        attrs.source.principal = spiffe
    return pb.CheckRequest(attributes=attrs)


async def closed_loop(address: str, req: pb.CheckRequest, n: int, conc: int,
                      warmup: int = 0) -> tuple[list[float], float]:
    """`conc` callers each sending Check back to back, n in all; (latencies, wall seconds)."""
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as ch:
        stub = pb_grpc.AuthorizationStub(ch)
        for _ in range(warmup):
            assert (await stub.Check(req)).status.code == 0
        lat: list[float] = []
        per_worker = max(1, n // conc)

        async def worker() -> None:
            for _ in range(per_worker):
                s = time.perf_counter()
                await stub.Check(req)
                lat.append(time.perf_counter() - s)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat, time.perf_counter() - t0


@contextmanager
def database(run: Path, dsn: str | None) -> Iterator[str]:
    """`dsn`, or an embedded PostgreSQL under `run` (stopped afterwards); migrated either way."""
    pg = None
    if dsn is None:
        from ccr.localservers import start_postgres

        pg = start_postgres(run / "pg", run / "logs")
        dsn = str(pg.info["dsn"])
    try:
        db.migrate(dsn)
        yield dsn
    finally:
        if pg is not None:
            pg.stop()
