"""ShouldRateLimit over loopback gRPC with five descriptors per request: p50/p99, throughput, and
Redis round trips per decision; ours beside envoyproxy/ratelimit (Go) on the same config file.

    .venv/bin/python bench/ratelimit_check.py --redis-url redis://:PW@127.0.0.1:6379/0 [--peer]
    .venv/bin/python bench/ratelimit_check.py --start-redis --peer --duration 2

It starts `python -m ratelimit` (and with --peer the Go service, ~/.cache/ccr-peers/bin/service_cmd,
built by /work/shared/peers/envoyproxy-ratelimit.sh) against the same Redis and the same
envoyproxy-style YAML file, then for each: closed loop at c=1 and c=16, and open loop paced at
--rate req/s (default 500). Workloads:

- yaml: domain `bench`, five one-entry descriptors (principal, key_id, tenant, groups, model), each
  under a fixed-window YAML limit never reached (the allow path).
- ccr:  domain `ccr` (ours only), the same five descriptors under ccr's own rules: sliding windows
  (principal, key_id, tenant, model) and a token bucket (groups).

Redis round trips are counted from INFO commandstats before and after each run: ours makes one
EVALSHA per decision (the commands inside it are listed apart); the Go service pipelines one
INCRBY (+ EXPIRE) per descriptor, so its figure is commands per decision.

Load generators: c1, c16 and paced are this Python process (grpc.aio); its own scheduling is part of
their latency. Mode `ghz` drives the same 1000 requests, paced at --rate, with ghz (a Go load
generator: `go install github.com/bojand/ghz/cmd/ghz@v0.120.0`, found on PATH, in ~/go/bin or by
--ghz), so the p99 is less the client's. Without ghz that mode prints that it was skipped.

`--pin` keeps the load generators and the servers on different cores: the service under test and
Redis (every thread) on the last CPU, this process and ghz on the others, as when the gateway calls
the service from another host. Unpinned, on 2 cores, a call's tail is mostly the scheduler
interleaving client, service and Redis threads (docs/ratelimit.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import descriptor_pb2, json_format

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccr.localservers import start_redis  # noqa: E402
from ccr.procs import Child, free_port, spawn, wait_ready_file, wait_until  # noqa: E402
from ccr.runtime import Runtime  # noqa: E402

PEER_BIN = Path.home() / ".cache/ccr-peers/bin/service_cmd"
GHZ_INSTALL = "go install github.com/bojand/ghz/cmd/ghz@v0.120.0"
GHZ_METHOD = "envoy.service.ratelimit.v3.RateLimitService.ShouldRateLimit"
KEYS = ("principal", "key_id", "tenant", "groups", "model")
YAML = "domain: bench\ndescriptors:\n" + "".join(
    f"  - key: {k}\n    rate_limit: {{unit: hour, requests_per_unit: 1000000000}}\n" for k in KEYS)
GATEWAY_YAML = """version: 1
providers: [{name: anthropic}]
models: [{match: '*', provider: anthropic}]
limits:
  envoy_config_dir: rls
  rules:
    - {name: p, per: principal, amount: 1000000000, unit: hour}
    - {name: k, per: key, amount: 1000000000, unit: minute}
    - {name: t, per: tenant, amount: 1000000000, unit: day}
    - {name: g, per: group, amount: 1000000000, unit: hour, algorithm: token_bucket}
    - {name: m, per: model, amount: 1000000000, unit: minute}
"""


def requests(domain: str, n: int) -> list[rls_pb2.RateLimitRequest]:
    """n distinct callers (principal and key), 10 tenants, 5 groups, 3 models."""
    run = uuid.uuid4().hex[:6]
    out = []
    for i in range(n):
        vals = (f"p{run}{i}", f"k{run}{i}", f"t{i % 10}", f"g{i % 5}", f"m{i % 3}")
        if domain == "ccr":
            vals = (vals[0], vals[1], vals[2], f"{run}{i % 5}", vals[4])
        descriptors = [ratelimit_pb2.RateLimitDescriptor(entries=[{"key": k, "value": v}])
                       for k, v in zip(KEYS, vals, strict=True)]
        out.append(rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors))
    return out


def _calls(rc: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in rc.info("commandstats").items()
            if k not in ("cmdstat_info", "cmdstat_config")}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _switches(pid: int) -> int:
    """Context switches of all a process's threads so far (each a thread woken or preempted)."""
    n = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                    n += int(line.split()[1])
        except OSError:  # a thread that ended meanwhile
            continue
    return n


