"""The floor under issue 6's ratios: the gateway's own Envoy config with a decision service that does nothing.

    .venv/bin/python bench/gateway_floor.py [--rounds 4] [--duration 3] [--authz-transport grpc|http]

Three Envoys in turn, against the same emulator and the same running gateway's services (bench/envoy_features.py
builds the static copy of what the router serves; SPIFFE off, so no mTLS to the services: an optimistic floor):

- **bare**: router filter only (bench/gateway.py's bare Envoy);
- **floor**: the full config, its ext_authz cluster pointed at a stub that answers every check with what extauth
  answered for this request (same headers, same metadata) and does no work: no identity, no policy, no limits,
  no decision log (bench/_authz_stub.py, grpc.aio; with `--authz-transport http`, bench/authz_transport.py's
  uvloop + httptools server, against extauth's HTTP front). The usage meter, the access log (and its PostgreSQL rows)
  stay;
- **full**: the full config with the real extauth.

For each, the 84 KB streamed agent request at c=1 (p50, p99, time to first byte) and closed loop at c=32
(req/s; CPU per request of Envoy, the decision server, the access log service, PostgreSQL and Redis, each a
process tree's threads' schedstat). Rounds are interleaved; medians are printed, then issue 6's ratios for the
floor and the full config against bare, and the floor's CPU ratio with the decision server counted as free.
A target the floor misses cannot be met by any decision service behind this Envoy config, in any language.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.envoy_features import (  # noqa: E402
    API_VERSION,
    Ctx,
    _authz_stub,
    authz_stubs,
    bare_envoy_config,
    complete,
    envoy,
    full_bootstrap,
    gateway_config,
)
from bench.gateway import cpu_snapshot  # noqa: E402
from ccr.config import load_config  # noqa: E402
from ccr.contract import (  # noqa: E402
    AUTHZ_HTTP_FULL_PREFIX,
    H_AUTHZ_CONTENT_LENGTH,
    H_AUTHZ_PEER_ADDRESS,
    H_AUTHZ_PROTOCOL,
)
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.procs import Child, spawn, wait_ready_file  # noqa: E402
from ccr.supervisor import Gateway  # noqa: E402
from router import authz_http  # noqa: E402

STEPS = ("bare", "floor", "full")
# Issue 6's targets: (name, limit, whether a figure must stay at or under it).
TARGETS = (("c=32 req/s vs bare", 0.5, False), ("c=1 p50 vs bare", 1.5, True), ("c=1 p99 vs bare", 2.0, True),
           ("CPU/req vs bare", 4.0, True))


def cpu_s(pids: list[int]) -> float:
    """CPU seconds of the process trees rooted at `pids` (PostgreSQL's backends are the postmaster's children)."""
    return sum(cpu_snapshot({str(p): p for p in pids}, precise=True).values())


@dataclass
class Run:
    lat: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU seconds

    def per_request_ms(self, group: str) -> float:
        return self.cpu.get(group, 0.0) * 1000 / self.ok if self.ok else float("nan")


async def drive(url: str, key: str, body: bytes, concurrency: int, duration: float,
                groups: dict[str, list[int]]) -> Run:
    headers = {"x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "identity"}
    run = Run()
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                     auto_decompress=False) as session:
        async def one(counted: bool) -> None:
            t = time.perf_counter()
            first: float | None = None
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    chunks = []
                    async for chunk in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - t
                        chunks.append(chunk)
                    status, data = r.status, b"".join(chunks)
            except (TimeoutError, aiohttp.ClientError) as e:
                status, data = 0, f"{type(e).__name__}: {e}".encode()
            if not counted:
                return
            if complete(status, data, False):
                run.ok += 1
                run.lat.append(time.perf_counter() - t)
                run.ttfb.append(first or 0.0)
            else:
                run.errors += 1
                run.first_error = run.first_error or f"HTTP {status}: {data[:300]!r}"

        for _ in range(3):  # warm-up: connections, caches
            await asyncio.gather(*(one(False) for _ in range(max(concurrency, 4))))
        cpu0 = {g: cpu_s(p) for g, p in groups.items()}
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(True)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall = time.perf_counter() - t0
        run.cpu = {g: cpu_s(p) - cpu0[g] for g, p in groups.items()}
    return run


def ms(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


# Headers of extauth's HTTP answer that are the connection's, not the check's.
_HOP = frozenset({"date", "server", "content-length", "connection", "keep-alive", "transfer-encoding"})


def http_stub(gw: Gateway, tmp: Path, key: str, body: bytes) -> tuple[Child, int]:
    """bench/authz_transport.py's HTTP server answering what extauth's HTTP front answers for the agent request;
    its port."""
    import http.client

    assert gw.runtime is not None and gw.runtime.extauth_http
    host, _, port = gw.runtime.extauth_http.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", AUTHZ_HTTP_FULL_PREFIX + "/v1/messages", body=body, headers={
        "x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json",
        H_AUTHZ_CONTENT_LENGTH: str(len(body)), H_AUTHZ_PROTOCOL: "HTTP/1.1", H_AUTHZ_PEER_ADDRESS: "127.0.0.1"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, (r.status, r.getheaders())
    head = [f"HTTP/1.1 {r.status} OK"] + [f"{k}: {v}" for k, v in r.getheaders() if k.lower() not in _HOP]
    conn.close()
    d = Path(tempfile.mkdtemp(prefix="stub-http-", dir=tmp))
    (d / "answer.bin").write_bytes(("\r\n".join([*head, "content-length: 0", "", ""])).encode())
    child = spawn("authz-http-stub", [sys.executable, str(REPO / "bench" / "authz_transport.py"), "--serve", "http",
                                      "--answer", str(d / "answer.bin"), str(d / "ready")], d)
    return child, int(str(wait_ready_file(child, d / "ready")["address"]).rpartition(":")[2])


def point_http_authz(b: dict, port: int) -> None:
    for c in b["static_resources"]["clusters"]:
        if c["name"] == authz_http.CLUSTER:
            for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]:
                e["endpoint"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (medians are printed)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per step, level and round")
    ap.add_argument("--concurrency", type=int, default=32, help="the throughput level")
    ap.add_argument("--authz-transport", choices=("grpc", "http"), default="grpc",
                    help="services.authz_transport of the gateway (and of the stub)")
    args = ap.parse_args()
    body = fixture_path(AGENT_REQUEST).read_bytes()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-floor-") as d:
        tmp = Path(d)
        print("starting the gateway ...", file=sys.stderr)
        # SPIFFE off: a static bootstrap has no SDS from SPIRE.
        gw = Gateway(gateway_config(tmp, spiffe_mode="off", authz_transport=args.authz_transport))
        stubs: list[Child] = []
        try:
            gw.start()
            assert gw.runtime is not None and gw.emulator_url and gw.emulator_key
            from extauth.keys import create_key

            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            config = load_config(gw.config_path)
            ctx = Ctx(gw.emulator_key, config.provider(config.models[0].provider).cluster, gw.emulator_url)
            full = full_bootstrap(gw)
            floor = full_bootstrap(gw)
            if args.authz_transport == "http":
                child, port = http_stub(gw, tmp, key, body)
                stubs, stub_pid = [child], child.pid
                point_http_authz(floor, port)
            else:
                stubs = authz_stubs(gw, tmp, ctx, key, body)
                _authz_stub("full")(floor, ctx)
                stub_pid = next(c.pid for c in stubs if c.name == "authz-stub-full")
            pids = {c.name: c.pid for c in gw.children}
            services = {
                "extauth": [p for n, p in pids.items() if n == "extauth" or n.startswith("extauth.")],
                "accesslog": [p for n, p in pids.items() if n == "accesslog" or n.startswith("accesslog.")],
                "postgres": [pids["postgres"]],
                "redis": [pids["redis"]],
            }
            configs = {"bare": bare_envoy_config(gw.emulator_url), "floor": floor, "full": full}
            results: dict[tuple[str, int], list[Run]] = {(s, c): [] for s in STEPS for c in (1, args.concurrency)}
            print(f"{AGENT_REQUEST} ({len(body)} bytes, streamed); {args.rounds} rounds of {args.duration:g} s per "
                  f"step and level; Envoy --concurrency 1; SPIFFE off; ext_authz over {args.authz_transport}",
                  file=sys.stderr)
            for r in range(args.rounds):
                for step in STEPS:
                    with envoy(configs[step], tmp, f"{r}-{step}", 1) as (port, _admin, child):
                        groups: dict[str, list[int]] = {"envoy": [child.pid]}
                        if step == "floor":
                            groups |= {"decision": [stub_pid], "accesslog": services["accesslog"],
                                       "postgres": services["postgres"], "redis": services["redis"]}
                        elif step == "full":
                            groups |= {"decision": services["extauth"], "accesslog": services["accesslog"],
                                       "postgres": services["postgres"], "redis": services["redis"]}
                        k = gw.emulator_key if step == "bare" else key
                        for c in (1, args.concurrency):
                            x = asyncio.run(drive(f"http://127.0.0.1:{port}/v1/messages", k, body, c,
                                                  args.duration, groups))
                            results[(step, c)].append(x)
                            print(f"  round {r + 1} {step:<6} c={c:<3} ok={x.ok} err={x.errors} "
                                  f"p50={ms(x.lat, 0.5):.2f} ms req/s={x.ok / x.wall:.0f}"
                                  + (f" first error: {x.first_error}" if x.first_error else ""), file=sys.stderr)
            report(results, args.concurrency)
        finally:
            for s in stubs:
                s.stop()
            gw.stop()


def report(results: dict[tuple[str, int], list[Run]], conc: int) -> None:
    def med(step: str, c: int, f) -> float:  # noqa: ANN001
        return statistics.median(f(x) for x in results[(step, c)])

    groups = ("envoy", "decision", "accesslog", "postgres", "redis")
    print(f"\n{'':<7}{'c=1 p50':>9}{'p99':>8}{'TTFB':>8}{'c=' + str(conc) + ' req/s':>12}  CPU ms/req at c={conc}: "
          + " ".join(f"{g:>9}" for g in groups) + f"{'sum':>8}")
    fig: dict[str, dict[str, float]] = {}
    for step in STEPS:
        cpu = {g: med(step, conc, lambda x, g=g: x.per_request_ms(g)) for g in groups}
        total = sum(v for v in cpu.values() if v == v)
        fig[step] = {"p50": med(step, 1, lambda x: ms(x.lat, 0.5)), "p99": med(step, 1, lambda x: ms(x.lat, 0.99)),
                     "ttfb": med(step, 1, lambda x: ms(x.ttfb, 0.5)), "rps": med(step, conc, lambda x: x.ok / x.wall),
                     "cpu": total, "cpu_no_decision": total - (cpu["decision"] if cpu["decision"] == cpu["decision"]
                                                              else 0.0)}
        print(f"{step:<7}{fig[step]['p50']:>9.2f}{fig[step]['p99']:>8.2f}{fig[step]['ttfb']:>8.2f}"
              f"{fig[step]['rps']:>12.0f}  {'':>21}" + " ".join(f"{cpu[g]:>9.3f}" for g in groups) + f"{total:>8.3f}")
    bare = fig["bare"]
    print(f"\nissue 6's ratios against bare Envoy (medians of {len(results[('bare', 1)])} rounds):")
    print(f"{'figure (target)':<28}{'floor':>10}{'full':>10}")
    for name, limit, at_most in TARGETS:
        key = {"c=32 req/s vs bare": "rps", "c=1 p50 vs bare": "p50", "c=1 p99 vs bare": "p99",
               "CPU/req vs bare": "cpu"}[name]
        row = [fig[s][key] / bare[key] for s in ("floor", "full")]
        verdict = ["PASS" if (v <= limit if at_most else v >= limit) else "MISS" for v in row]
        print(f"{name + (' (<= ' if at_most else ' (>= ') + f'{limit:g})':<28}"
              + "".join(f"{v:>6.2f} {m}" for v, m in zip(row, verdict, strict=True)))
    print(f"{'TTFB over bare (<= +1 ms)':<28}" + "".join(f"{fig[s]['ttfb'] - bare['ttfb']:>+7.2f} ms" for s in
                                                       ("floor", "full")))
    print(f"{'CPU/req, decision free':<28}{fig['floor']['cpu_no_decision'] / bare['cpu']:>6.2f}x "
          f"(the floor's Envoy, access log, PostgreSQL and Redis alone)")


if __name__ == "__main__":
    main()
