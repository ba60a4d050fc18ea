"""Cost from usage and the price table: exact integer micro-USD, cache writes by lifetime, batches."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ccr.budgets import Budget, BudgetIndex, Facts, Period, SubjectKind, window
from ccr.config import Price, parse_config
from ccr.pricing import (
    PriceTable,
    Rates,
    Usage,
    batch_worst_case_micro,
    cost_micro,
    parse_usd,
    usd,
    worst_case_micro,
)

SONNET = Price(input=3.0, output=15.0, cache_write=3.75, cache_write_1h=6.0, cache_read=0.30)


def test_each_part_is_priced_and_summed_exactly() -> None:
    r = Rates.of(SONNET)
    # 1000 in x 3 + 500 out x 15 + 200 5m writes x 3.75 + 100 1h writes x 6 + 10000 reads x 0.30 (micro-USD)
    u = Usage(1000, 500, 300, 10_000, cache_creation_5m_input_tokens=200, cache_creation_1h_input_tokens=100)
    assert cost_micro(u, r) == 3000 + 7500 + 750 + 600 + 3000


def test_fractions_never_drift_like_floats() -> None:
    r = Rates.of(Price(input=0.1, output=0.2))
    # 0.1 + 0.2 per token in float is 0.30000000000000004; ten million tokens each must be exactly $3.
    assert cost_micro(Usage(10_000_000, 10_000_000), r) == 3_000_000
    # Sub-micro amounts are rounded up once, on the total.
    assert cost_micro(Usage(1, 0), r) == 1
    assert cost_micro(Usage(0, 0), r) == 0


def test_unsplit_cache_writes_are_priced_at_the_dearer_1h_price() -> None:
    r = Rates.of(SONNET)
    assert cost_micro(Usage(0, 0, 100, 0), r) == 600
    # a partial split: the rest is priced at 1h
    assert cost_micro(Usage(0, 0, 100, 0, cache_creation_5m_input_tokens=60), r) == 60 * 3.75 + 40 * 6


def test_1h_price_defaults_to_twice_input() -> None:
    assert Rates.of(Price(input=3.0, cache_write=3.75)).cache_write_1h == 6_000_000  # pico-USD per token


def test_batch_discount_halves_the_cost() -> None:
    r = Rates.of(SONNET)
    u = Usage(1000, 1000)
    assert cost_micro(u, r, batch=True) == cost_micro(u, r) // 2 == 9000


def test_worst_case_covers_every_body_byte_at_the_dearest_input_price_plus_max_tokens() -> None:
    r = Rates.of(SONNET)
    assert worst_case_micro(r, 1000, 100) == (1001 * 6 + 100 * 15)
    u = Usage(0, 100, 1000, 0, cache_creation_1h_input_tokens=1000)  # the dearest a 1000-byte body can be
    assert cost_micro(u, r) <= worst_case_micro(r, 1000, 100)


# Claude Haiku 5.5's published rates: prompts up to 100,000 tokens, and dearer ones over that.
HAIKU_55 = Price(input=0.10, output=0.50, cache_write=0.125, cache_write_1h=0.20, cache_read=0.01,
                 long_context={"over_prompt_tokens": 100_000, "input": 0.50, "output": 2.50, "cache_write": 0.625,
                               "cache_write_1h": 1.0, "cache_read": 0.05})  # type: ignore[arg-type]


def test_a_long_prompt_prices_the_whole_request_at_the_long_context_rates() -> None:
    r = Rates.of(HAIKU_55)
    # At the threshold: the base rates (0.10 in, 0.50 out).
    assert cost_micro(Usage(100_000, 1000), r) == 10_000 + 500
    # One token over: every part at the long rates, the output too (0.50 in, 2.50 out).
    assert cost_micro(Usage(100_001, 1000), r) == 50_001 + 2500
    # The threshold counts cache writes and reads with the input: 1 + 60,000 + 40,000 is over it.
    u = Usage(1, 0, 60_000, 40_000, cache_creation_5m_input_tokens=60_000, cache_creation_1h_input_tokens=0)
    assert cost_micro(u, r) == 1 + 60_000 * 0.625 + 40_000 * 0.05
    # ... and the same without the read is under it.
    u = Usage(1, 0, 60_000, 0, cache_creation_5m_input_tokens=60_000, cache_creation_1h_input_tokens=0)
    assert cost_micro(u, r) == 1 + 60_000 * 0.125
    # The batch discount applies to whichever rates the prompt got.
    assert cost_micro(Usage(200_000, 0), r, batch=True) == 200_000 * 0.50 / 2


def test_long_context_rates_take_the_1h_default_from_their_own_input() -> None:
    r = Rates.of(Price(input=1, output=5, long_context={"over_prompt_tokens": 10, "input": 2,  # type: ignore[arg-type]
                                                        "output": 10, "cache_write": 2.5}))
    assert r.long is not None and r.long.cache_write_1h == 4_000_000 and r.cache_write_1h == 2_000_000


def test_long_context_needs_a_threshold_and_its_own_input_and_output() -> None:
    for bad in ({"input": 1, "output": 2}, {"over_prompt_tokens": 0, "input": 1, "output": 2},
                {"over_prompt_tokens": 10, "output": 2}, {"over_prompt_tokens": 10, "input": 1},
                {"over_prompt_tokens": 10, "input": 1, "output": 2, "cache_hit": 0.1}):
        with pytest.raises(ValueError):
            Price(input=1, output=2, long_context=bad)  # type: ignore[arg-type]


def test_the_worst_case_of_a_body_that_may_be_long_takes_the_dearer_rates() -> None:
    r = Rates.of(HAIKU_55)
    # 99,999 bytes: at most 100,000 tokens, never long; the dearest input is the 1h write (0.20).
    assert worst_case_micro(r, 99_999, 1000) == 100_000 * 0.20 + 1000 * 0.50
    # 100,000 bytes may be 100,001 tokens: the long rates (1h write 1.0, output 2.50) bound it.
    assert worst_case_micro(r, 100_000, 1000) == 100_001 * 1.0 + 1000 * 2.50
    # Whatever the prompt turns out to be, the worst case covers its cost.
    for n in (99_999, 100_000, 100_001, 250_000):
        worst = worst_case_micro(r, n, 1000)
        for u in (Usage(n + 1, 1000), Usage(0, 1000, n + 1, 0, cache_creation_1h_input_tokens=n + 1),
                  Usage(n // 2, 1000, 0, n - n // 2)):
            assert cost_micro(u, r) <= worst, (n, u)


def test_a_batch_worst_case_prices_each_request_as_possibly_long() -> None:
    r = Rates.of(HAIKU_55)
    # Two requests in a 150,000-byte batch: either prompt may be long; at half price, rounded up.
    assert batch_worst_case_micro([(r, 1000), (r, 2000)], 150_000) == -(-(150_001 * 1 + 3000 * 2.5) // 2) == 78_751
    # 50,000 bytes: neither can be long, the base rates (1h write 0.20, output 0.50).
    assert batch_worst_case_micro([(r, 1000)], 50_000) == -(-(50_001 * 0.20 + 1000 * 0.50) // 2)


def test_price_table_follows_routing_order() -> None:
    cfg = parse_config({"providers": [{"name": "a"}], "models": [
        {"match": "claude-haiku-*", "provider": "a", "price": {"input": 1, "output": 5}},
        {"match": "claude-*", "provider": "a", "price": {"input": 3, "output": 15}}]})
    t = PriceTable(cfg)
    assert t.rates("claude-haiku-4-5").output == 5_000_000  # type: ignore[union-attr]
    assert t.rates("claude-sonnet-4-5").output == 15_000_000  # type: ignore[union-attr]
    assert t.rates("gpt-4") is None


def test_usd_text_round_trips() -> None:
    assert parse_usd("20") == 20_000_000
    assert parse_usd("$0.000001") == 1
    assert usd(20_500_000) == "20.500000"
    for bad in ("-1", "0.0000001", "abc", "nan"):
        with pytest.raises(ValueError):
            parse_usd(bad)


def _ts(s: str) -> int:
    return int(datetime.fromisoformat(s).timestamp())


def test_calendar_periods_utc_and_zoned() -> None:
    now = _ts("2026-11-26T10:00:00+00:00")  # a Thursday
    d = window(Period.DAY, "UTC", now)
    assert (d.label, d.start, d.end) == ("2026-11-26", _ts("2026-11-26T00:00:00+00:00"),
                                         _ts("2026-11-27T00:00:00+00:00"))
    w = window(Period.WEEK, "UTC", now)
    assert (w.start, w.end) == (_ts("2026-11-23T00:00:00+00:00"), _ts("2026-11-30T00:00:00+00:00"))  # Monday
    m = window(Period.MONTH, "UTC", _ts("2026-12-31T23:59:59+00:00"))
    assert (m.label, m.end) == ("2026-12", _ts("2027-01-01T00:00:00+00:00"))
    # New York: the day of the DST change has 25 hours; 03:00 UTC is still the 1st of Nov there.
    ny = window(Period.DAY, "America/New_York", _ts("2026-11-02T03:00:00+00:00"))
    assert ny.label == "2026-11-01" and ny.end - ny.start == 25 * 3600
    assert datetime.fromtimestamp(ny.start, UTC).hour == 4  # midnight EDT


def test_applicable_budgets_by_subject_and_seat() -> None:
    g_shared = Budget("eng", SubjectKind.GROUP, "eng", Period.DAY, 10, scope="shared")
    g_seat = Budget("eng-seat", SubjectKind.GROUP, "eng", Period.DAY, 2, scope="per_seat")
    t = Budget("acme", SubjectKind.TENANT, "acme", Period.MONTH, 100, scope="shared")
    k = Budget("k1", SubjectKind.KEY, "key_1", Period.WEEK, 5)
    u = Budget("alice", SubjectKind.USER, "oidc:https://idp#alice", Period.DAY, 1)
    idx = BudgetIndex([g_shared, g_seat, t, k, u])
    got = idx.applicable(Facts("key_1", "key", "key_1", ("eng", "ops"), "acme", None))
    assert sorted((b.name, seat) for b, seat in got) == [("acme", ""), ("eng", ""), ("eng-seat", "key_1"), ("k1", "")]
    person = idx.applicable(Facts("oidc:https://idp#alice", "user", None, (), None, None))
    assert [b.name for b, _ in person] == ["alice"]


def test_group_budgets_must_say_shared_or_per_seat() -> None:
    with pytest.raises(ValueError, match="shared"):
        Budget("x", SubjectKind.GROUP, "eng", Period.DAY, 1)
    with pytest.raises(ValueError, match="scope"):
        Budget("x", SubjectKind.KEY, "k", Period.DAY, 1, scope="shared")