def _redis_cpu_s(rc: redis.Redis) -> float:
    info = rc.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _line(label: str, lat: list[float], wall: float, decisions: int, before: dict[str, int],
          after: dict[str, int], cpu_s: float, redis_cpu_s: float, switches: int,
          n_calls: int | None = None) -> str:
    """`lat`: every call's latency, or with n_calls (ghz) [p50, p99] already computed."""
    if n_calls is None:
        lat = sorted(lat)
        p50 = statistics.median(lat) * 1e3
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
    else:
        p50, p99 = lat[0] * 1e3, lat[1] * 1e3
    n = len(lat) if n_calls is None else n_calls
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    diff = {k: v for k, v in diff.items() if v > 0}
    scripts = diff.get("evalsha", 0) + diff.get("eval", 0)
    inner = {k: v / decisions for k, v in sorted(diff.items()) if k not in ("evalsha", "eval", "script|load")}
    rt = (f"round trips/decision={scripts / decisions:.2f} (EVALSHA)" if scripts
          else f"commands/decision={sum(inner.values()):.2f} (pipelined)")
    cmds = " ".join(f"{k}={v:.2f}" for k, v in inner.items())
    return (f"{label:<22} n={n:>6} p50={p50:6.3f} ms p99={p99:6.3f} ms {n / wall:7.0f} req/s  "
            f"cpu/decision: service {cpu_s / decisions * 1e6:5.0f} us, redis {redis_cpu_s / decisions * 1e6:4.0f} us  "
            f"switches/decision {switches / decisions:4.1f}  "
            f"{rt}  [{cmds}]")


async def _closed(stub: rls_pb2_grpc.RateLimitServiceStub, reqs: list[rls_pb2.RateLimitRequest], conc: int,
                  duration: float) -> tuple[list[float], float]:
    lat: list[float] = []
    end = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < end:
            r = reqs[next(counter) % len(reqs)]
            t = time.perf_counter()
            resp = await stub.ShouldRateLimit(r, timeout=5)
            lat.append(time.perf_counter() - t)
            if resp.overall_code != rls_pb2.RateLimitResponse.OK:
                raise SystemExit(f"unexpected {resp}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat, time.perf_counter() - t0


async def _paced(stub: rls_pb2_grpc.RateLimitServiceStub, reqs: list[rls_pb2.RateLimitRequest], rate: float,
                 duration: float) -> tuple[list[float], float]:
    lat: list[float] = []
    n = int(rate * duration)
    tasks = []

    async def one(r: rls_pb2.RateLimitRequest) -> None:
        t = time.perf_counter()
        await stub.ShouldRateLimit(r, timeout=5)
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(reqs[i % len(reqs)])))
    await asyncio.gather(*tasks)
    return lat, time.perf_counter() - t0


def find_ghz(given: str | None) -> str | None:
    if given:
        if shutil.which(given) is None:
            raise SystemExit(f"--ghz {given}: not an executable")
        return given
    home = Path.home() / "go" / "bin" / "ghz"
    return shutil.which("ghz") or (str(home) if home.exists() else None)


def _protoset(path: Path) -> None:
    """rls.proto and everything it imports, as a FileDescriptorSet ghz reads (the servers have no reflection)."""
    fds = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: object) -> None:
        if fd.name in seen:  # type: ignore[attr-defined]
            return
        seen.add(fd.name)  # type: ignore[attr-defined]
        for dep in fd.dependencies:  # type: ignore[attr-defined]
            add(dep)
        fds.file.add().MergeFromString(fd.serialized_pb)  # type: ignore[attr-defined]

    add(rls_pb2.DESCRIPTOR)
    path.write_bytes(fds.SerializeToString())


# --pin: CPUs for the servers under test (and Redis) and for the load generators; None: unpinned.
PINNING: dict[str, set[int]] = {}


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity moves one thread; threads started later inherit)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def pin_server(pid: int) -> None:
    if PINNING:
        pin_process(pid, PINNING["servers"])


