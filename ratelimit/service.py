"""Envoy rate limit service (RateLimitService/ShouldRateLimit) on Redis fixed windows.

Counting follows envoyproxy/ratelimit: one counter per descriptor and window,
`INCRBY hits` + `EXPIRE` for every limited descriptor of a request in one
MULTI/EXEC round trip, OVER_LIMIT when the count after the increment exceeds
the limit. A descriptor carrying `key_id` is limited by the override Envoy sends
(the key's own limit from extauth metadata) or by the gateway default per
minute; any other descriptor is unlimited.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ccr.config import GatewayConfig
from ccr.contract import RL_DOMAIN as DOMAIN
from ccr.contract import RL_PRINCIPAL_KEY
from ccr.errors import error_body
from ccr.runtime import Runtime

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


@dataclass(frozen=True, slots=True)
class _Counter:
    index: int  # position in the request's descriptor list
    key: str
    limit: int
    unit: int
    hits: int


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, default_rpm: int) -> None:
        self.redis = redis
        self.default_rpm = default_rpm

    def _limit_of(self, d: ratelimit_pb2.RateLimitDescriptor) -> tuple[int, int]:
        """(requests_per_unit, unit) for a limited descriptor."""
        if d.HasField("limit"):
            rpu, unit = d.limit.requests_per_unit, d.limit.unit
            if rpu > 0 and unit in UNIT_SECONDS:
                return rpu, unit
            # An override Envoy could not fill sensibly: fall back rather than block the key.
            log.warning("ignoring unusable limit override %s/%s", rpu, unit)
        return self.default_rpm, Unit.MINUTE

    async def should_rate_limit(self, req: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        now = time.time()
        request_hits = req.hits_addend or 1  # Envoy: 0 means 1
        statuses = [
            rls_pb2.RateLimitResponse.DescriptorStatus(code=OK, limit_remaining=UNLIMITED_REMAINING)
            for _ in req.descriptors
        ]
        counters: list[_Counter] = []
        if req.domain == DOMAIN:
            for i, d in enumerate(req.descriptors):
                if not any(e.key == LIMITED_KEY for e in d.entries):
                    continue
                limit, unit = self._limit_of(d)
                div = UNIT_SECONDS[unit]
                window = int(now) // div * div
                parts = ",".join(f"{e.key}={e.value}" for e in d.entries)
                # A per-descriptor hits_addend may be 0 (check without counting).
                hits = d.hits_addend.value if d.HasField("hits_addend") else request_hits
                key = f"{KEY_PREFIX}:{req.domain}:{parts}:{UNIT_WORD[unit]}:{window}"
                counters.append(_Counter(i, key, limit, unit, hits))
        if not counters:
            return rls_pb2.RateLimitResponse(overall_code=OK, statuses=statuses)

        async with self.redis.pipeline(transaction=True) as pipe:
            for c in counters:
                pipe.incrby(c.key, c.hits)
                pipe.expire(c.key, UNIT_SECONDS[c.unit])
            results = await pipe.execute()

        overall = OK
        worst: tuple[float, _Counter] | None = None  # the over-limit counter that resets last
        for n, c in enumerate(counters):
            after = int(results[2 * n])
            div = UNIT_SECONDS[c.unit]
            reset = (int(now) // div * div + div) - now
            st = statuses[c.index]
            st.current_limit.requests_per_unit = c.limit
            st.current_limit.unit = c.unit
            st.limit_remaining = max(c.limit - after, 0)
            st.duration_until_reset.seconds = max(math.ceil(reset), 1)
            if after > c.limit:
                st.code = OVER_LIMIT
                overall = OVER_LIMIT
                if worst is None or reset > worst[0]:
                    worst = (reset, c)
        resp = rls_pb2.RateLimitResponse(overall_code=overall, statuses=statuses)
        if worst is not None:
            _fill_over_limit(resp, worst[1], now, worst[0])
        return resp


def _fill_over_limit(resp: rls_pb2.RateLimitResponse, c: _Counter, now: float, reset: float) -> None:
    """The 429 Envoy sends as a local reply: Anthropic error body plus retry headers."""
    retry_after = max(math.ceil(reset), 1)
    message = (
        f"Rate limit of {c.limit} requests per {UNIT_WORD[c.unit]} exceeded for this API key; "
        f"retry after {retry_after} seconds."
    )
    resp.raw_body = error_body("rate_limit_error", message)
    for k, v in (
        ("retry-after", str(retry_after)),
        ("content-type", "application/json"),
        ("anthropic-ratelimit-requests-limit", str(c.limit)),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-requests-reset", _rfc3339(now + reset)),
    ):
        resp.response_headers_to_add.append(base_pb2.HeaderValue(key=k, value=v))


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(  # noqa: N802 - gRPC method name
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        if not request.descriptors:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rate limit request has no descriptors")
        try:
            return await self.limiter.should_rate_limit(request)
        except (RedisError, OSError) as e:
            # Never a silent allow: Envoy runs with failure_mode_deny and turns this into an error reply.
            log.error("redis unavailable, refusing to decide: %s: %s", type(e).__name__, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit store (Redis) unavailable")
            raise  # unreachable: abort raises


def make_redis(url: str) -> aioredis.Redis:
    # Short timeouts and no client retries: Envoy's own deadline is tens of ms, and
    # re-sending a MULTI after a broken connection could count a request twice.
    # A blocking pool queues callers beyond its size instead of failing them.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=256, timeout=1.0, socket_timeout=1.0, socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


async def setup(
    server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime
) -> Callable[[], Awaitable[None]]:
    redis = make_redis(runtime.redis_url)
    try:
        await redis.ping()
    except (RedisError, OSError) as e:
        # Keep serving: requests fail UNAVAILABLE until Redis is back, and Envoy denies meanwhile.
        log.warning("redis at start-up not reachable (%s); will answer UNAVAILABLE until it is", e)
    limiter = RateLimiter(redis, config.limits.requests_per_minute)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)

    async def cleanup() -> None:
        await redis.aclose()
        await redis.connection_pool.disconnect()

    return cleanup
