"""What the gateway adds: the 84 KB agent request straight to the emulator, through bare Envoy, and
through the full gateway, closed loop at a few concurrency levels, streamed and with "stream": false.

    .venv/bin/python bench/gateway.py [--concurrency 1,8,32] [--duration 4] [--requests 20000]
                                      [--no-stream | --stream-only]
    .venv/bin/python bench/gateway.py --url http://127.0.0.1:PORT --key ccr_...   # a running gateway only
    .venv/bin/python bench/gateway.py --spiffe-compare   # the gateway with SPIFFE mTLS on every hop vs without
    .venv/bin/python bench/gateway.py --bodies-compare   # audit.bodies: no rule, another tenant's, captured
    .venv/bin/python bench/gateway.py --telemetry compare --concurrency 8 --rounds 5 --duration 4
        # issue 11: telemetry off / metrics / metrics+traces, interleaved rounds, medians and spread
    .venv/bin/python bench/gateway.py --telemetry compare --paced 100 --rounds 7 --duration 5
        # the same three loaded at once at a fixed rate: CPU per request, robust on a busy machine

By default it starts its own gateway (embedded PostgreSQL/Redis, the emulator as the upstream) in a
temp dir, plus a bare Envoy (router filter only) in front of the same emulator, and stops both at the
end. Every request is the same bytes; streamed replies are read to the end. The load generator is
this process (aiohttp, one keep-alive connection per worker); the servers are separate processes.
Both modes by default: for each it prints the layers' table, the CPU per process and issue 6's ratios
of the gateway to bare Envoy (bench/ratios.py); bench/check_targets.py exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ratios import Check, LayerFigures, compare, format_checks  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.procs import Child, spawn, wait_until  # noqa: E402
from ccr.supervisor import Gateway, envoy_binary  # noqa: E402

API_VERSION = "2023-06-01"
MAX_BODY = 64 * 1024 * 1024  # as the gateway's default max_request_bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")
T = "type.googleapis.com/"
BUSY = 0.8  # share of all cores above which a level is flagged as CPU-bound machine-wide
UPSTREAM = "emulator"  # the process whose CPU the ratios leave out: the provider, not the gateway's cost
COLLECTOR = "otlp-sink"  # --telemetry compare's span sink: shown by process, left out of the gateway's CPU
MODES = ("stream", "no-stream")


@dataclass
class Target:
    layer: str
    url: str
    key: str
    pids: dict[str, int] = field(default_factory=dict)  # servers on the path, for CPU accounting


@dataclass
class Result:
    layer: str
    concurrency: int
    ok: list[float]
    ttfb: list[float]  # per successful request: seconds from sending to the first body byte
    errors: int
    wall: float
    client_cpu: float  # fraction of one core
    server_cpu: dict[str, float]  # process name -> CPU seconds during the level
    first_error: str | None

    @property
    def requests(self) -> int:
        return len(self.ok) + self.errors

    @property
    def p50(self) -> float:
        return statistics.median(self.ok) * 1000 if self.ok else float("nan")

    @property
    def p99(self) -> float:
        if not self.ok:
            return float("nan")
        s = sorted(self.ok)
        return s[min(len(s) - 1, int(len(s) * 0.99))] * 1000  # nearest rank

    @property
    def ttfb_p50(self) -> float:
        return statistics.median(self.ttfb) * 1000 if self.ttfb else float("nan")

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall if self.wall > 0 else 0.0


# -- CPU accounting from /proc: a server's whole process tree (PostgreSQL forks a backend per connection)


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, user+system CPU seconds) for every readable process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def _task_ns(pid: int) -> float:
    """CPU seconds of a process's live threads from schedstat (nanoseconds, not 10 ms clock ticks)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def cpu_snapshot(pids: dict[str, int], precise: bool = False) -> dict[str, float]:
    """Process name -> CPU seconds of its process tree. `precise`: from schedstat, for short runs at low
    rates (a thread that ended between two snapshots is missed: the services' threads live on)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    snap: dict[str, float] = {}
    for name, root in pids.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in table:
                total += _task_ns(pid) if precise else table[pid][1]
                todo.extend(children.get(pid, []))
        snap[name] = total
    return snap


# -- load generation


def reply_complete(status: int, data: bytes, stream: bool) -> bool:
    if status != 200:
        return False
    return b"event: message_stop" in data[-256:] if stream else b'"stop_reason"' in data


async def one(session: aiohttp.ClientSession, url: str, body: bytes,
              headers: dict[str, str]) -> tuple[int, bytes, float, float]:
    """(status, body, seconds to the last byte, seconds to the first body byte), both from sending."""
    s = time.perf_counter()
    first = float("nan")
    try:
        async with session.post(url, data=body, headers=headers) as r:
            data = bytearray()
            async for chunk in r.content.iter_any():
                if not data:
                    first = time.perf_counter() - s
                data += chunk
            return r.status, bytes(data), time.perf_counter() - s, first
    except (TimeoutError, aiohttp.ClientError) as e:
        return 0, f"{type(e).__name__}: {e}".encode(), time.perf_counter() - s, first


async def run_level(target: Target, body: bytes, stream: bool, conc: int, max_requests: int,
                    duration: float) -> Result:
    url = target.url.rstrip("/") + "/v1/messages"
    # Uncompressed replies on every layer (the emulator and the gateway compress when asked), so the
    # layers compare like for like and the completeness check can read the bytes.
    headers = {"x-api-key": target.key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "identity"}
    connector = aiohttp.TCPConnector(limit=conc, limit_per_host=conc, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120),
                                     auto_decompress=False) as session:
        # Warm-up, not counted: opens the pool's connections and fills the servers' caches.
        for _ in range(max(1, 20 // conc)):
            await asyncio.gather(*(one(session, url, body, headers) for _ in range(conc)))
        ok: list[float] = []
        ttfb: list[float] = []
        errors = 0
        first_error: str | None = None
        issued = 0
        cpu0 = cpu_snapshot(target.pids)
        c0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker() -> None:
            nonlocal issued, errors, first_error
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                status, data, elapsed, first = await one(session, url, body, headers)
                if reply_complete(status, data, stream):
                    ok.append(elapsed)
                    ttfb.append(first)
                else:
                    errors += 1
                    if first_error is None:
                        first_error = f"HTTP {status}: {data[:600].decode(errors='replace')}"

        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
        client = (time.process_time() - c0) / wall
        cpu1 = cpu_snapshot(target.pids)
    server = {name: cpu1[name] - cpu0.get(name, cpu1[name]) for name in cpu1}
    return Result(target.layer, conc, ok, ttfb, errors, wall, client, server, first_error)


async def run_paced(target: Target, body: bytes, stream: bool, rate: float, duration: float) -> Result:
    """Open loop: `rate` requests/s for `duration` s whatever the replies take (its `concurrency` is 0).
    CPU per request at a fixed offered load does not depend on how much of the machine neighbours
    take, as closed-loop req/s does."""
    url = target.url.rstrip("/") + "/v1/messages"
    headers = {"x-api-key": target.key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "identity"}
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120),
                                     auto_decompress=False) as session:
        await asyncio.gather(*(one(session, url, body, headers) for _ in range(8)))  # warm-up
        cpu0 = cpu_snapshot(target.pids, precise=True)
        c0 = time.process_time()
        t0 = time.perf_counter()
        tasks = []
        for i in range(int(rate * duration)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(session, url, body, headers)))
        replies = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        client = (time.process_time() - c0) / wall
        cpu1 = cpu_snapshot(target.pids, precise=True)
    ok = [elapsed for status, data, elapsed, _ in replies if reply_complete(status, data, stream)]
    ttfb = [first for status, data, _, first in replies if reply_complete(status, data, stream)]
    bad = [(status, data) for status, data, _, _ in replies if not reply_complete(status, data, stream)]
    first_error = f"HTTP {bad[0][0]}: {bad[0][1][:600].decode(errors='replace')}" if bad else None
    server = {name: cpu1[name] - cpu0.get(name, cpu1[name]) for name in cpu1}
    return Result(target.layer, 0, ok, ttfb, len(bad), wall, client, server, first_error)


# -- the servers


def gateway_config(tmp: Path, telemetry: dict[str, object] | None = None, spiffe_mode: str | None = None,
                   bodies: list[dict[str, object]] | None = None, authz_transport: str | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    if authz_transport is not None:
        cfg.setdefault("services", {})["authz_transport"] = authz_transport
    if bodies is not None:
        cfg.setdefault("audit", {})["bodies"] = bodies
    if telemetry is not None:
        cfg["telemetry"] = telemetry
    cfg["storage"] = {"data_dir": str(tmp / "data")}
    if spiffe_mode is not None:
        cfg.setdefault("services", {})["spiffe"] = {"mode": spiffe_mode}
    cfg["policy"]["dir"] = str(REPO / "policies")
    # The bench's gateway always serves from the emulator, whatever credentials are around.
    for p in cfg["providers"]:
        p["emulator"] = True
    path = tmp / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bare_envoy_config(upstream: str) -> dict[str, object]:
    host, _, port = upstream.removeprefix("http://").rpartition(":")
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bare",
        "codec_type": "AUTO",
        "request_timeout": "0s",
        "stream_idle_timeout": "600s",
        "route_config": {"name": "bare", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "600s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "node": {"id": "ccr-bench-bare", "cluster": "ccr-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "bare",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "per_connection_buffer_limit_bytes": MAX_BODY,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "5s",
                "per_connection_buffer_limit_bytes": MAX_BODY,
                "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
            }],
        },
    }


def _bound_port(admin_url: str) -> int | None:
    try:
        with urllib.request.urlopen(admin_url + "/listeners?format=json", timeout=1) as r:
            statuses = json.loads(r.read()).get("listener_statuses", [])
    except (OSError, ValueError):
        return None
    for s in statuses:
        port = s.get("local_address", {}).get("socket_address", {}).get("port_value")
        if port:
            return int(port)
    return None


@contextmanager
def bare_envoy(upstream: str, tmp: Path, concurrency: int = 1) -> Iterator[tuple[str, Child]]:
    """Envoy with a static router-only config in front of `upstream`; its listener binds port 0.

    `concurrency`: the gateway's own Envoy worker count, so the two are compared like for like."""
    with static_envoy("bare-envoy", bare_envoy_config(upstream), tmp, concurrency) as out:
        yield out


