"""The rate limit service as Envoy calls it: a real process, real Redis, gRPC over loopback."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ccr.config import Limits
from ccr.procs import free_port
from ratelimit.counters import Counters
from ratelimit.limits import LimitPlanner
from ratelimit.service import Decider, RedisDown, make_redis
from tests.harness import running_service

REPO = Path(__file__).resolve().parent.parent
RPM = 5  # the gateway default in the test config
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
MINUTE = rls_pb2.RateLimitResponse.RateLimit.MINUTE
HOUR = rls_pb2.RateLimitResponse.RateLimit.HOUR

CONFIG = f"""
version: 1
providers: [{{name: anthropic}}]
models: [{{match: "claude-*", provider: anthropic}}]
limits: {{requests_per_minute: {RPM}}}
"""


@pytest.fixture
def rls(tmp_path: Path, redis_url: str) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url) as child, \
            grpc.insecure_channel(str(child.info["address"])) as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


def _req(key_id: str, *, rpu: int | None = None, unit: int = MINUTE, hits: int = 0,
         extra: list[ratelimit_pb2.RateLimitDescriptor] | None = None) -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": key_id}])
    if rpu is not None:
        d.limit.requests_per_unit = rpu
        d.limit.unit = unit
    return rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d, *(extra or [])], hits_addend=hits)


def _key() -> str:
    return f"k_{uuid.uuid4().hex[:12]}"


def _one_window(rls: rls_pb2_grpc.RateLimitServiceStub, n: int) -> tuple[str, list[rls_pb2.RateLimitResponse]]:
    """n decisions for a fresh key, all in one minute window of Redis's clock: a run that straddles
    a minute's end (the time to reset jumps up) is done again with another key."""
    for _ in range(3):
        key = _key()
        got = [rls.ShouldRateLimit(_req(key), timeout=5) for _ in range(n)]
        resets = [r.statuses[0].duration_until_reset.seconds for r in got]
        if resets == sorted(resets, reverse=True):
            return key, got
    raise AssertionError("three runs in a row crossed a minute's end")


