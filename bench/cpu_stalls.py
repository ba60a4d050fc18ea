"""The machine's own latency floor: how often a thread that never blocks is kept off its CPU, and for how long.

    .venv/bin/python bench/cpu_stalls.py [--seconds 10] [--cpus all|0,1] [--threshold-us 100]

One process per CPU (pinned) spins reading the monotonic clock and records every gap between two reads
longer than --threshold-us: time the thread did not run although it never slept (the kernel or, on a
virtual machine, the host ran something else). With every CPU busy at once, as under a load test, these
stalls are the floor under any p99: a request in flight during a 3 ms stall takes at least 3 ms, whatever
the service does. Nothing else should run meanwhile (the spinners would only measure each other less).

Prints per CPU the number of stalls over 0.1 / 0.5 / 1 / 2 ms, the longest, and the share of a second
lost to them, and which other threads of this machine ran meanwhile (from /proc/*/task/*/schedstat: CPU
time, times scheduled, time per run); then the same for one CPU spinning alone (the others idle). Time
the host took (a virtual machine's steal) shows in no thread's figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Callable

BUCKETS_US = (100, 500, 1000, 2000)


def spin(cpu: int, seconds: float, threshold_ns: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    os.sched_setaffinity(0, {cpu})
    now = time.perf_counter_ns
    end = now() + int(seconds * 1e9)
    last = now()
    gaps: list[int] = []
    while last < end:
        t = now()
        if t - last > threshold_ns:
            gaps.append(t - last)
        last = t
    out.put((cpu, gaps))


def run(cpus: list[int], seconds: float, threshold_us: int) -> tuple[dict[int, list[int]], Callable[[], None]]:
    """Each CPU's gaps, and a function printing the other threads that ran meanwhile."""
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=spin, args=(c, seconds, threshold_us * 1000, q)) for c in cpus]
    for p in procs:
        p.start()
    before = threads()
    got = dict(q.get() for _ in procs)
    after = threads()
    for p in procs:
        p.join()
    skip = {os.getpid(), *(p.pid for p in procs if p.pid is not None)}
    return got, lambda: others(before, after, skip)


def threads() -> dict[tuple[int, int], tuple[str, int, int]]:
    """Every thread's (name, ns on CPU, times scheduled), by (pid, tid)."""
    out: dict[tuple[int, int], tuple[str, int, int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ran, _, runs = (int(x) for x in f.read().split())
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except (OSError, ValueError):
                continue
            out[(int(pid), int(tid))] = (name, ran, runs)
    return out


def others(before: dict[tuple[int, int], tuple[str, int, int]], after: dict[tuple[int, int], tuple[str, int, int]],
           skip: set[int], top: int = 6) -> None:
    rows = []
    for k, (name, ran, runs) in after.items():
        if k[0] in skip or k not in before:
            continue
        d_ran, d_runs = ran - before[k][1], runs - before[k][2]
        if d_ran > 0:
            rows.append((d_ran, d_runs, name, k))
    rows.sort(reverse=True)
    print("  other threads that ran: " + ", ".join(
        f"{name} ({pid}/{tid}) {ran / 1e6:.1f} ms in {runs} runs ({ran / 1e6 / max(runs, 1):.2f} ms/run)"
        for ran, runs, name, (pid, tid) in rows[:top]) if rows else "  no other thread ran")


def report(title: str, got: dict[int, list[int]], seconds: float) -> None:
    print(title)
    print(f"  {'cpu':>3} " + " ".join(f"{'>' + str(b / 1000) + ' ms':>9}" for b in BUCKETS_US)
          + f" {'longest':>9} {'lost':>7}")
    for cpu, gaps in sorted(got.items()):
        counts = [sum(g > b * 1000 for g in gaps) for b in BUCKETS_US]
        longest = max(gaps, default=0) / 1e6
        lost = sum(gaps) / 1e9 / seconds
        print(f"  {cpu:>3} " + " ".join(f"{c:>9}" for c in counts) + f" {longest:>7.2f}ms {100 * lost:>6.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cpus", default="all", help="comma-separated CPU numbers, or all (this process's)")
    ap.add_argument("--threshold-us", type=int, default=100)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0)) if args.cpus == "all" else [int(c) for c in args.cpus.split(",")]
    print(f"{len(cpus)} CPU(s), {args.seconds:g} s each run; load average before: {os.getloadavg()[0]:.2f}")
    runs = [("every CPU spinning at once:", cpus)] + [(f"CPU {c} spinning alone:", [c]) for c in cpus]
    for title, which in runs:
        got, print_others = run(which, args.seconds, args.threshold_us)
        report(title, got, args.seconds)
        print_others()


if __name__ == "__main__":
    main()