@contextmanager
def static_envoy(name: str, config: dict[str, object], tmp: Path, concurrency: int = 1) -> Iterator[tuple[str, Child]]:
    """Envoy `name` on a static bootstrap whose one listener binds port 0: (its URL, the child), stopped on exit.
    Its admin address is in tmp/<name>-admin."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    admin_path = tmp / f"{name}-admin"
    child = spawn(name, [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency",
                         str(concurrency), "--admin-address-path", str(admin_path), "-l", "warning",
                         "--drain-time-s", "1", "--parent-shutdown-time-s", "2"], tmp / "logs")
    try:
        wait_until(child, lambda: admin_path.exists() and admin_path.read_text().strip() != "", 30, "serving admin")
        admin_url = "http://" + admin_path.read_text().strip()
        wait_until(child, lambda: _bound_port(admin_url) is not None, 30, "listening")
        yield f"http://127.0.0.1:{_bound_port(admin_url)}", child
    finally:
        child.stop()


# -- output


def print_table(results: list[Result], client_note: float) -> None:
    cores = os.cpu_count() or 1
    print(f"\n{'layer':<11}{'conc':>5}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
          f"{'client cpu':>12}{'server cpu':>12}")
    client_bound = busy = False
    for r in results:
        server_share = sum(r.server_cpu.values()) / r.wall if r.server_cpu else None
        flags = "*" if r.client_cpu >= client_note else ""
        if server_share is not None and r.client_cpu + server_share >= BUSY * cores:
            flags += "#"
        client_bound |= "*" in flags
        busy |= "#" in flags
        server = f"{server_share:.0%}" if server_share is not None else "-"
        print(f"{r.layer:<11}{r.concurrency:>5}{r.requests:>10}{r.errors:>8}{r.p50:>9.1f}{r.p99:>9.1f}{r.rps:>9.1f}"
              f"{r.client_cpu:>12.0%}{server:>12} {flags}")
    if client_bound:
        print(f"* the client (this process, one core) was at >= {client_note:.0%} of a core: at that level the "
              "load generator, not the server, may set the ceiling.")
    if busy:
        print(f"# client + servers used >= {BUSY:.0%} of the machine's {cores} cores: the processes queue for CPU, "
              "so latency there includes waiting for a core.")
    print(f"(cpu columns: share of one core; this machine has {cores} cores shared by client and servers)")
    for r in results:
        if r.first_error:
            print(f"first error, {r.layer} c={r.concurrency}: {r.first_error}")
            if r.first_error.startswith("HTTP 429"):
                print("  (the key's requests-per-minute limit: bench with a key of its own, "
                      "`ccr keys create bench --rpm 10000000`)")


def print_summary(results: list[Result]) -> None:
    by = {(r.layer, r.concurrency): r for r in results}
    layers = list(dict.fromkeys(r.layer for r in results))
    concs = list(dict.fromkeys(r.concurrency for r in results))
    pairs = [(a, b) for a, b in (("bare-envoy", "emulator"), ("gateway", "bare-envoy"), ("gateway", "emulator"))
             if a in layers and b in layers]
    if pairs:
        print("\nadded cost (p50 / p99 difference, ms):")
        for a, b in pairs:
            cells = [f"c={c}: {by[a, c].p50 - by[b, c].p50:+.1f} / {by[a, c].p99 - by[b, c].p99:+.1f}"
                     for c in concs if (a, c) in by and (b, c) in by]
            print(f"  {a} vs {b}:".ljust(30) + "   ".join(cells))
    print("\nmax throughput:")
    base: float | None = None
    for layer in layers:
        best = max((r for r in results if r.layer == layer), key=lambda r: r.rps)
        rel = f" ({best.rps / base - 1:+.0%} vs emulator)" if base and layer != "emulator" else ""
        print(f"  {layer:<11}{best.rps:8.1f} req/s at c={best.concurrency}{rel}")
        if layer == "emulator":
            base = best.rps
    top = max(concs)
    lines = []
    for layer in layers:
        r = by.get((layer, top))
        if r is None or not r.server_cpu or not r.ok:
            continue
        parts = sorted(r.server_cpu.items(), key=lambda kv: -kv[1])
        total = sum(r.server_cpu.values()) * 1000 / len(r.ok)
        own = cpu_per_request(r)
        detail = ", ".join(f"{n} {v * 1000 / len(r.ok):.2f}" for n, v in parts if v > 0)
        lines.append(f"  {layer:<11}{total:7.2f} total, {own:6.2f} without the {UPSTREAM}: {detail}")
    if lines:
        print(f"\nserver CPU per successful request (ms), at c={top}:")
        print("\n".join(lines))


# -- issue 6's ratios (the comparison itself is bench/ratios.py)


def cpu_per_request(r: Result) -> float:
    """Server CPU ms per successful request, the upstream left out: what the layer itself costs."""
    if not r.ok or not r.server_cpu:
        return float("nan")
    return sum(v for name, v in r.server_cpu.items() if name not in (UPSTREAM, COLLECTOR)) * 1000 / len(r.ok)


def layer_figures(results: list[Result], layer: str) -> LayerFigures:
    """Latency and TTFB at c=1, best req/s over the levels, CPU per request at the highest level (as the CPU
    table, where the per-request share of idle work is smallest). NaN for what this run did not measure."""
    nan = float("nan")
    mine = [r for r in results if r.layer == layer]
    if not mine:
        return LayerFigures(nan, nan, nan, nan, nan)
    c1 = next((r for r in mine if r.concurrency == 1), None)
    top = max(mine, key=lambda r: r.concurrency)
    return LayerFigures(
        max_rps=max(r.rps for r in mine),
        p50_c1_ms=c1.p50 if c1 else nan,
        p99_c1_ms=c1.p99 if c1 else nan,
        ttfb_p50_c1_ms=c1.ttfb_p50 if c1 else nan,
        cpu_ms_per_request=cpu_per_request(top),
    )


def ratio_checks(by_mode: dict[str, list[Result]]) -> list[Check]:
    checks: list[Check] = []
    for mode, results in by_mode.items():
        checks += compare(mode, layer_figures(results, "bare-envoy"), layer_figures(results, "gateway"))
    return checks


def report(by_mode: dict[str, list[Result]], client_note: float) -> list[Check]:
    """Print each mode's tables, then the ratios of both; return the ratios' checks."""
    for mode, results in by_mode.items():
        print(f"\n=== {'streamed' if mode == 'stream' else 'unstreamed'} ({mode}) ===")
        print_table(results, client_note)
        print_summary(results)
    layers = {r.layer for results in by_mode.values() for r in results}
    if not {"bare-envoy", "gateway"} <= layers:
        print("\n(no ratios: they need bare-envoy and gateway measured in the same run)")
        return []
    checks = ratio_checks(by_mode)
    print("\nissue 6 targets, gateway vs bare Envoy (TTFB: time from sending to the first body byte):")
    print(format_checks(checks))
    return checks


# -- main


def parse_args(argv: list[str] | None = None, ap: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    ap = ap or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated closed-loop worker counts")
    ap.add_argument("--requests", type=int, default=20000, help="at most this many requests per level")
    ap.add_argument("--duration", type=float, default=4.0, help="at most this many seconds per level")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--no-stream", action="store_true", help="only the fixture with \"stream\": false")
    only.add_argument("--stream-only", action="store_true", help="only the streamed fixture")
    only.add_argument("--both", action="store_true", help="streamed, then unstreamed (the default)")
    ap.add_argument("--url", help="a running gateway: measure only it (layer 3), with --key")
    ap.add_argument("--key", default=os.environ.get("ANTHROPIC_API_KEY"),
                    help="ccr API key for --url (default: $ANTHROPIC_API_KEY)")
    ap.add_argument("--telemetry", choices=("compare",),
                    help="compare: only the gateway, three of them side by side: telemetry off, metrics only, "
                         "metrics and traces (--sample-ratio of requests traced to a local OTLP sink), measured in "
                         "--rounds interleaved rounds; prints median req/s, the loss and CPU per request by process")
    ap.add_argument("--sample-ratio", default="0.05",
                    help="telemetry.sample_ratio for --telemetry compare (default: the config's default); a "
                         "comma-separated list measures a traced gateway per ratio (0: only unsampled requests)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="--telemetry compare: interleaved rounds of the three settings (medians are reported)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="--telemetry compare: seconds of rest before each setting's measurement")
    ap.add_argument("--paced", type=float, default=0.0,
                    help="--telemetry compare: instead of closed loop, load every gateway AT ONCE at this many "
                         "req/s each (open loop, --duration s per round) and compare CPU per request")
    ap.add_argument("--bodies-compare", action="store_true",
                    help="only the gateway: no audit.bodies rule, a rule for another tenant, the key's tenant captured")
    ap.add_argument("--spiffe-compare", action="store_true",
                    help="only the gateway, once with services.spiffe.mode: off (plaintext hops, but the adapter's) "
                         "and once with SPIFFE mTLS on every hop; prints req/s of both")
    ap.add_argument("--authz-transport", choices=("grpc", "http"),
                    help="the gateway's services.authz_transport (default: the example config's)")
    ap.add_argument("--warm-up", type=float, default=5.0,
                    help="seconds of uncounted load per mode on bare Envoy and the gateway before measuring (0: none)")
    ap.add_argument("--client-note", type=float, default=0.85,
                    help="flag levels where the client used at least this share of its core")
    args = ap.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error("--concurrency takes integers, e.g. 1,8,32")
    if not args.levels or min(args.levels) < 1:
        ap.error("--concurrency needs at least one level >= 1")
    if args.rounds < 1:
        ap.error("--rounds needs at least 1")
    try:
        args.sample_ratios = [float(r) for r in args.sample_ratio.split(",") if r.strip()]
    except ValueError:
        ap.error("--sample-ratio takes numbers in [0, 1], e.g. 0.05 or 0,0.05")
    if not args.sample_ratios or not all(0 <= r <= 1 for r in args.sample_ratios):
        ap.error("--sample-ratio takes numbers in [0, 1], e.g. 0.05 or 0,0.05")
    if args.url and not args.key:
        ap.error("--url needs --key (or $ANTHROPIC_API_KEY): a ccr key with a high enough rpm")
    args.modes = ["no-stream"] if args.no_stream else ["stream"] if args.stream_only else list(MODES)
    return args


def request_body(stream: bool) -> bytes:
    if stream:
        return fixture_path(AGENT_REQUEST).read_bytes()  # the fixture's own bytes
    request = orjson.loads(fixture_path(AGENT_REQUEST).read_bytes())
    request["stream"] = False
    return orjson.dumps(request)


async def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, list[Result]]:
    """Every mode, every layer, every level; the layers of one mode run back to back so they compare."""
    by_mode: dict[str, list[Result]] = {}
    for mode in args.modes:
        stream = mode == "stream"
        body = request_body(stream)
        print(f"{mode}: {AGENT_REQUEST}, {len(body)} bytes, stream={stream}; levels {args.levels}, "
              f"each <= {args.requests} requests and <= {args.duration:g}s", file=sys.stderr)
        results = by_mode[mode] = []
        for target in targets:
            for c in args.levels:
                r = await run_level(target, body, stream, c, args.requests, args.duration)
                print(f"  {r.layer:<11} c={c:<3} {len(r.ok):>5} ok {r.errors:>4} errors  p50 {r.p50:7.1f} ms  "
                      f"ttfb {r.ttfb_p50:7.1f} ms  {r.rps:7.1f} req/s", file=sys.stderr)
                results.append(r)
    return by_mode


async def warm_up(targets: list[Target], args: argparse.Namespace) -> None:
    """Load each target, uncounted, for --warm-up seconds per mode at c=8: a gateway's first half-minute
    (SVIDs issued, the router's first pushes, the first audit and decision-log batches, caches filling)
    must not land in whichever level happens to be measured first."""
    for mode in args.modes:
        stream = mode == "stream"
        for target in targets:
            r = await run_level(target, request_body(stream), stream, 8, args.requests, args.warm_up)
            print(f"  warm-up {r.layer:<11} {mode:<9} {len(r.ok):>5} ok {r.errors:>4} errors", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, list[Result]]:
    """The measurement: starts the servers (unless --url), measures, stops them. Results per mode."""
    return run_repeated(args, 1)[0]


def run_repeated(args: argparse.Namespace, repeat: int) -> list[dict[str, list[Result]]]:
    """`repeat` whole measurements, one after the other, on the same servers (started once): results per mode,
    per measurement."""
    if args.url:
        return [asyncio.run(measure([Target("gateway", args.url, args.key)], args)) for _ in range(repeat)]
    with tempfile.TemporaryDirectory(prefix="ccr-bench-") as d:
        tmp = Path(d)
        t = time.monotonic()
        print("starting the gateway ...", file=sys.stderr)
        gw = Gateway(gateway_config(tmp, authz_transport=args.authz_transport))
        try:
            gw.start()
            assert gw.runtime is not None and gw.emulator_url and gw.emulator_key
            from extauth.keys import create_key

            # A key of its own with a huge rpm, so the rate limit never answers 429 here.
            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            print(f"gateway up in {time.monotonic() - t:.1f}s at {gw.url}", file=sys.stderr)
            pids = {c.name: c.pid for c in gw.children}
            with bare_envoy(gw.emulator_url, tmp, gw.config.envoy_concurrency()) as (bare_url, bare):
                targets = [
                    Target("emulator", gw.emulator_url, gw.emulator_key, {UPSTREAM: pids[UPSTREAM]}),
                    Target("bare-envoy", bare_url, gw.emulator_key, {"envoy": bare.pid, UPSTREAM: pids[UPSTREAM]}),
                    Target("gateway", gw.url, key, pids),
                ]
                if args.warm_up > 0:
                    asyncio.run(warm_up(targets[1:], args))
                return [asyncio.run(measure(targets, args)) for _ in range(repeat)]
        finally:
            gw.stop()


@contextmanager
def otlp_sink(tmp: Path, pids: dict[str, int] | None = None) -> Iterator[str]:
    """A span sink process (bench/_otlp_sink.py); yields its host:port. Its pid goes into `pids`."""
    from ccr.procs import wait_ready_file

    ready = tmp / "otlp-sink.ready"
    child = spawn(COLLECTOR, [sys.executable, str(REPO / "bench" / "_otlp_sink.py"), str(ready)],
                  tmp / "logs", cwd=REPO)
    if pids is not None:
        pids[COLLECTOR] = child.pid
    try:
        yield str(wait_ready_file(child, ready)["address"])
    finally:
        child.stop()
        print(child.log_tail(), file=sys.stderr)


def telemetry_settings(sample_ratios: list[float]) -> dict[str, float | None]:
    """Setting name -> the traced gateway's sample ratio (None: no tracing): off, metrics, then traces."""
    out: dict[str, float | None] = {"off": None, "metrics": None}
    if len(sample_ratios) == 1:
        return out | {"metrics+traces": sample_ratios[0]}
    return out | {f"m+traces@{r:g}": r for r in sample_ratios}


@contextmanager
def telemetry_gateway(setting: str, tmp: Path, sample_ratio: float | None) -> Iterator[Target]:
    """A gateway with one telemetry setting (and, for traces, its own OTLP sink), up until the block ends."""
    with ExitStack() as stack:
        telemetry: dict[str, object] = {"metrics": setting != "off"}
        sink: dict[str, int] = {}
        if sample_ratio is not None:
            telemetry |= {"otlp_endpoint": stack.enter_context(otlp_sink(tmp, sink)), "sample_ratio": sample_ratio}
        gw = Gateway(gateway_config(tmp, telemetry))
        stack.callback(gw.stop)
        gw.start()
        assert gw.runtime is not None
        from extauth.keys import create_key

        _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
        print(f"telemetry {setting}: gateway at {gw.url}", file=sys.stderr)
        yield Target(setting, gw.url, key, {c.name: c.pid for c in gw.children} | sink)


@dataclass
class Sample:
    """One level of one setting in one round."""
    rps: float
    cpu_ms: float  # gateway CPU ms per request, the upstream left out
    by_process: dict[str, float]  # CPU ms per request


def _spread(xs: list[float], fmt: str = ".1f") -> str:
    """'median [min..max]' of a round's figures."""
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}..{max(xs):{fmt}}]"


