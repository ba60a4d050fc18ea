"""How extauth should run the in-Check rate limit decision (limits.admission: extauth): inline on the event
loop, or handed to a small thread pool. Real Redis, the real Decider (ratelimit/service.py decide_limits) on
the request-time RateLimitRequest of a principal with a key, a group and a model.

    .venv/bin/python bench/admission_inline.py [--n 4000] [--rounds 3]

Prints, per way and concurrency (asyncio tasks on one loop, as extauth's Checks are), the process CPU per
decision and the latency p50/p99. CPU per decision is the figure to read on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: E402
from envoy.service.ratelimit.v3 import rls_pb2  # noqa: E402

from ccr.config import Limits  # noqa: E402
from ccr.localservers import start_redis  # noqa: E402
from ratelimit.counters import Counters  # noqa: E402
from ratelimit.limits import LimitPlanner  # noqa: E402
from ratelimit.service import Decider, decide_limits, make_redis  # noqa: E402


def request(i: int) -> rls_pb2.RateLimitRequest:
    def d(k: str, v: str) -> ratelimit_pb2.RateLimitDescriptor:
        return ratelimit_pb2.RateLimitDescriptor(entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)])
    first = d("principal", f"key_{i % 50}")
    first.limit.requests_per_unit = 10**9
    first.limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    return rls_pb2.RateLimitRequest(domain="ccr", descriptors=[first, d("key_id", f"key_{i % 50}"),
                                                                d("groups", "eng"), d("model", "claude-x")])


async def run(decider: Decider, pool: ThreadPoolExecutor | None, n: int, conc: int) -> tuple[float, list[float]]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []

    async def one(i: int) -> None:
        s = time.perf_counter()
        if pool is None:
            decide_limits(decider, [], request(i))
        else:
            await loop.run_in_executor(pool, decide_limits, decider, [], request(i))
        lat.append(time.perf_counter() - s)

    async def worker(w: int) -> None:
        for j in range(n // conc):
            await one(w * n + j)
            if pool is None:
                await asyncio.sleep(0)  # a Check yields to the loop between steps

    c0 = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(conc)))
    return (time.process_time() - c0) / len(lat), lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        child = start_redis(Path(tmp) / "redis", Path(tmp) / "logs")
        try:
            client = make_redis(str(child.info["url"]), 4)
            limits = Limits.model_validate({"rules": [
                {"name": "k", "per": "key", "amount": 10**9}, {"name": "g", "per": "group", "amount": 10**9}]})
            decider = Decider(Counters(client), LimitPlanner(limits))
            pool = ThreadPoolExecutor(2)
            results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for _ in range(args.rounds):  # interleaved: inline, pool, inline, pool ...
                for conc in (1, 16):
                    for way, p in (("inline", None), ("pool(2)", pool)):
                        cpu, lat = asyncio.run(run(decider, p, args.n, conc))
                        lat.sort()
                        results.setdefault((way, conc), []).append(
                            (cpu * 1e6, statistics.median(lat) * 1e6, lat[int(len(lat) * 0.99)] * 1e6))
            for (way, conc), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                med = [statistics.median(x[k] for x in rs) for k in range(3)]
                print(f"{way:<8} c={conc:<3} CPU/decision {med[0]:6.1f} us   p50 {med[1]:7.1f} us   "
                      f"p99 {med[2]:7.1f} us   (medians of {len(rs)} rounds)")
            pool.shutdown()
        finally:
            child.stop()


if __name__ == "__main__":
    main()
