"""Server CPU per call of the hot-path gRPC services, as `ccr up` starts them (one or more workers).

    .venv/bin/python bench/grpc_services.py extauth   [--duration 2] [-c 32] [--workers 1] [--channels 4]
    .venv/bin/python bench/grpc_services.py ratelimit  ...
    .venv/bin/python bench/grpc_services.py accesslog  ... [--per-msg 1]
    .venv/bin/python bench/grpc_services.py extauth --profile /tmp/extauth.raw   # py-spy on worker 0
    .venv/bin/python bench/grpc_services.py extauth --trace [--sampled 0.05]   # tracing on, as Envoy calls

Starts embedded PostgreSQL/Redis and the service (ccr.supervisor.start_service, the same flags and
options as `ccr up`), drives it closed loop from this process over `--channels` connections (Envoy
opens one per worker thread), and prints req/s, p50/p99 and the service's CPU (user+sys of every
worker, from /proc) per call. The client shares the machine: compare runs with each other.

extauth: Check with the 84 KB agent request and an API key (the cached allow path).
ratelimit: ShouldRateLimit on the allow path (one Redis EVALSHA per call), 100 principals.
accesslog: StreamAccessLogs, `--per-msg` entries per message on long-lived streams (one per channel);
the figure is per entry, including the PostgreSQL insert.

--trace: the service runs with telemetry.otlp_endpoint (a local span sink, bench/_otlp_sink.py) and every
call carries a W3C traceparent as Envoy's tracer sends it (a fresh trace and span id, an empty
tracestate) in its metadata (accesslog: in the entry's logged request headers); `--sampled` of them
say sampled. Compare with and without it to see what tracing costs a service per call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import check_request, database  # noqa: E402

from ccr.procs import Child  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402
from ccr.service import GRPC_OPTIONS  # noqa: E402
from ccr.supervisor import start_service  # noqa: E402

CONFIG = "version: 1\nproviders: [{name: anthropic}]\nmodels: [{match: 'claude-*', provider: anthropic}]\n"
MODULES = {"extauth": "extauth", "ratelimit": "ratelimit", "accesslog": "audit"}
_TICK = os.sysconf("SC_CLK_TCK")
# Channels in one process share connections unless told not to; Envoy opens one per worker thread.
OWN_CONNECTION = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def cpu_seconds(pid: int) -> float:
    """user + system CPU of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


Call = Callable[[grpc.aio.Channel, int], "asyncio.Future[object]"]
Metadata = Callable[[int], tuple[tuple[str, str], ...] | None]


def trace_metadata(sampled: float | None) -> Metadata:
    """Per call: no metadata (tracing off), else a fresh traceparent as Envoy's OTel tracer injects it
    (with an empty tracestate), sampled for that share of the calls (spread evenly)."""
    if sampled is None:
        return lambda _i: None
    every = round(1 / sampled) if sampled > 0 else 0
    n = itertools.count()  # not the call's i: paced calls all pass 0

    def md(_i: int) -> tuple[tuple[str, str], ...]:
        flags = "01" if every and next(n) % every == 0 else "00"
        return (("traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-{flags}"), ("tracestate", ""))
    return md


def _extauth_call(key: str, md: Metadata) -> Callable[[grpc.aio.Channel], Callable[[int], object]]:
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    from ccr.fixtures import AGENT_REQUEST, fixture_path

    req = check_request(fixture_path(AGENT_REQUEST).read_bytes(), {"authorization": f"Bearer {key}"})

    def bind(ch: grpc.aio.Channel) -> Callable[[int], object]:
        check = pb_grpc.AuthorizationStub(ch).Check

        async def call(i: int) -> None:
            r = await check(req, metadata=md(i))
            if r.status.code != 0:
                raise SystemExit(f"extauth denied: {r}")
        return call
    return bind


