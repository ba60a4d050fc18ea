"""Steps that run after the rate limits allowed a request, in the same call (spend budgets have their own).

`admission_steps` is the one place the ratelimit service asks for them (ratelimit/service.py
`setup`); a module adds its step to the list it returns. Each step sees the request's
descriptors (the request-time ones, and at stream end the `ccr_usage` ones carrying metered
token counts, to settle a reservation) and the response the limits built.
"""

from __future__ import annotations

from typing import Protocol

import redis
from envoy.service.ratelimit.v3 import rls_pb2

from ccr.config import GatewayConfig
from ccr.runtime import Runtime


class AdmissionStep(Protocol):
    """Runs after the rate limits allowed a request (never when they refused it).

    It may refuse by setting `response.overall_code = OVER_LIMIT` with its own `raw_body` and
    `response_headers_to_add` (an Anthropic-shaped body: ccr/errors.py), and may add headers to an
    allowed response. Envoy ignores the answer to the stream-end call. An exception from it
    fails the call (UNAVAILABLE for RedisError/OSError, which Envoy turns into a 503).
    A step that makes its own Redis call adds a round trip to the decision.
    """

    def admit(self, request: rls_pb2.RateLimitRequest, response: rls_pb2.RateLimitResponse) -> None: ...


def admission_steps(config: GatewayConfig, runtime: Runtime, client: redis.Redis) -> list[AdmissionStep]:
    """The steps in order; none yet. Spend budgets are decided in their own call (domain
    SPEND_DOMAIN, from their own filter: ratelimit/spend.py), so a budget refusal has its own
    status (402) and a budget is asked only after the limits allowed the request."""
    return []