def compare_telemetry(args: argparse.Namespace) -> dict[tuple[str, str], dict[str, list[Sample]]]:
    """Issue 11's performance check: gateway req/s with telemetry off, metrics only, metrics and tracing.

    The three gateways run side by side and are measured in interleaved rounds (the order rotates each
    round), so a busy neighbour or a drifting machine weighs on all three alike; the change is the median
    of each round's own ratio to that round's "off". With --paced, each round loads all of them at
    once at the same rate: the machine's other work then disturbs them alike within the round, and CPU
    per request is the figure (a CPU-bound gateway's req/s goes as its inverse)."""
    samples: dict[tuple[str, str], dict[str, list[Sample]]] = {}
    settings = telemetry_settings(args.sample_ratios)
    names = tuple(settings)
    with ExitStack() as stack:
        targets = {}
        for setting, ratio in settings.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ccr-bench-")))
            targets[setting] = stack.enter_context(telemetry_gateway(setting, tmp, ratio))
        for rnd in range(args.rounds):
            if args.paced:
                print(f"round {rnd + 1}/{args.rounds}: all at once, {args.paced:g} req/s each", file=sys.stderr)
                for mode in args.modes:
                    time.sleep(args.settle)
                    body = request_body(mode == "stream")

                    async def all_at_once(body: bytes = body, stream: bool = mode == "stream") -> list[Result]:
                        return list(await asyncio.gather(*(run_paced(targets[s], body, stream, args.paced,
                                                                     args.duration) for s in names)))
                    for r in asyncio.run(all_at_once()):
                        _record(samples, (mode, f"{args.paced:g}/s"), r)
                        print(f"  {mode} {r.layer:<16} {len(r.ok):>5} ok {r.errors:>4} errors  "
                              f"{cpu_per_request(r):6.3f} ms CPU/request", file=sys.stderr)
                continue
            k = rnd % len(names)
            order = names[k:] + names[:k]
            print(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
            for setting in order:
                time.sleep(args.settle)  # the last level's access-log flush and audit writes, off the clock
                res = asyncio.run(measure([targets[setting]], args))
                for mode, rs in res.items():
                    for r in rs:
                        _record(samples, (mode, f"c={r.concurrency}"), r)
    print_telemetry_compare(samples, names, args)
    return samples


def _record(samples: dict[tuple[str, str], dict[str, list[Sample]]], key: tuple[str, str], r: Result) -> None:
    per = {n: v * 1000 / len(r.ok) for n, v in r.server_cpu.items()} if r.ok else {}
    samples.setdefault(key, {}).setdefault(r.layer, []).append(Sample(r.rps, cpu_per_request(r), per))


def print_telemetry_compare(samples: dict[tuple[str, str], dict[str, list[Sample]]], names: tuple[str, ...],
                            args: argparse.Namespace) -> None:
    off, *others = names
    how = (f"rounds with all gateways loaded at once at {args.paced:g} req/s each" if args.paced
           else "interleaved rounds")
    print(f"\nsample_ratio {args.sample_ratio} (traces); {args.rounds} {how}, <= {args.duration:g}s per level; "
          "figures are medians [min..max] over the rounds")
    if args.paced:
        print("gateway CPU ms per request; change = median over rounds of (off / setting - 1): the req/s a "
              "CPU-bound gateway keeps")
    else:
        print("req/s per setting; change = median over rounds of (setting / the same round's off - 1)")
    print(f"{'mode':<10}{'load':>8}  " + "".join(f"{s:>26}" for s in names)
          + "".join(f"{'change ' + s:>30}" for s in others))
    for (mode, load), by in samples.items():
        fig = "cpu_ms" if args.paced else "rps"
        cells = [f"{_spread([getattr(x, fig) for x in by[s]], '.3f' if args.paced else '.1f'):>26}" for s in names]
        for s in others:
            if args.paced:
                change = [(b.cpu_ms / a.cpu_ms - 1) * 100 for a, b in zip(by[s], by[off], strict=True) if a.cpu_ms]
            else:
                change = [(a.rps / b.rps - 1) * 100 for a, b in zip(by[s], by[off], strict=True) if b.rps]
            cells.append(f"{_spread(change, '+.1f') + ' %':>30}" if change else f"{'n/a':>30}")
        print(f"{mode:<10}{load:>8}  " + "".join(cells))
    print(f"\ngateway CPU ms per request ({UPSTREAM} and {COLLECTOR} left out), then by process "
          "(processes under 0.005 ms left out)")
    for (mode, load), by in samples.items():
        print(f"{mode} {load}:")
        print(f"  {'process':<14}" + "".join(f"{s:>26}" for s in names))
        print(f"  {'gateway':<14}" + "".join(f"{_spread([x.cpu_ms for x in by[s]], '.3f'):>26}"
                                             for s in names))
        procs = sorted({n for s in names for x in by[s] for n in x.by_process},
                       key=lambda n: -statistics.median(x.by_process.get(n, 0.0) for x in by[off]))
        for n in procs:
            per = {s: [x.by_process.get(n, 0.0) for x in by[s]] for s in names}
            if max(statistics.median(v) for v in per.values()) < 0.005:
                continue
            print(f"  {n:<14}" + "".join(f"{_spread(per[s], '.3f'):>26}" for s in names))


def run_spiffe_compare(args: argparse.Namespace) -> dict[str, dict[str, list[Result]]]:
    """The gateway alone, with services.spiffe.mode off, then spire (one after the other)."""
    out: dict[str, dict[str, list[Result]]] = {}
    for spiffe in ("off", "spire"):
        with tempfile.TemporaryDirectory(prefix="ccr-bench-") as d:
            print(f"starting the gateway with services.spiffe.mode: {spiffe} ...", file=sys.stderr)
            gw = Gateway(gateway_config(Path(d), spiffe_mode=spiffe))
            try:
                gw.start()
                assert gw.runtime is not None
                from extauth.keys import create_key

                _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
                pids = {c.name: c.pid for c in gw.children}
                out[spiffe] = asyncio.run(measure([Target(f"gw-{spiffe}", gw.url, key, pids)], args))
            finally:
                gw.stop()
    return out


# audit.bodies settings of --bodies-compare; the bench key's tenant is "bench".
BODIES_SETTINGS: dict[str, list[dict[str, object]] | None] = {
    "none": None,  # no rule: the capture filter is not configured at all
    "other": [{"tenant": "elsewhere", "retention_days": 1}],  # rules exist, this key is not captured
    "captured": [{"tenant": "bench", "retention_days": 1}],  # every request's bodies kept, encrypted
}


def run_bodies_compare(args: argparse.Namespace) -> dict[str, dict[str, list[Result]]]:
    """The gateway alone with no body capture rule, a rule for another tenant, and its key captured."""
    out: dict[str, dict[str, list[Result]]] = {}
    for name, bodies in BODIES_SETTINGS.items():
        with tempfile.TemporaryDirectory(prefix="ccr-bench-") as d:
            print(f"starting the gateway with audit.bodies: {name} ...", file=sys.stderr)
            gw = Gateway(gateway_config(Path(d), bodies=bodies))
            try:
                gw.start()
                assert gw.runtime is not None
                from extauth.keys import create_key

                _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000, tenant="bench")
                pids = {c.name: c.pid for c in gw.children}
                out[name] = asyncio.run(measure([Target(f"gw-bodies-{name}", gw.url, key, pids)], args))
            finally:
                gw.stop()
    return out


