"""Envoy rate limit service (RateLimitService/ShouldRateLimit) on Redis fixed windows.

Counting follows envoyproxy/ratelimit: one counter per descriptor and window,
incremented by the request's hits, OVER_LIMIT when the count after the increment
exceeds the limit. A descriptor carrying `principal` (ccr.contract.RL_PRINCIPAL_KEY)
is limited by the override Envoy sends (the principal's own limit from extauth
metadata) or by the gateway default per minute; any other descriptor is unlimited.

Cost per decision: one Redis round trip (EVALSHA of a small Lua script that
increments every limited counter of the request and sets the expiry of new
ones), and none at all for a counter this process has already seen over its
limit in the current window (the over-limit cache: counts only grow within a
window, so the decision cannot change until the window ends).

It runs on grpcio's sync server with a thread pool: a decision only waits on
Redis, and that server costs less CPU per call than grpc.aio (bench/profiles.md).
Several worker processes may share the port (services.workers): the counters are
in Redis, and each process's over-limit cache only holds what Redis already said.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from ccr.config import GatewayConfig
from ccr.contract import RL_DOMAIN as DOMAIN
from ccr.contract import RL_PRINCIPAL_KEY
from ccr.errors import error_body
from ccr.runtime import Runtime
from ratelimit import spend

log = logging.getLogger("ccr.ratelimit")

KEY_PREFIX = "ccr:rl"
LIMITED_KEY = RL_PRINCIPAL_KEY
UNLIMITED_REMAINING = 2**32 - 1  # what envoyproxy/ratelimit reports for unlimited descriptors

Unit = rls_pb2.RateLimitResponse.RateLimit
# RateLimitOverride uses envoy.type.v3.RateLimitUnit, whose numbers match
# RateLimitResponse.RateLimit.Unit for every unit they share.
UNIT_SECONDS: dict[int, int] = {
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86400,
    Unit.WEEK: 7 * 86400,
    Unit.MONTH: 30 * 86400,
    Unit.YEAR: 365 * 86400,
}
UNIT_WORD: dict[int, str] = {
    Unit.SECOND: "second", Unit.MINUTE: "minute", Unit.HOUR: "hour", Unit.DAY: "day",
    Unit.WEEK: "week", Unit.MONTH: "month", Unit.YEAR: "year",
}

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_KEY_HEAD = f"{KEY_PREFIX}:{DOMAIN}:"

# KEYS: the counters; ARGV: hits and expiry seconds per counter, interleaved.
# Returns the counts after the increment. The expiry is set only on a counter
# without one (EXPIRE NX, which the Redis 6.2 baseline lacks): one unit from its
# creation, so never before its window ends.
INCR_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('INCRBY', key, ARGV[2 * i - 1])
  if redis.call('TTL', key) == -1 then
    redis.call('EXPIRE', key, ARGV[2 * i])
  end
end
return out
"""

# The over-limit cache is swept of ended windows when it reaches this size, and
# dropped whole if it is still that big (it only saves Redis calls; losing it is safe).
CACHE_SWEEP_AT = 50_000


