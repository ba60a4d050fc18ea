"""Where the full gateway's c=1 tail comes from: which hop is slow on the slowest requests, and which
process was busy meanwhile.

    .venv/bin/python bench/gateway_tail.py [--seconds 20] [--no-stream] [--sample-ms 2]

Starts the gateway as bench/gateway.py does (the example config, the emulator upstream), sends the
84 KB agent request closed loop at c=1 for --seconds and records each request's start and latency.
Meanwhile a thread samples every gateway process's CPU time (schedstat, every --sample-ms). Then it
prints:

- the client's p50/p99/p99.9, and Envoy's own P50/P99/P99.9 of each hop it times
  (`cluster.ccr_extauth.upstream_rq_time`: the ext_authz Check; the provider cluster: the upstream;
  `http.ccr.downstream_rq_time`: the whole request as Envoy sees it);
- for the slowest 1 % of requests against the middle ones, each process's CPU during the request
  (ms): a process that works much more during slow requests than during typical ones is what they
  wait for, on 2 cores where every process shares them;
- when the slow requests happened (seconds from the start), to show a period (a flush, an export).

Envoy computes its histograms' quantiles at each stats flush (every 5 s): give --seconds 10 or more.

`--bare` then also runs bare Envoy (bench/gateway.py's router-only config) in front of the same emulator
with the same load, and prints its histograms and client figures: the whole request minus the hops is
what Envoy itself adds (buffering the body for the check, filters), against bare Envoy's own.

`--batch accesslog,postgres --rounds 6` instead alternates rounds (--seconds each) with the named
processes' threads under the normal policy and under SCHED_BATCH (the kernel's policy for work that
must keep its share of the CPU but should not preempt what wakes up beside it), in one gateway, and
prints the client's p50/p99/p99.9 per round and their medians per arm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from bisect import bisect_left, bisect_right
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import (  # noqa: E402
    API_VERSION,
    _proc_table,
    _task_ns,
    bare_envoy,
    gateway_config,
    one,
    reply_complete,
    request_body,
)
from ccr.supervisor import Gateway  # noqa: E402


def process_trees(pids: dict[str, int]) -> dict[str, list[int]]:
    """Name -> the pids of its process tree now (PostgreSQL forks a backend per connection)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, list[int]] = {}
    for name, root in pids.items():
        todo, tree = [root], []
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        out[name] = tree
    return out


class Sampler(threading.Thread):
    """(time, {process: CPU seconds}) every `every` s until stopped. The process trees are read once,
    after the warm-up (a full /proc scan per sample would take longer than the interval)."""

    def __init__(self, trees: dict[str, list[int]], every: float) -> None:
        super().__init__(daemon=True)
        self.trees, self.every = trees, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t = time.perf_counter()
            self.samples.append((t, {n: sum(_task_ns(p) for p in tree) for n, tree in self.trees.items()}))
            self.done.wait(self.every)

    def busy(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process between the samples that bracket [start, end]."""
        times = [t for t, _ in self.samples]
        i = max(0, bisect_right(times, start) - 1)
        j = min(len(times) - 1, bisect_left(times, end))
        a, b = self.samples[i][1], self.samples[j][1]
        return {k: b[k] - a.get(k, b[k]) for k in b}


def set_policy(trees: dict[str, list[int]], names: list[str], policy: int) -> None:
    """Every thread of the named processes' trees under `policy` (SCHED_OTHER or SCHED_BATCH)."""
    for n in names:
        for pid in trees[n]:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))


async def ab_rounds(url: str, key: str, stream: bool, seconds: float, pids: dict[str, int], names: list[str],
                    rounds: int) -> None:
    body = request_body(stream)
    headers = {"x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "identity"}
    arms: dict[str, list[tuple[float, float, float]]] = {"normal": [], "batch": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), auto_decompress=False) as s:
        for _ in range(30):
            await one(s, url + "/v1/messages", body, headers)
        trees = process_trees(pids)
        for r in range(rounds):
            arm = ("normal", "batch")[r % 2]
            set_policy(trees, names, os.SCHED_BATCH if arm == "batch" else os.SCHED_OTHER)
            lat: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                status, data, elapsed, _ = await one(s, url + "/v1/messages", body, headers)
                if reply_complete(status, data, stream):
                    lat.append(elapsed)
            lat.sort()
            qs = tuple(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 for p in (0.5, 0.99, 0.999))
            arms[arm].append(qs)  # type: ignore[arg-type]
            print(f"round {r + 1} {arm:<6} {len(lat)} requests  p50 {qs[0]:.2f}  p99 {qs[1]:.2f}  "
                  f"p99.9 {qs[2]:.2f} ms", flush=True)
        set_policy(trees, names, os.SCHED_OTHER)
    for arm, rows in arms.items():
        med = [statistics.median(x[i] for x in rows) for i in range(3)]
        print(f"{arm:<6} ({'+'.join(names)} {'SCHED_BATCH' if arm == 'batch' else 'SCHED_OTHER'}): median p50 "
              f"{med[0]:.2f}, p99 {med[1]:.2f}, p99.9 {med[2]:.2f} ms")


