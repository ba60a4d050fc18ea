"""bench/ratios.py with fixed numbers: the verdicts bench/check_targets.py exits on. Runs no benchmark."""

from __future__ import annotations

import math

from bench.ratios import LayerFigures, all_pass, compare, format_checks, median_checks

BARE = LayerFigures(max_rps=800.0, p50_c1_ms=2.0, p99_c1_ms=4.0, ttfb_p50_c1_ms=1.0, cpu_ms_per_request=0.5)
# Exactly on every target: the targets are inclusive.
ON_TARGET = LayerFigures(max_rps=400.0, p50_c1_ms=3.0, p99_c1_ms=8.0, ttfb_p50_c1_ms=2.0, cpu_ms_per_request=2.0)
# The "today" figures: every ratio misses.
TODAY = LayerFigures(max_rps=184.0, p50_c1_ms=11.5, p99_c1_ms=20.0, ttfb_p50_c1_ms=9.0, cpu_ms_per_request=7.25)


def by_name(checks):
    return {c.name: c for c in checks}


def test_ratios_and_differences_are_computed_from_the_figures():
    c = by_name(compare("stream", BARE, TODAY))
    assert c["max req/s, gw/bare"].value == 184.0 / 800.0
    assert c["c=1 p50 ms, gw/bare"].value == 11.5 / 2.0
    assert c["c=1 p99 ms, gw/bare"].value == 20.0 / 4.0
    assert c["CPU ms/req, gw/bare"].value == 7.25 / 0.5
    assert c["c=1 TTFB p50 ms, gw-bare"].value == 8.0
    assert c["max req/s, gw/bare"].bare == 800.0 and c["max req/s, gw/bare"].gateway == 184.0


def test_todays_figures_miss_every_target():
    checks = compare("stream", BARE, TODAY)
    assert [c.verdict for c in checks] == ["MISS"] * 5
    assert not all_pass(checks)


def test_figures_on_the_targets_pass():
    checks = compare("stream", BARE, ON_TARGET)
    assert [c.verdict for c in checks] == ["PASS"] * 5
    assert all_pass(checks)


def test_one_miss_fails_the_whole_run():
    slow_first_byte = LayerFigures(400.0, 3.0, 8.0, 2.01, 2.0)  # 1.01 ms more than bare
    checks = compare("stream", BARE, ON_TARGET) + compare("stream", BARE, slow_first_byte)
    assert [c.verdict for c in checks].count("MISS") == 1
    assert not all_pass(checks)
    throughput_short = LayerFigures(399.0, 3.0, 8.0, 2.0, 2.0)
    assert by_name(compare("stream", BARE, throughput_short))["max req/s, gw/bare"].verdict == "MISS"


def test_unstreamed_ttfb_is_reported_without_a_target():
    checks = compare("no-stream", BARE, TODAY)
    ttfb = by_name(checks)["c=1 TTFB p50 ms, gw-bare"]
    assert ttfb.passed is None and ttfb.verdict == "info" and ttfb.value == 8.0
    # The other four still judge the unstreamed run.
    assert [c.verdict for c in checks if c is not ttfb] == ["MISS"] * 4
    assert all_pass(compare("no-stream", BARE, ON_TARGET))


def test_a_figure_that_was_not_measured_is_a_miss():
    nan = math.nan
    no_c1 = LayerFigures(max_rps=400.0, p50_c1_ms=nan, p99_c1_ms=nan, ttfb_p50_c1_ms=nan, cpu_ms_per_request=2.0)
    c = by_name(compare("stream", BARE, no_c1))
    assert c["c=1 p50 ms, gw/bare"].verdict == "MISS"
    assert c["c=1 p99 ms, gw/bare"].verdict == "MISS"
    assert c["c=1 TTFB p50 ms, gw-bare"].verdict == "MISS"
    idle_bare = LayerFigures(max_rps=0.0, p50_c1_ms=2.0, p99_c1_ms=4.0, ttfb_p50_c1_ms=1.0, cpu_ms_per_request=0.0)
    c = by_name(compare("stream", idle_bare, ON_TARGET))
    assert c["max req/s, gw/bare"].verdict == "MISS" and math.isnan(c["max req/s, gw/bare"].value)
    assert c["CPU ms/req, gw/bare"].verdict == "MISS"


def test_no_judged_check_is_not_a_pass():
    assert not all_pass([])
    info_only = [c for c in compare("no-stream", BARE, ON_TARGET) if c.passed is None]
    assert info_only and not all_pass(info_only)


def test_table_shows_each_figure_target_and_verdict():
    text = format_checks(compare("stream", BARE, TODAY) + compare("no-stream", BARE, ON_TARGET))
    lines = text.splitlines()
    assert len(lines) == 11  # header + 5 per mode
    assert "MISS" in lines[1] and ">= 0.50" in lines[1] and "0.23" in lines[1]
    assert lines[-1].startswith("no-stream") and lines[-1].endswith("info")


def test_the_median_of_repeated_runs_is_one_runs_check_and_its_verdict():
    slow = LayerFigures(max_rps=300.0, p50_c1_ms=3.0, p99_c1_ms=8.0, ttfb_p50_c1_ms=2.0, cpu_ms_per_request=2.0)
    fast = LayerFigures(max_rps=500.0, p50_c1_ms=3.0, p99_c1_ms=8.0, ttfb_p50_c1_ms=2.0, cpu_ms_per_request=2.0)
    runs = [compare("stream", BARE, slow), compare("stream", BARE, fast), compare("stream", BARE, ON_TARGET)]
    med = by_name(median_checks(runs))
    assert med["max req/s, gw/bare"].value == 400.0 / 800.0 and med["max req/s, gw/bare"].gateway == 400.0
    assert med["max req/s, gw/bare"].verdict == "PASS"  # two of three runs at or above 0.50
    two_slow = by_name(median_checks([runs[0], runs[0], runs[1]]))
    assert two_slow["max req/s, gw/bare"].verdict == "MISS"  # one of three: the median misses
    # An even count takes the lower middle run: ties never round a miss up into a pass.
    assert by_name(median_checks([runs[0], runs[1]]))["max req/s, gw/bare"].verdict == "MISS"


def test_a_figure_missing_from_any_run_is_a_miss_in_the_median():
    nan = math.nan
    broken = LayerFigures(max_rps=nan, p50_c1_ms=3.0, p99_c1_ms=8.0, ttfb_p50_c1_ms=2.0, cpu_ms_per_request=2.0)
    med = by_name(median_checks([compare("stream", BARE, ON_TARGET), compare("stream", BARE, broken),
                                 compare("stream", BARE, ON_TARGET)]))
    assert med["max req/s, gw/bare"].verdict == "MISS" and math.isnan(med["max req/s, gw/bare"].value)
