"""The counter script on a real Redis, with an injected clock (Counters.now_ms): windows, buckets, edges."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from ratelimit.counters import CHARGE, NO_GATE, Algorithm, CounterOp, Counters
from ratelimit.service import make_redis

MIN = 60_000
T0 = 1_900_000_040_000  # a fixed instant, 20 s into a minute, far from today's windows


@pytest.fixture
def counters(redis_url: str) -> Iterator[Counters]:
    client = make_redis(redis_url)
    try:
        yield Counters(client, now_ms=T0)
    finally:
        client.close()


def _k() -> str:
    return f"test:{uuid.uuid4().hex}"


def test_fixed_window_counts_every_hit_and_resets_at_the_window_end(counters: Counters) -> None:
    key = _k()
    op = CounterOp(key, Algorithm.FIXED, 1, MIN, 3)
    got = [counters.run([op])[1][0] for _ in range(4)]
    assert [o.over for o in got] == [False, False, False, True]
    assert [o.remaining for o in got] == [2, 1, 0, 0]
    assert got[3].left == -1  # counted even when over: envoyproxy/ratelimit's semantics
    assert got[0].reset_ms == 40_000  # T0 is 20 s into its minute
    counters.now_ms = T0 + 40_000  # the next minute: a fresh counter
    (o,) = counters.run([op])[1]
    assert not o.over and o.remaining == 2 and o.reset_ms == MIN


def test_fixed_window_hits_zero_checks_without_counting(counters: Counters) -> None:
    key = _k()
    for _ in range(3):
        (o,) = counters.run([CounterOp(key, Algorithm.FIXED, 0, MIN, 3)])[1]
        assert not o.over and o.remaining == 3


def test_sliding_window_has_no_burst_at_the_window_edge(counters: Counters) -> None:
    """10 per minute: 10 at the end of one minute, then none in the first part of the next.
    A fixed window would allow 10 more right after the edge: 20 in two seconds."""
    key = _k()
    op = CounterOp(key, Algorithm.SLIDING, 1, MIN, 10)
    counters.now_ms = T0 + 39_000  # 59 s into the minute
    assert [counters.run([op])[1][0].over for _ in range(11)] == [False] * 10 + [True]
    counters.now_ms = T0 + 41_000  # 1 s into the next minute
    (o,) = counters.run([op])[1]
    assert o.over and o.remaining == 0
    # Free again once the slot holding the ten is a whole minute old, not before.
    assert o.retry_ms == (T0 + 39_000) // 1000 * 1000 + 61_000 - counters.now_ms
    counters.now_ms = T0 + 39_000 + 59_000
    assert counters.run([op])[1][0].over
    counters.now_ms = T0 + 39_000 + 61_000
    (o,) = counters.run([op])[1]
    assert not o.over and o.remaining == 9


def test_sliding_refusals_do_not_count(counters: Counters) -> None:
    key = _k()
    op = CounterOp(key, Algorithm.SLIDING, 4, MIN, 10)
    assert [counters.run([op])[1][0].over for _ in range(3)] == [False, False, True]
    small = CounterOp(key, Algorithm.SLIDING, 2, MIN, 10)
    (o,) = counters.run([small])[1]
    assert not o.over and o.remaining == 0  # 4 + 4 + 2: the refused 4 was not counted


def test_token_bucket_burst_then_refill(counters: Counters) -> None:
    key = _k()
    # 60 per minute = 1 per second, up to 5 at once.
    op = CounterOp(key, Algorithm.BUCKET, 1, MIN, 60, burst=5)
    assert [counters.run([op])[1][0].over for _ in range(6)] == [False] * 5 + [True]
    (o,) = counters.run([op])[1]
    assert o.over and o.retry_ms == 1000
    counters.now_ms = T0 + 2000
    assert [counters.run([op])[1][0].over for _ in range(3)] == [False, False, True]


def test_all_or_nothing_and_charges(counters: Counters) -> None:
    a, b = _k(), _k()
    ok = CounterOp(a, Algorithm.SLIDING, 1, MIN, 100)
    full = CounterOp(b, Algorithm.SLIDING, 1, MIN, 1)
    counters.run([full])
    (oa, ob) = counters.run([ok, full])[1]
    assert ob.over and not oa.over
    assert oa.remaining == 100  # a was not committed: b refused the request
    # A shadow limit's refusal does not gate.
    (oa, ob) = counters.run([ok, CounterOp(b, Algorithm.SLIDING, 1, MIN, 1, flags=NO_GATE)])[1]
    assert ob.over and oa.remaining == 99
    # A charge (tokens at stream end) is counted even past the limit, and never says over.
    (oc,) = counters.run([CounterOp(b, Algorithm.SLIDING, 50, MIN, 1, flags=CHARGE)])[1]
    assert not oc.over
    # ...and a check (hits 0) then finds the budget used up.
    (chk,) = counters.run([CounterOp(b, Algorithm.SLIDING, 0, MIN, 1)])[1]
    assert chk.over


def test_token_bucket_charge_goes_into_debt(counters: Counters) -> None:
    key = _k()
    check = CounterOp(key, Algorithm.BUCKET, 0, MIN, 600, burst=600)  # 10 tokens a second
    assert not counters.run([check])[1][0].over
    counters.run([CounterOp(key, Algorithm.BUCKET, 700, MIN, 600, burst=600, flags=CHARGE)])
    (o,) = counters.run([check])[1]
    assert o.over and o.retry_ms == 10_100  # 100 tokens of debt, then 1 token, at 10 per second
    counters.now_ms = T0 + 10_100
    assert not counters.run([check])[1][0].over


def test_redis_clock_is_used_when_none_is_injected(redis_url: str) -> None:
    client = make_redis(redis_url)
    try:
        now, (o,) = Counters(client).run([CounterOp(_k(), Algorithm.FIXED, 1, MIN, 5)])
        with redis.Redis.from_url(redis_url) as rc:
            sec, usec = rc.time()
        assert abs(sec * 1000 + usec // 1000 - now) < 5000
        assert o.reset_ms == MIN - now % MIN
    finally:
        client.close()


def test_a_broken_connection_raises_once_never_resends_and_reconnects(counters: Counters, redis_url: str) -> None:
    """The raw path (own connection per thread, hiredis packing): a connection Redis dropped fails
    the call with a ConnectionError (the Decider refuses: fail closed), the script is not sent
    again behind the caller's back (it might have run: no double count), and the next call
    reconnects."""
    key = _k()
    op = CounterOp(key, Algorithm.FIXED, 1, MIN, 5)
    assert counters.run([op])[1][0].left == 4
    own_id = counters._call("CLIENT", "ID")
    with redis.Redis.from_url(redis_url) as rc:
        assert rc.client_kill_filter(_id=own_id) == 1
        with pytest.raises(redis.ConnectionError):
            counters.run([op])
        assert counters.run([op])[1][0].left == 3  # counted twice in all: the failed call never ran
        assert counters._call("CLIENT", "ID") != own_id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sliding_window_running_sum_matches_counting_every_slot(counters: Counters, seed: int) -> None:
    """The script keeps a running sum and drops slots as they leave the window; a model that counts
    every live slot from scratch must give the same answers (over, remaining, retry, reset), through
    refusals, check-only calls, idle gaps shorter and longer than the window, and a clock jump."""
    import random

    rng = random.Random(seed)
    key = _k()
    limit, slot = 40, MIN // 60
    slots: dict[int, int] = {}  # the model: slot -> hits
    now = T0
    for step in range(600):
        gap = rng.choice([0, 0, 137, 999, 1000, 4_321, 30_000, 59_000, 61_000, 75_000])
        if step == 300:
            gap = 300 * slot  # far more than a window: nothing is left
        now += gap
        counters.now_ms = now
        hits = rng.choice([0, 1, 1, 2, 3, 7])
        cur = now // slot
        for s in [s for s in slots if s < cur - 60]:
            del slots[s]
        used = sum(slots.values())
        fits = used + hits <= limit if hits else used < limit
        (o,) = counters.run([CounterOp(key, Algorithm.SLIDING, hits, MIN, limit)])[1]
        assert o.over is (not fits), (step, used, hits)
        assert o.left == limit - used - hits + (hits if not fits else 0), step
        if used:
            assert o.reset_ms == (max(slots) + 61) * slot - now, step
        if not fits:
            need = used + hits - limit if hits else used - limit + 1
            dropped, retry = 0, MIN
            for s in sorted(slots):
                dropped += slots[s]
                if dropped >= need:
                    retry = (s + 61) * slot - now
                    break
            assert o.retry_ms == retry, step
        elif hits:
            slots[cur] = slots.get(cur, 0) + hits


def test_a_hung_store_is_not_asked_again_until_the_hold_ends(redis_url: str) -> None:
    """A Redis that accepts but never answers: the first call waits out its timeout, the calls in the
    next STALL_HOLD_S fail at once (extauth decides on its event loop: each waiting 0.25 s in turn
    would stall every Check), and the first call after the hold asks the store again."""
    import socket

    from redis import exceptions as rx

    from ratelimit.counters import STALL_HOLD_S

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel completes connections; nothing ever reads or replies
    now = [100.0]
    client = make_redis(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", timeout_s=0.05)
    live = make_redis(redis_url)
    counters = Counters(client, now_ms=T0, clock=lambda: now[0])
    op = CounterOp(_k(), Algorithm.FIXED, 1, MIN, 5)
    try:
        with pytest.raises(rx.TimeoutError):
            counters.run([op])
        now[0] += STALL_HOLD_S - 0.01
        with pytest.raises(rx.ConnectionError, match="not asked again"):
            counters.run([op])
        now[0] += 0.02
        with pytest.raises(rx.TimeoutError):  # the hold ended: the store was asked (and still hangs)
            counters.run([op])
        counters.redis = live  # the store answers again: after the next hold, calls go through
        now[0] += STALL_HOLD_S
        assert counters.run([op])[1][0].left == 4
    finally:
        counters.close()
        client.close()
        live.close()
        hung.close()