def _ratelimit_call(md: Metadata) -> Callable[[grpc.aio.Channel], Callable[[int], object]]:
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    reqs = []
    for _ in range(100):
        d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": f"b_{uuid.uuid4().hex[:8]}"}])
        d.limit.requests_per_unit = 1_000_000_000
        d.limit.unit = rls_pb2.RateLimitResponse.RateLimit.HOUR
        reqs.append(rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d]))

    def bind(ch: grpc.aio.Channel) -> Callable[[int], object]:
        should = rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit

        async def call(i: int) -> None:
            r = await should(reqs[i % len(reqs)], metadata=md(i))
            if r.overall_code != rls_pb2.RateLimitResponse.OK:
                raise SystemExit(f"ratelimit said {r}")
        return call
    return bind


async def paced(calls: list[Callable[[], Awaitable[object]]], rate: float, duration: float) -> int:
    """Open loop: one call every 1/rate s (round robin over `calls`) for `duration`; the number sent.

    CPU per call depends on load (a busy server handles several calls per wake-up), so setups are
    compared at the same rate, one like the gateway's.
    """
    tasks: set[asyncio.Task[object]] = set()
    t0 = time.perf_counter()
    total = int(rate * duration)
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.ensure_future(calls[i % len(calls)]())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return total


async def _load(address: str, bind: Callable[[grpc.aio.Channel], Callable[[int], object]], conc: int,
                channels: int, duration: float, pids: list[int], rate: float = 0) -> tuple[list[float], float, float]:
    chans = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(channels)]
    calls = [bind(ch) for ch in chans]
    try:
        for c in calls:  # connect and warm up
            for i in range(20):
                await c(i)
        lat: list[float] = []
        stop_at = 0.0

        async def worker(w: int) -> None:
            call = calls[w % len(calls)]
            i = w
            while time.perf_counter() < stop_at:
                s = time.perf_counter()
                await call(i)
                lat.append(time.perf_counter() - s)
                i += conc

        async def timed(call: Callable[[int], Awaitable[object]]) -> None:
            s = time.perf_counter()
            await call(0)
            lat.append(time.perf_counter() - s)

        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        stop_at = t0 + duration
        if rate:
            await paced([lambda c=c: timed(c) for c in calls], rate, duration)
        else:
            await asyncio.gather(*(worker(w) for w in range(conc)))
        wall = time.perf_counter() - t0
        return lat, wall, sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        for ch in chans:
            await ch.close()


async def _load_als(address: str, conc: int, channels: int, duration: float, per_msg: int,
                    pids: list[int], md: Metadata, rate: float = 0) -> tuple[int, float, float]:
    """Entries written per second over `channels` streams; CPU per entry. `rate`: about this many
    entries/s in all (a pause after each message; 0: as fast as the service takes them)."""
    pause = channels * per_msg / rate if rate else 0
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    from tests.test_audit import entry

    template = entry("x")
    sent = 0
    stop_at = 0.0

    async def stream(ch: grpc.aio.Channel, first: bool) -> None:
        nonlocal sent

        async def msgs() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
            nonlocal sent
            m = als_pb2.StreamAccessLogsMessage()
            m.identifier.node.id = "bench"
            m.identifier.log_name = "ccr"
            while time.perf_counter() < stop_at:
                for j in range(per_msg):
                    e = m.http_logs.log_entry.add()
                    e.CopyFrom(template)
                    e.request.request_id = uuid.uuid4().hex
                    for k, v in md(sent + j) or ():
                        e.request.request_headers[k] = v
                yield m
                sent += per_msg
                m = als_pb2.StreamAccessLogsMessage()
                await asyncio.sleep(pause)
        await als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(msgs(), timeout=60)

    chans = [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(channels)]
    try:
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        stop_at = t0 + duration
        await asyncio.gather(*(stream(ch, True) for ch in chans))  # each answers once its rows are committed
        wall = time.perf_counter() - t0
        return sent, wall, sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        for ch in chans:
            await ch.close()


