"""What a decision tells the client: the remaining-quota headers and the 429 body.

Envoy adds `x-ratelimit-limit/-remaining/-reset` itself from the descriptor statuses
(enable_x_ratelimit_headers: DRAFT_VERSION_03); the service adds the Anthropic family through
`response_headers_to_add`, which Envoy puts on the reply whether it is the provider's or the 429.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime

from ccr.errors import error_body

H_RETRY_AFTER = "retry-after"
# anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}: the tightest limit of each metric.
ANTHROPIC_PREFIX = "anthropic-ratelimit-"


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=4096)
def quota_headers(metric: str, limit: int, remaining: int, reset_at_s: int) -> tuple[tuple[str, str], ...]:
    # Memoised: at most one distinct triple per limit and second.
    p = f"{ANTHROPIC_PREFIX}{metric}-"
    return ((p + "limit", str(limit)), (p + "remaining", str(remaining)), (p + "reset", rfc3339(reset_at_s)))


@functools.lru_cache(maxsize=1024)
def over_limit_reply(name: str, about: str, amount: int, metric: str, unit: str, retry_after: int,
                     reset_at_s: int) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The Anthropic-shaped 429 body naming the limit and its reset, and its own headers."""
    what = f"Rate limit '{name}'" if name else "Rate limit"
    noun = metric.removesuffix("s") if amount == 1 else metric
    message = (f"{what} of {amount} {noun} per {unit} exceeded for {about}; "
               f"resets at {rfc3339(reset_at_s)}, retry after {retry_after} seconds.")
    return error_body("rate_limit_error", message), (
        (H_RETRY_AFTER, str(retry_after)),
        ("content-type", "application/json"),
    )


def seconds(ms: int) -> int:
    """Whole seconds, rounded up, at least 1 (what retry-after and duration_until_reset carry)."""
    return max(math.ceil(ms / 1000), 1)