def _ghz(ghz: str, address: str, reqs: list[rls_pb2.RateLimitRequest], rate: float, duration: float,
         tmp: Path) -> tuple[list[float], float, int, int]:
    """ghz paced at `rate` for `duration` over one connection, cycling through `reqs` (as the Python client does).
    ([p50, p99] in s as ghz computes them, req/s, calls tallied, calls made); exits on any non-OK call."""
    _protoset(tmp / "rls.protoset")
    (tmp / "data.json").write_text(json.dumps([json_format.MessageToDict(r) for r in reqs]))
    skip = 50  # the new connection's first calls
    cmd = [ghz, "--insecure", "--protoset", str(tmp / "rls.protoset"), "--call", GHZ_METHOD,
           "-D", str(tmp / "data.json"), "--rps", f"{rate:.0f}", "-n", str(int(rate * duration) + skip),
           "--skipFirst", str(skip), "-c", "20", "--connections", "1", "-t", "5s", "--format", "json", address]
    if PINNING:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(PINNING["clients"]))), *cmd]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    codes = out.get("statusCodeDistribution") or {}
    if set(codes) != {"OK"}:
        raise SystemExit(f"ghz: calls failed: {codes} {out.get('errorDistribution')}")
    pct = {p["percentage"]: p["latency"] / 1e9 for p in out["latencyDistribution"]}
    return [pct[50], pct[99]], float(out["rps"]), int(out["count"]), int(rate * duration) + skip


async def measure(label: str, address: str, pid: int, domain: str, redis_url: str, duration: float,
                  rate: float, modes: tuple[str, ...] = ("c1", "c16", "paced"), ghz: str | None = None) -> None:
    reqs = requests(domain, 1000)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        for r in reqs[:50]:  # connect and warm up
            await stub.ShouldRateLimit(r, timeout=5)
        with redis.Redis.from_url(redis_url) as rc:
            runs = {"c1": ("c=1", lambda: _closed(stub, reqs, 1, duration)),
                    "c16": ("c=16", lambda: _closed(stub, reqs, 16, duration)),
                    "paced": (f"paced {rate:.0f}/s", lambda: _paced(stub, reqs, rate, duration))}
            for m in modes:
                if m == "ghz":
                    name = f"ghz {rate:.0f}/s"
                    if ghz is None:
                        print(f"{label} {name}: skipped, ghz not found (install: {GHZ_INSTALL}, or pass --ghz PATH)",
                              flush=True)
                        continue
                    before, cpu, rcpu, sw = _calls(rc), _cpu_s(pid), _redis_cpu_s(rc), _switches(pid)
                    with tempfile.TemporaryDirectory() as d:
                        pcts, rps, n, made = _ghz(ghz, address, reqs, rate, duration, Path(d))
                    cpu, rcpu, sw = _cpu_s(pid) - cpu, _redis_cpu_s(rc) - rcpu, _switches(pid) - sw
                    # Latency over the calls ghz tallied; CPU and Redis figures over every call made.
                    print(_line(f"{label} {name}", pcts, n / rps, made, before, _calls(rc), cpu, rcpu, sw, n_calls=n),
                          flush=True)
                    continue
                name, run = runs[m]
                before, cpu, rcpu, sw = _calls(rc), _cpu_s(pid), _redis_cpu_s(rc), _switches(pid)
                lat, wall = await run()
                cpu, rcpu, sw = _cpu_s(pid) - cpu, _redis_cpu_s(rc) - rcpu, _switches(pid) - sw
                print(_line(f"{label} {name}", lat, wall, len(lat), before, _calls(rc), cpu, rcpu, sw), flush=True)


def start_ours(redis_url: str, tmp: Path) -> Child:
    (tmp / "rls").mkdir(exist_ok=True)
    (tmp / "rls" / "bench.yaml").write_text(YAML)
    (tmp / "gateway.yaml").write_text(GATEWAY_YAML)
    Runtime(config_path=str(tmp / "gateway.yaml"), run_dir=str(tmp),
            postgres_dsn="postgresql://unused@127.0.0.1:1/unused", redis_url=redis_url).save(tmp / "rt.json")
    child = spawn("ratelimit", [sys.executable, "-m", "ratelimit", "--runtime", str(tmp / "rt.json"),
                                "--ready-file", str(tmp / "ready")], tmp, cwd=REPO,
                  # GRPC_* (e.g. GRPC_EXPERIMENTS) reach the service: grpc core's switches, A/B by hand.
                  env={"CCR_LOG_LEVEL": "WARNING", **{k: v for k, v in os.environ.items() if k.startswith("GRPC_")}})
    wait_ready_file(child, tmp / "ready")
    return child