@contextmanager
def _profiler(pid: int, out: str | None, duration: float) -> Iterator[None]:
    """py-spy record of `pid` while the load runs (raw collapsed stacks with --idle off)."""
    if not out:
        yield
        return
    spy = REPO / ".venv" / "bin" / "py-spy"
    exe = str(spy) if spy.exists() else str(Path(sys.executable).with_name("py-spy"))
    p = subprocess.Popen([exe, "record", "--pid", str(pid), "-r", "250", "-d", str(int(duration) + 1),
                          "-f", "raw", "--threads", "-o", out], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the timed load starts
    try:
        yield
    finally:
        p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("service", choices=sorted(MODULES))
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("-c", type=int, default=32, help="concurrent calls (accesslog: ignored)")
    ap.add_argument("--channels", type=int, default=4, help="client connections")
    ap.add_argument("--rate", type=float, default=0, help="open loop at this many calls/s (0: closed loop, -c)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--per-msg", type=int, default=1, help="accesslog entries per message")
    ap.add_argument("--profile", help="write py-spy raw stacks of worker 0 here")
    ap.add_argument("--trace", action="store_true",
                    help="tracing on (a local OTLP sink) and a traceparent on every call, as Envoy sends")
    ap.add_argument("--no-metrics", action="store_true", help="telemetry.metrics: false (no /metrics, no interceptor)")
    ap.add_argument("--sampled", type=float, default=0.05, help="with --trace: share of calls that say sampled")
    args = ap.parse_args()
    env = {"CCR_LOG_LEVEL": "WARNING"}

    md = trace_metadata(args.sampled if args.trace else None)
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as tmp, ExitStack() as stack:
        run = Path(tmp)
        telemetry = {"metrics": not args.no_metrics}
        if args.trace:
            from gateway import otlp_sink

            telemetry["otlp_endpoint"] = stack.enter_context(otlp_sink(run))
        config = CONFIG + f"telemetry: {json.dumps(telemetry)}\n"
        (run / "gateway.yaml").write_text(config)
        rt = Runtime(config_path=str(run / "gateway.yaml"), run_dir=str(run),
                     postgres_dsn="postgresql://unused@127.0.0.1:1/unused", redis_url="redis://127.0.0.1:1/0")
        key = ""
        if args.service in ("extauth", "accesslog"):
            rt.postgres_dsn = stack.enter_context(database(run, None))
        if args.service == "extauth":
            from extauth.bundle import build_bundle
            from extauth.keys import create_key

            _, key = create_key(rt.postgres_dsn, "bench", rpm=10_000_000)
            rt.policy_bundle = str(build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision"))
        if args.service == "ratelimit":
            from ccr.localservers import start_redis

            rd = start_redis(run / "redis", run / "logs")
            stack.callback(rd.stop)
            rt.redis_url = str(rd.info["url"])
        rt.save(run / "runtime.json")
        children: list[Child] = start_service(args.service, MODULES[args.service], args.workers,
                                              run / "runtime.json", run, run / "logs", env=env)
        for c in reversed(children):
            stack.callback(c.stop)
        address = str(children[0].info["address"])
        pids = [c.pid for c in children]
        with _profiler(pids[0], args.profile, args.duration):
            if args.service == "accesslog":
                n, wall, cpu = asyncio.run(_load_als(address, args.c, args.channels, args.duration, args.per_msg,
                                                     pids, md, args.rate))
                tr = " trace" if args.trace else ""
                print(f"accesslog workers={args.workers}{tr} channels={args.channels} per_msg={args.per_msg}: "
                      f"{n} entries  {n / wall:8.0f} entries/s  server CPU {cpu * 1e3 / max(n, 1):.3f} ms/entry")
                return
            bind = _extauth_call(key, md) if args.service == "extauth" else _ratelimit_call(md)
            lat, wall, cpu = asyncio.run(_load(address, bind, args.c, args.channels, args.duration, pids, args.rate))
        us = sorted(x * 1e6 for x in lat)
        p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
        load = f"rate={args.rate:.0f}/s" if args.rate else f"c={args.c}"
        if args.trace:
            load += f" trace(sampled {args.sampled:g})"
        if args.no_metrics:
            load += " no-metrics"
        print(f"{args.service} workers={args.workers} {load} channels={args.channels}: n={len(us)}  "
              f"p50={statistics.median(us):8.1f} us  p99={p99:8.1f} us  {len(us) / wall:6.0f} req/s  "
              f"server CPU {cpu * 1e3 / len(us):.3f} ms/call")


if __name__ == "__main__":
    main()