def print_bodies_compare(out: dict[str, dict[str, list[Result]]]) -> None:
    print("| mode | concurrency | no rule req/s | other tenant's rule req/s | captured req/s | other vs none | "
          "captured vs none |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, base in out["none"].items():
        for a, b, c in zip(base, out["other"][mode], out["captured"][mode], strict=True):
            def pct(x: Result, a: Result = a) -> str:
                return f"{(x.rps / a.rps - 1) * 100:+.1f}%" if a.rps else "n/a"
            print(f"| {mode} | {a.concurrency} | {a.rps:.1f} | {b.rps:.1f} | {c.rps:.1f} | {pct(b)} | {pct(c)} |")


def print_spiffe_compare(out: dict[str, dict[str, list[Result]]]) -> None:
    print("| mode | concurrency | plaintext req/s | SPIFFE mTLS req/s | change | errors (plain/mTLS) |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, plain in out["off"].items():
        for a, b in zip(plain, out["spire"][mode], strict=True):
            change = (b.rps / a.rps - 1) * 100 if a.rps else float("nan")
            print(f"| {mode} | {a.concurrency} | {a.rps:.1f} | {b.rps:.1f} | {change:+.1f}% | {a.errors}/{b.errors} |")
    # Where the difference goes: server CPU per request by process at each mode's highest level.
    print("\nserver CPU ms per successful request at the highest level (plaintext -> SPIFFE mTLS):")
    for mode, plain in out["off"].items():
        a, b = plain[-1], out["spire"][mode][-1]
        if not a.ok or not b.ok:
            continue
        names = sorted(set(a.server_cpu) | set(b.server_cpu), key=lambda n: -b.server_cpu.get(n, 0.0))
        pa = {n: v * 1000 / len(a.ok) for n, v in a.server_cpu.items()}
        pb = {n: v * 1000 / len(b.ok) for n, v in b.server_cpu.items()}
        cells = [f"{n} {pa.get(n, 0.0):.2f}->{pb.get(n, 0.0):.2f}" for n in names if pa.get(n) or pb.get(n)]
        print(f"  {mode} c={a.concurrency}: without the {UPSTREAM} {cpu_per_request(a):.2f} -> "
              f"{cpu_per_request(b):.2f}; " + ", ".join(cells))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.telemetry == "compare":
        compare_telemetry(args)
        return
    if args.spiffe_compare:
        print_spiffe_compare(run_spiffe_compare(args))
        return
    if args.bodies_compare:
        print_bodies_compare(run_bodies_compare(args))
        return
    report(run(args), args.client_note)


if __name__ == "__main__":
    main()