@dataclass(slots=True)
class _Counter:
    status: rls_pb2.RateLimitResponse.DescriptorStatus  # this descriptor's, in the response
    key: str
    limit: int
    unit: int
    end: int  # epoch second the window ends
    after: int | None  # the count after this request; None until Redis answers


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    def __init__(self, redis: redis.Redis, default_rpm: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.default_rpm = default_rpm
        self.clock = clock
        self._script = INCR_SCRIPT.encode()
        self._sha: str | None = None
        # counter key -> (window end, a count it has reached): counts only grow within
        # a window, so while that count exceeds the limit the answer is OVER_LIMIT.
        self.over_limit: dict[str, tuple[int, int]] = {}
        self._sweep = threading.Lock()  # decisions run on several threads

    def _limit_of(self, d: ratelimit_pb2.RateLimitDescriptor) -> tuple[int, int]:
        """(requests_per_unit, unit) for a limited descriptor."""
        if d.HasField("limit"):
            rpu, unit = d.limit.requests_per_unit, d.limit.unit
            if rpu > 0 and unit in UNIT_SECONDS:
                return rpu, unit
            # An override Envoy could not fill sensibly: fall back rather than block the key.
            log.warning("ignoring unusable limit override %s/%s", rpu, unit)
        return self.default_rpm, Unit.MINUTE

    def _increment(self, keys: list[str], args: list[int]) -> list[int]:
        """One EVALSHA; on NOSCRIPT (Redis restarted or SCRIPT FLUSH) load it and retry.

        The retry cannot count twice: a NOSCRIPT reply means nothing ran.
        """
        if self._sha is not None:
            try:
                return self.redis.evalsha(self._sha, len(keys), *keys, *args)  # type: ignore[no-any-return]
            except NoScriptError:
                log.info("rate limit script not in Redis; loading it again")
        self._sha = self.redis.script_load(self._script)
        return self.redis.evalsha(self._sha, len(keys), *keys, *args)  # type: ignore[no-any-return]

    def _remember_over(self, key: str, window_end: int, count: int) -> None:
        cache = self.over_limit
        if len(cache) >= CACHE_SWEEP_AT:
            with self._sweep:
                now = self.clock()
                for k in [k for k, (end, _) in list(cache.items()) if end <= now]:
                    cache.pop(k, None)
                if len(cache) >= CACHE_SWEEP_AT:
                    cache.clear()
        cache[key] = (window_end, count)

    def should_rate_limit(self, req: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        now = self.clock()
        inow = int(now)
        request_hits = req.hits_addend or 1  # Envoy: 0 means 1
        resp = rls_pb2.RateLimitResponse(overall_code=OK)
        statuses = resp.statuses
        counted: list[_Counter] = []
        keys: list[str] = []
        args: list[int] = []
        limited_domain = req.domain == DOMAIN
        cache = self.over_limit
        for d in req.descriptors:
            st = statuses.add(code=OK, limit_remaining=UNLIMITED_REMAINING)
            if not limited_domain or not any(e.key == LIMITED_KEY for e in d.entries):
                continue
            limit, unit = self._limit_of(d)
            div = UNIT_SECONDS[unit]
            window = inow // div * div
            end = window + div
            entries = d.entries
            parts = (f"{entries[0].key}={entries[0].value}" if len(entries) == 1
                     else ",".join(f"{e.key}={e.value}" for e in entries))
            key = f"{_KEY_HEAD}{parts}:{UNIT_WORD[unit]}:{window}"
            cached = cache.get(key)
            if cached is not None and cached[0] > now and cached[1] > limit:
                counted.append(_Counter(st, key, limit, unit, end, cached[1]))
                continue
            # A per-descriptor hits_addend may be 0 (check without counting).
            hits = d.hits_addend.value if d.HasField("hits_addend") else request_hits
            counted.append(_Counter(st, key, limit, unit, end, None))
            keys.append(key)
            args.append(hits)
            args.append(div)
        if not counted:
            return resp

        if keys:
            results = iter(self._increment(keys, args))
            for c in counted:
                if c.after is None:
                    c.after = int(next(results))

        worst: _Counter | None = None  # the over-limit counter that resets last
        for c in counted:
            after = c.after
            assert after is not None
            st = c.status
            st.current_limit.requests_per_unit = c.limit
            st.current_limit.unit = c.unit
            st.limit_remaining = max(c.limit - after, 0)
            st.duration_until_reset.seconds = max(math.ceil(c.end - now), 1)
            if after > c.limit:
                st.code = OVER_LIMIT
                if worst is None or c.end > worst.end:
                    worst = c
                seen = cache.get(c.key)
                if seen is None or seen[1] < after:
                    self._remember_over(c.key, c.end, after)
        if worst is not None:
            resp.overall_code = OVER_LIMIT
            _fill_over_limit(resp, worst.limit, worst.unit, now, worst.end - now)
        return resp


def _fill_over_limit(resp: rls_pb2.RateLimitResponse, limit: int, unit: int, now: float, reset: float) -> None:
    """The 429 Envoy sends as a local reply: Anthropic error body plus retry headers."""
    retry_after = max(math.ceil(reset), 1)
    body, headers = _over_limit_reply(limit, unit, retry_after, round(now + reset))
    resp.raw_body = body
    add = resp.response_headers_to_add.add
    for k, v in headers:
        add(key=k, value=v)


@functools.lru_cache(maxsize=1024)
def _over_limit_reply(limit: int, unit: int, retry_after: int,
                      reset_at: int) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    # Memoised: a client hammering past its limit gets the same reply for a whole second.
    message = (
        f"Rate limit of {limit} requests per {UNIT_WORD[unit]} exceeded for this API key; "
        f"retry after {retry_after} seconds."
    )
    return error_body("rate_limit_error", message), (
        ("retry-after", str(retry_after)),
        ("content-type", "application/json"),
        ("anthropic-ratelimit-requests-limit", str(limit)),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", _rfc3339(reset_at)),
    )


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: RateLimiter, spend_gate: spend.SpendGate | None = None) -> None:
        self.limiter = limiter
        self.spend_gate = spend_gate

    def ShouldRateLimit(  # noqa: N802 - gRPC method name
        self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        if not request.descriptors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rate limit request has no descriptors")
        # --- spend seam (issue 8): budget reservations have their own domain; ratelimit/spend.py ---
        if spend.is_spend_request(request):
            return spend.serve(self.spend_gate, request, context)
        try:
            return self.limiter.should_rate_limit(request)
        except (RedisError, OSError) as e:
            # Never a silent allow: Envoy runs with failure_mode_deny and turns this into an error reply.
            log.error("redis unavailable, refusing to decide: %s: %s", type(e).__name__, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit store (Redis) unavailable")
            raise  # unreachable: abort raises


# Threads deciding at once; more calls wait in grpcio's queue. Each holds at most one Redis
# connection for one round trip (~0.1 ms), so 4 keep up with thousands of decisions a second,
# and fewer threads contend less for the GIL: 4 cost less CPU per call than 16 (bench/profiles.md).
# When Redis hangs, calls beyond 4 wait, Envoy's deadline passes, and it denies: fail closed.
THREADS = 4


def make_redis(url: str, connections: int = THREADS) -> redis.Redis:
    # Short timeouts and no client retries: Envoy's own deadline is tens of ms, and
    # re-sending a script after a broken connection could count a request twice.
    # A blocking pool queues callers beyond its size instead of failing them.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=1.0, socket_timeout=1.0, socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


def setup(server: grpc.Server, config: GatewayConfig, runtime: Runtime) -> Callable[[], None]:
    client = make_redis(runtime.redis_url)
    try:
        client.ping()
    except (RedisError, OSError) as e:
        # Keep serving: requests fail UNAVAILABLE until Redis is back, and Envoy denies meanwhile.
        log.warning("redis at start-up not reachable (%s); will answer UNAVAILABLE until it is", e)
    limiter = RateLimiter(client, config.limits.requests_per_minute)
    gate = spend.make_gate(client, runtime.postgres_dsn, config.spend)  # spend seam (issue 8)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter, gate), server)

    def cleanup() -> None:
        if gate is not None:
            gate.close()  # spend seam (issue 8)
        client.close()
        client.connection_pool.disconnect()

    return cleanup