def start_peer(redis_url: str, tmp: Path) -> tuple[Child, str]:
    """envoyproxy/ratelimit on the same Redis and the same YAML file (RUNTIME_ROOT/ratelimit/config)."""
    if not PEER_BIN.exists():
        raise SystemExit(f"{PEER_BIN} missing: build it with /work/shared/peers/envoyproxy-ratelimit.sh")
    cfg = tmp / "peer" / "ratelimit" / "config"
    cfg.mkdir(parents=True)
    (cfg / "bench.yaml").write_text(YAML)
    u = urlsplit(redis_url)
    port = free_port()
    env = {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": f"{u.hostname}:{u.port}", "REDIS_AUTH": u.password or "",
           "RUNTIME_ROOT": str(tmp / "peer"), "RUNTIME_SUBDIRECTORY": "ratelimit", "RUNTIME_WATCH_ROOT": "false",
           "USE_STATSD": "false", "GRPC_HOST": "127.0.0.1", "HOST": "127.0.0.1", "DEBUG_HOST": "127.0.0.1",
           "GRPC_PORT": str(port), "PORT": str(free_port()), "DEBUG_PORT": str(free_port()), "LOG_LEVEL": "warn"}
    child = spawn("envoyproxy-ratelimit", [str(PEER_BIN)], tmp, env=env)
    address = f"127.0.0.1:{port}"

    def serving() -> bool:
        try:
            with grpc.insecure_channel(address) as ch:
                grpc.channel_ready_future(ch).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False

    wait_until(child, serving, 30, "serving")
    return child, address


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--redis-url")
    src.add_argument("--start-redis", action="store_true", help="start a private Redis for the run")
    ap.add_argument("--peer", action="store_true", help="also the Go envoyproxy/ratelimit on the same config")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--modes", default="c1,c16,paced,ghz",
                    help="which runs, of c1, c16, paced, ghz (comma-separated; ghz is skipped when not installed)")
    ap.add_argument("--profile", help="py-spy raw stacks of ours (all its runs) to this file (bench/pyspy_top.py)")
    ap.add_argument("--ghz", help=f"the ghz binary (default: on PATH or ~/go/bin; {GHZ_INSTALL})")
    ap.add_argument("--workloads", default="yaml,ccr", help="ours: yaml, ccr (comma-separated)")
    ap.add_argument("--pin", action="store_true",
                    help="servers and Redis on the last CPU, this process and ghz on the others")
    args = ap.parse_args()
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        PINNING.update(servers={cpus[-1]}, clients=set(cpus[:-1]))
        os.sched_setaffinity(0, PINNING["clients"])  # before any thread starts: they inherit it
    modes = tuple(m for m in args.modes.split(",") if m)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    ghz = find_ghz(args.ghz) if "ghz" in modes else None
    children: list[Child] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        try:
            url = args.redis_url
            if args.start_redis:
                r = start_redis(tmp / "redis", tmp / "logs")
                children.append(r)
                pin_server(r.proc.pid)
                url = str(r.info["url"])
            ours = start_ours(url, tmp)
            children.append(ours)
            pin_server(ours.proc.pid)
            print(f"ShouldRateLimit, 5 descriptors per request, {args.duration:.0f} s per run, cpus={os.cpu_count()}"
                  + (f", servers pinned to {sorted(PINNING['servers'])}, clients to {sorted(PINNING['clients'])}"
                     if PINNING else ""))
            pid = ours.proc.pid
            spy = None
            if args.profile:
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                                        "-r", "250", "-f", "raw", "-o", args.profile], stdout=subprocess.DEVNULL)
                time.sleep(1)  # attached before the load starts
            for w in workloads:
                asyncio.run(measure(f"ours {w}", str(ours.info["address"]), pid, "bench" if w == "yaml" else "ccr",
                                    url, args.duration, args.rate, modes, ghz))
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(30)
            if args.peer:
                peer, address = start_peer(url, tmp)
                children.append(peer)
                pin_server(peer.proc.pid)
                asyncio.run(measure("go-peer yaml", address, peer.proc.pid, "bench", url, args.duration, args.rate,
                                    modes, ghz))
        finally:
            for c in reversed(children):
                c.stop()


if __name__ == "__main__":
    main()