def test_counts_down_then_over_limit_with_anthropic_error(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    key, (*allowed, over) = _one_window(rls, RPM + 1)
    for i, r in enumerate(allowed):
        assert r.overall_code == OK
        (st,) = r.statuses
        assert st.code == OK
        assert st.current_limit.requests_per_unit == RPM and st.current_limit.unit == MINUTE
        assert st.limit_remaining == RPM - 1 - i
        assert 1 <= st.duration_until_reset.seconds <= 60
        assert not r.raw_body
        # An allowed request carries the remaining quota too (Envoy adds them to the reply).
        headers = {h.key: h.value for h in r.response_headers_to_add}
        assert headers["anthropic-ratelimit-requests-limit"] == str(RPM)
        assert headers["anthropic-ratelimit-requests-remaining"] == str(RPM - 1 - i)
        assert set(headers) == {f"anthropic-ratelimit-requests-{x}" for x in ("limit", "remaining", "reset")}

    r = over
    assert r.overall_code == OVER and r.statuses[0].code == OVER
    assert r.statuses[0].limit_remaining == 0
    body = json.loads(r.raw_body)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    headers = {h.key: h.value for h in r.response_headers_to_add}
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= 60
    reset_at = headers["anthropic-ratelimit-requests-reset"]
    assert body["error"]["message"] == (
        f"Rate limit of {RPM} requests per minute exceeded for principal {key}; "
        f"resets at {reset_at}, retry after {retry_after} seconds."
    )
    assert headers["content-type"] == "application/json"
    assert headers["anthropic-ratelimit-requests-limit"] == str(RPM)
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.strptime(reset_at, "%Y-%m-%dT%H:%M:%SZ")
    reset_in = reset.replace(tzinfo=UTC).timestamp() - time.time()
    assert -1 <= reset_in <= 60 and reset.second == 0  # the end of the current minute window


def test_override_from_descriptor_and_separate_keys(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    a, b = _key(), _key()
    # The key's own limit (override) wins over the gateway default of RPM per minute.
    for i in range(8):
        r = rls.ShouldRateLimit(_req(a, rpu=8, unit=HOUR), timeout=5)
        assert r.overall_code == OK, i
        assert r.statuses[0].current_limit.requests_per_unit == 8
        assert r.statuses[0].current_limit.unit == HOUR
        assert r.statuses[0].limit_remaining == 7 - i
    r = rls.ShouldRateLimit(_req(a, rpu=8, unit=HOUR), timeout=5)
    assert r.overall_code == OVER
    assert "Rate limit of 8 requests per hour" in json.loads(r.raw_body)["error"]["message"]
    assert 1 <= int({h.key: h.value for h in r.response_headers_to_add}["retry-after"]) <= 3600
    # Another key has its own counter.
    r = rls.ShouldRateLimit(_req(b, rpu=8, unit=HOUR), timeout=5)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 7


def test_hits_addend_counts(rls: rls_pb2_grpc.RateLimitServiceStub, redis_url: str) -> None:
    key = _key()
    r = rls.ShouldRateLimit(_req(key, rpu=10, unit=HOUR, hits=4), timeout=5)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 6
    # The counter: one fixed-window key per descriptor and hour, expiring with its window.
    window = int(time.time()) // 3600 * 3600
    with redis.Redis.from_url(redis_url) as rc:
        counter = f"ccr:rl:ccr:principal={key}:hour:{window}"
        assert rc.get(counter) == b"4"
        assert 0 < rc.ttl(counter) <= 3600
    r = rls.ShouldRateLimit(_req(key, rpu=10, unit=HOUR, hits=6), timeout=5)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 0
    r = rls.ShouldRateLimit(_req(key, rpu=10, unit=HOUR), timeout=5)  # 0 means 1
    assert r.overall_code == OVER


def test_unknown_descriptors_are_not_limited(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    other = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "remote_address", "value": "10.0.0.1"}])
    for _ in range(3):
        r = rls.ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="ccr", descriptors=[other]), timeout=5
        )
        assert r.overall_code == OK
        assert not r.statuses[0].HasField("current_limit")
        assert r.statuses[0].limit_remaining == 0  # what envoyproxy/ratelimit answers for no limit
    # Mixed: statuses keep the request's order; only the key descriptor is counted.
    key = _key()
    r = rls.ShouldRateLimit(_req(key, rpu=3, unit=HOUR, extra=[other]), timeout=5)
    assert [s.code for s in r.statuses] == [OK, OK]
    assert r.statuses[0].limit_remaining == 2
    assert not r.statuses[1].HasField("current_limit")


