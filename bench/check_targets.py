"""Check issue 6's targets: exit 1 if the gateway misses a ratio to bare Envoy (run by hand, not in CI).

Runs bench/gateway.py's measurement (bare Envoy and the full gateway side by side, streamed and unstreamed),
prints its tables and the ratios.

    .venv/bin/python bench/check_targets.py [--duration 4] [--concurrency 1,8,32] [--repeat 3]

`--repeat N` measures N times on the same servers and judges each ratio by its median over the N runs (one
run's figures move by ±10 % on a shared machine: bare Envoy's own best req/s ranged 1074-1667 in three runs
of one quiet hour).

Run by hand, never in CI: timings on a shared machine are noisy, so a miss means "measure again on a quiet
machine" before it means "regression". Exit 0 only when every target was measured and met; a figure that
could not be measured (no c=1 level, no successful request) counts as a miss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway  # noqa: E402  (bench/gateway.py: this directory is on sys.path when run as a script)

from bench.ratios import all_pass, format_checks, median_checks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="measure this many times; judge the median of each ratio")
    args = gateway.parse_args(argv, ap)
    if args.repeat < 1:
        ap.error("--repeat needs at least 1")
    if args.url:
        ap.error("--url measures one running gateway; the ratios need bare Envoy beside it (drop --url)")
    if 1 not in args.levels:
        ap.error("--concurrency must include 1: the latency and TTFB targets are at c=1")
    runs = [gateway.report(by_mode, args.client_note) for by_mode in gateway.run_repeated(args, args.repeat)]
    checks = median_checks(runs) if len(runs) > 1 else runs[0]
    if len(runs) > 1:
        print(f"\nthe median of {len(runs)} runs, each ratio from the run that gave it:")
        print(format_checks(checks))
    missed = [c for c in checks if c.passed is False]
    if all_pass(checks):
        print("\nall targets met")
        return 0
    print(f"\n{len(missed)} target(s) missed: " + "; ".join(f"{c.mode} {c.name}" for c in missed))
    return 1


if __name__ == "__main__":
    sys.exit(main())
