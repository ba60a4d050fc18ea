"""Cost from usage and the price table: exact integer micro-USD, cache writes by lifetime, batches."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ccr.budgets import Budget, BudgetIndex, Facts, Period, SubjectKind, window
from ccr.config import Price, parse_config
from ccr.pricing import PriceTable, Rates, Usage, cost_micro, parse_usd, usd, worst_case_micro

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