def test_concurrent_calls_allow_exactly_the_limit(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    key = _key()
    futures = [rls.ShouldRateLimit.future(_req(key, rpu=20, unit=HOUR), timeout=10) for _ in range(50)]
    codes = [f.result().overall_code for f in futures]
    assert codes.count(OK) == 20
    assert codes.count(OVER) == 30


def test_redis_down_is_unavailable_not_allow(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=dead) as child:
        with grpc.insecure_channel(str(child.info["address"])) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            with pytest.raises(grpc.RpcError) as exc:
                stub.ShouldRateLimit(_req(_key()), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert child.alive()
    assert "redis unavailable" in child.log_path.read_text()


def _redis_calls(rc: redis.Redis) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT (also those inside scripts), but our INFO and CONFIG
    and a new connection's handshake (HELLO, CLIENT SETINFO, AUTH, SELECT): each of the service's threads
    connects on its first call, whichever call that is, and that is not a decision's traffic."""
    stats = rc.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
            if k.split("|", 1)[0] not in _NOT_DECISIONS}


_NOT_DECISIONS = {"cmdstat_info", "cmdstat_config", "cmdstat_hello", "cmdstat_client", "cmdstat_auth",
                  "cmdstat_select"}


def test_over_limit_answers_come_from_the_local_cache(
        rls: rls_pb2_grpc.RateLimitServiceStub, redis_url: str) -> None:
    key = _key()
    for _ in range(3):
        assert rls.ShouldRateLimit(_req(key, rpu=3, unit=HOUR), timeout=5).overall_code == OK
    first_over = rls.ShouldRateLimit(_req(key, rpu=3, unit=HOUR), timeout=5)
    assert first_over.overall_code == OVER
    with redis.Redis.from_url(redis_url) as rc:
        rc.config_resetstat()
        for _ in range(10):
            r = rls.ShouldRateLimit(_req(key, rpu=3, unit=HOUR), timeout=5)
            assert r.overall_code == OVER and r.statuses[0].code == OVER
            assert r.statuses[0].limit_remaining == 0
            assert r.statuses[0].current_limit.requests_per_unit == 3
            assert "Rate limit of 3 requests per hour" in json.loads(r.raw_body)["error"]["message"]
            assert {h.key for h in r.response_headers_to_add} == {h.key for h in first_over.response_headers_to_add}
        assert _redis_calls(rc) == {}  # none of the ten reached Redis
        # A key under its limit still does, once per decision.
        assert rls.ShouldRateLimit(_req(_key(), rpu=3, unit=HOUR), timeout=5).overall_code == OK
        # (commandstats also counts the commands the script runs)
        assert _redis_calls(rc) == {"evalsha": 1, "time": 1, "incrby": 1, "pttl": 1, "pexpire": 1}


def test_script_reloads_after_script_flush(rls: rls_pb2_grpc.RateLimitServiceStub, redis_url: str) -> None:
    key = _key()
    assert rls.ShouldRateLimit(_req(key, rpu=5, unit=HOUR), timeout=5).statuses[0].limit_remaining == 4
    with redis.Redis.from_url(redis_url) as rc:
        rc.script_flush()
        r = rls.ShouldRateLimit(_req(key, rpu=5, unit=HOUR), timeout=5)
        # Counted exactly once more: the NOSCRIPT attempt ran nothing.
        assert r.overall_code == OK and r.statuses[0].limit_remaining == 3
        window = int(time.time()) // 3600 * 3600
        counter = f"ccr:rl:ccr:principal={key}:hour:{window}"
        assert rc.get(counter) == b"2"
        assert 0 < rc.ttl(counter) <= 3600
    assert rls.ShouldRateLimit(_req(key, rpu=5, unit=HOUR), timeout=5).statuses[0].limit_remaining == 2


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_over_limit_cache_ends_with_the_window(redis_url: str) -> None:
    """In process, with injected clocks (Redis's for the script, a monotonic one for the cache):
    cached OVER_LIMIT needs no Redis and ends at the window end."""
    start = (30_000_000 + uuid.uuid4().int % 1_000_000) * 60_000  # a minute window no other test shares
    mono = _Clock(1000.0)
    key = _key()

    live = make_redis(redis_url)
    dead = make_redis(f"redis://127.0.0.1:{free_port()}/0")
    counters = Counters(live, now_ms=start + 10_500)
    decider = Decider(counters, LimitPlanner(Limits(requests_per_minute=RPM)), monotonic=mono)
    try:
        for i in range(RPM):
            r = decider.should_rate_limit(_req(key))
            assert r.overall_code == OK and r.statuses[0].limit_remaining == RPM - 1 - i
        r = decider.should_rate_limit(_req(key))
        assert r.overall_code == OVER
        assert {h.key: h.value for h in r.response_headers_to_add}["retry-after"] == "50"

        counters.redis = dead  # from here any Redis call fails
        mono.now += 48.7  # 59.2 s into the window
        r = decider.should_rate_limit(_req(key, hits=3))
        assert r.overall_code == OVER and r.statuses[0].duration_until_reset.seconds == 1
        headers = {h.key: h.value for h in r.response_headers_to_add}
        assert headers["retry-after"] == "1"
        assert headers["anthropic-ratelimit-requests-reset"] == _rfc3339(start // 1000 + 60)
        with pytest.raises(RedisDown):  # an uncached key does need Redis
            decider.should_rate_limit(_req(_key()))
        # A higher limit for the same counter is not decided by the cache.
        with pytest.raises(RedisDown):
            decider.should_rate_limit(_req(key, rpu=100, unit=MINUTE))

        counters.redis = live
        counters.now_ms = start + 59_200
        r = decider.should_rate_limit(_req(key, rpu=100, unit=MINUTE))
        assert r.overall_code == OK and r.statuses[0].limit_remaining == 100 - (RPM + 2)

        counters.now_ms = start + 60_000  # the window ended: a fresh counter, allowed again
        mono.now += 0.8
        r = decider.should_rate_limit(_req(key))
        assert r.overall_code == OK and r.statuses[0].limit_remaining == RPM - 1
        assert r.statuses[0].duration_until_reset.seconds == 60
    finally:
        for c in (live, dead):
            c.close()


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