def envoy_histograms(admin: str) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(admin + "/stats?format=json&filter=upstream_rq_time|downstream_rq_time",
                                timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    out: dict[str, dict[str, float]] = {}
    for s in stats:
        for h in (s.get("histograms") or {}).get("computed_quantiles", []):
            values = {q: v.get("cumulative") for q, v in zip(
                [q for q in s["histograms"]["supported_quantiles"]], h["values"], strict=True)}
            if h["name"].endswith("rq_time") and any(v for v in values.values()):
                out[h["name"]] = {str(q): v for q, v in values.items() if v is not None}
    return out


async def load(url: str, key: str, stream: bool, seconds: float, pids: dict[str, int],
               every: float) -> tuple[list[tuple[float, float]], int, Sampler]:
    body = request_body(stream)
    headers = {"x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "identity"}
    done: list[tuple[float, float]] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), auto_decompress=False) as s:
        for _ in range(30):  # warm-up
            await one(s, url + "/v1/messages", body, headers)
        sampler = Sampler(process_trees(pids), every)
        sampler.start()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            status, data, elapsed, _ = await one(s, url + "/v1/messages", body, headers)
            if reply_complete(status, data, stream):
                done.append((t, elapsed))
            else:
                errors += 1
    sampler.done.set()
    sampler.join()
    return done, errors, sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--sample-ms", type=float, default=2.0)
    ap.add_argument("--batch", help="A/B: these processes (comma-separated) under SCHED_BATCH every other round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--bare", action="store_true", help="also bare Envoy on the same emulator and load")
    args = ap.parse_args()
    bare_out: tuple[list[tuple[float, float]], dict[str, dict[str, float]]] | None = None
    with tempfile.TemporaryDirectory(prefix="ccr-tail-") as d:
        tmp = Path(d)
        gw = Gateway(gateway_config(tmp))
        try:
            gw.start()
            assert gw.runtime is not None
            from extauth.keys import create_key

            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            pids = {c.name: c.pid for c in gw.children}
            if args.batch:
                asyncio.run(ab_rounds(gw.url, key, not args.no_stream, args.seconds, pids, args.batch.split(","),
                                      args.rounds))
                return
            done, errors, sampler = asyncio.run(load(gw.url, key, not args.no_stream, args.seconds, pids,
                                                     args.sample_ms / 1000))
            hist = envoy_histograms(gw.admin_url)
            if args.bare:
                assert gw.emulator_url and gw.emulator_key
                with bare_envoy(gw.emulator_url, tmp, gw.config.envoy_concurrency()) as (bare_url, bare):
                    bdone, _, _ = asyncio.run(load(bare_url, gw.emulator_key, not args.no_stream, args.seconds,
                                                   {"envoy": bare.pid}, args.sample_ms / 1000))
                    admin = "http://" + (tmp / "bare-envoy-admin").read_text().strip()
                    bare_out = (bdone, envoy_histograms(admin))
        finally:
            gw.stop()
    t0 = done[0][0]
    lat = sorted(e for _, e in done)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000

    print(f"{len(done)} requests at c=1 ({'JSON' if args.no_stream else 'SSE'}), {errors} errors; client p50 "
          f"{q(0.5):.2f} ms, p99 {q(0.99):.2f} ms, p99.9 {q(0.999):.2f} ms")
    print("\nEnvoy's histograms (ms; P50 / P99 / P99.9):")
    for name, v in sorted(hist.items()):
        print(f"  {name:<60} {v.get('50', float('nan')):>7} {v.get('99', float('nan')):>7} "
              f"{v.get('99.9', float('nan')):>7}")
    if bare_out is not None:
        blat = sorted(e for _, e in bare_out[0])
        b99 = blat[min(len(blat) - 1, int(len(blat) * 0.99))]
        print(f"\nbare Envoy, same emulator and load: {len(blat)} requests; client p50 "
              f"{blat[len(blat) // 2] * 1000:.2f} ms, p99 {b99 * 1000:.2f} ms")
        for name, v in sorted(bare_out[1].items()):
            print(f"  {name:<60} {v.get('50', float('nan')):>7} {v.get('99', float('nan')):>7} "
                  f"{v.get('99.9', float('nan')):>7}")
    cut = q(0.99) / 1000
    slow = [(t, e) for t, e in done if e >= cut]
    mid = sorted(done, key=lambda x: x[1])[len(done) * 2 // 5: len(done) * 3 // 5]
    names = sorted(pids)

    def mean_busy(rows: list[tuple[float, float]]) -> dict[str, float]:
        per = [sampler.busy(t, t + e) for t, e in rows]
        return {n: statistics.mean(p.get(n, 0.0) for p in per) * 1000 for n in names}

    sb, mb = mean_busy(slow), mean_busy(mid)
    gaps = [b[0] - a[0] for a, b in zip(sampler.samples, sampler.samples[1:], strict=False)]
    print(f"\nCPU per process during a request (ms; bracketed by samples every {statistics.median(gaps) * 1000:.2f} ms"
          f" median): the slowest "
          f"{len(slow)} (>= {cut * 1000:.2f} ms) against the middle {len(mid)}")
    print(f"  {'process':<14} {'slow':>7} {'middle':>7}")
    for n in sorted(names, key=lambda n: sb[n] - mb[n], reverse=True):
        print(f"  {n:<14} {sb[n]:7.2f} {mb[n]:7.2f}")
    print("\nwhen the slowest happened (s from the start; latency ms):")
    print("  " + ", ".join(f"{t - t0:.2f}s {e * 1000:.1f}" for t, e in sorted(slow)[:40]))


if __name__ == "__main__":
    main()
