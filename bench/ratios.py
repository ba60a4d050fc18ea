"""Issue 6's targets: the full gateway's cost as ratios to bare Envoy's, measured side by side in one run.

Pure: figures in, verdicts out. bench/gateway.py fills the figures, bench/check_targets.py turns the verdicts
into an exit code, tests/test_bench_ratios.py feeds fixed numbers. Nothing here measures anything.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

# Targets from issue 6. Ratios are gateway / bare Envoy; the TTFB figure is gateway minus bare Envoy.
MIN_THROUGHPUT_RATIO = 0.50
MAX_P50_RATIO = 1.5
MAX_P99_RATIO = 2.0
MAX_CPU_RATIO = 4.0
MAX_TTFB_EXTRA_MS = 1.0


@dataclass(frozen=True)
class LayerFigures:
    """One layer (bare Envoy or the full gateway) in one mode (streamed or not). NaN when not measured."""

    max_rps: float  # best req/s over the concurrency levels
    p50_c1_ms: float  # latency at concurrency 1
    p99_c1_ms: float
    ttfb_p50_c1_ms: float  # time from sending to the first body byte, concurrency 1
    cpu_ms_per_request: float  # server CPU per successful request, the upstream (emulator) excluded


@dataclass(frozen=True)
class Check:
    mode: str  # "stream" or "no-stream"
    name: str
    bare: float
    gateway: float
    value: float  # the ratio (or difference) compared with the target
    target: str  # human form, e.g. ">= 0.50"
    passed: bool | None  # None: informational, no target for this mode

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "MISS"


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den) or den <= 0:
        return math.nan
    return num / den


def _judge(value: float, op: Callable[[float, float], bool], limit: float) -> bool:
    # A figure that could not be computed (no c=1 level, no successful request) is a miss, never a pass.
    return not math.isnan(value) and op(value, limit)


def compare(mode: str, bare: LayerFigures, gateway: LayerFigures) -> list[Check]:
    """The issue's ratios for one mode; TTFB has a target only when the replies are streamed."""
    throughput = _ratio(gateway.max_rps, bare.max_rps)
    p50 = _ratio(gateway.p50_c1_ms, bare.p50_c1_ms)
    p99 = _ratio(gateway.p99_c1_ms, bare.p99_c1_ms)
    cpu = _ratio(gateway.cpu_ms_per_request, bare.cpu_ms_per_request)
    ttfb = gateway.ttfb_p50_c1_ms - bare.ttfb_p50_c1_ms  # NaN propagates
    streamed = mode == "stream"
    return [
        Check(mode, "max req/s, gw/bare", bare.max_rps, gateway.max_rps, throughput,
              f">= {MIN_THROUGHPUT_RATIO:.2f}", _judge(throughput, operator.ge, MIN_THROUGHPUT_RATIO)),
        Check(mode, "c=1 p50 ms, gw/bare", bare.p50_c1_ms, gateway.p50_c1_ms, p50,
              f"<= {MAX_P50_RATIO:.1f}", _judge(p50, operator.le, MAX_P50_RATIO)),
        Check(mode, "c=1 p99 ms, gw/bare", bare.p99_c1_ms, gateway.p99_c1_ms, p99,
              f"<= {MAX_P99_RATIO:.1f}", _judge(p99, operator.le, MAX_P99_RATIO)),
        Check(mode, "CPU ms/req, gw/bare", bare.cpu_ms_per_request, gateway.cpu_ms_per_request, cpu,
              f"<= {MAX_CPU_RATIO:.1f}", _judge(cpu, operator.le, MAX_CPU_RATIO)),
        Check(mode, "c=1 TTFB p50 ms, gw-bare", bare.ttfb_p50_c1_ms, gateway.ttfb_p50_c1_ms, ttfb,
              f"<= {MAX_TTFB_EXTRA_MS:.1f} ms" if streamed else "-",
              _judge(ttfb, operator.le, MAX_TTFB_EXTRA_MS) if streamed else None),
    ]


def all_pass(checks: list[Check]) -> bool:
    """True only if every check with a target passed (and there was at least one)."""
    judged = [c for c in checks if c.passed is not None]
    return bool(judged) and all(c.passed for c in judged)


def median_checks(runs: list[list[Check]]) -> list[Check]:
    """Each check's median over repeated runs (the same checks in the same order in each), as one observed run's
    check: the lower median by value, so its bare and gateway figures are the ones that produced it and its
    verdict is its own (for a threshold, that run passes exactly when at least half of the runs pass; with an
    even count, the lower middle one decides). A figure missing in any run makes the check that run's miss."""
    out = []
    for same in zip(*runs, strict=True):
        if len({(c.mode, c.name) for c in same}) != 1:
            raise ValueError("the runs list different checks")
        missing = [c for c in same if math.isnan(c.value)]
        if missing:
            out.append(missing[0])
            continue
        ordered = sorted(same, key=lambda c: c.value)
        out.append(ordered[(len(ordered) - 1) // 2])
    return out


def format_checks(checks: list[Check]) -> str:
    lines = [f"{'mode':<10}{'figure':<26}{'bare':>9}{'gateway':>9}{'value':>8}  {'target':<11}verdict"]
    for c in checks:
        lines.append(f"{c.mode:<10}{c.name:<26}{c.bare:>9.2f}{c.gateway:>9.2f}{c.value:>8.2f}  {c.target:<11}"
                     f"{c.verdict}")
    return "\n".join(lines)
