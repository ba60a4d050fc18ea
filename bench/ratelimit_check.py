"""Time ShouldRateLimit over loopback gRPC: p50/p99 latency and throughput.

    .venv/bin/python bench/ratelimit_check.py --address 127.0.0.1:PORT
    .venv/bin/python bench/ratelimit_check.py --redis-url redis://127.0.0.1:6379/0

Without --address it starts `python -m ratelimit` against the given Redis and
stops it afterwards. By default every request counts against a limit large enough
never to trip, so the numbers are those of the allow path (one Redis EVALSHA per
call); `--limit 1` times clients hammering past their limit instead (answered from
the service's over-limit cache without Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.procs import Child, spawn, wait_ready_file  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402


def _request(key: str, limit: int) -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": key}])
    d.limit.requests_per_unit = limit
    d.limit.unit = rls_pb2.RateLimitResponse.RateLimit.HOUR
    return rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d])


async def _run(address: str, total: int, concurrency: int, keys: int, limit: int) -> None:
    reqs = [_request(f"bench_{uuid.uuid4().hex[:8]}", limit) for _ in range(keys)]
    expect_ok = limit >= total + keys
    lat: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        for r in reqs:  # connect before timing; with a small --limit, take every key over it
            for _ in range(1 if expect_ok else limit + 1):
                await stub.ShouldRateLimit(r, timeout=5)
        want = rls_pb2.RateLimitResponse.OK if expect_ok else rls_pb2.RateLimitResponse.OVER_LIMIT
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                r = await stub.ShouldRateLimit(reqs[i % keys], timeout=5)
                lat.append(time.perf_counter() - t)
                if r.overall_code != want:
                    raise SystemExit(f"unexpected {r}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100)
    print(f"requests={total} concurrency={concurrency} keys={keys} limit={limit}")
    print(f"p50={q[49] * 1e3:.3f} ms  p99={q[98] * 1e3:.3f} ms  throughput={total / wall:.0f} req/s")


def _start(redis_url: str, tmp: Path) -> Child:
    (tmp / "gateway.yaml").write_text(
        "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: '*', provider: anthropic}]\n"
    )
    Runtime(config_path=str(tmp / "gateway.yaml"), run_dir=str(tmp),
            postgres_dsn="postgresql://unused@127.0.0.1:1/unused", redis_url=redis_url).save(tmp / "rt.json")
    child = spawn("ratelimit", [sys.executable, "-m", "ratelimit", "--runtime", str(tmp / "rt.json"),
                                "--ready-file", str(tmp / "ready")], tmp, cwd=REPO,
                  env={"CCR_LOG_LEVEL": "WARNING"})
    wait_ready_file(child, tmp / "ready")
    return child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--address", help="host:port of a running ratelimit service")
    src.add_argument("--redis-url", help="start the service against this Redis")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--keys", type=int, default=100, help="distinct principal values to spread over")
    ap.add_argument("--limit", type=int, default=1_000_000_000,
                    help="requests per hour per principal; below --requests, time the over-limit path")
    args = ap.parse_args()
    if args.address:
        asyncio.run(_run(args.address, args.requests, args.concurrency, args.keys, args.limit))
        return
    with tempfile.TemporaryDirectory() as d:
        child = _start(args.redis_url, Path(d))
        try:
            asyncio.run(_run(str(child.info["address"]), args.requests, args.concurrency, args.keys, args.limit))
        finally:
            child.stop()


if __name__ == "__main__":
    main()
