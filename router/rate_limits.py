"""The rate limits an API route sends to the ratelimit service (docs/ratelimit.md).

All given to the filter itself (RateLimitPerRoute): Envoy applies `hits_addend` and
`apply_on_stream_done` only there, and ignores the route's own list once that is set.

At the request (stage 0, one ShouldRateLimit call with every descriptor):
- [principal=<id>] with the principal's own limit (extauth's `rpm` metadata) as the override;
- one descriptor per fact extauth knows ([key_id=..], [user=..], [groups=a,b], [tenant=..],
  [spiffe_id=..], [model=..]), read from ext_authz's dynamic metadata, never from a header a
  client could send; Envoy leaves a descriptor out when its fact is absent. Only the facts some
  limit uses are sent (all of them when envoyproxy YAML rules are configured).
At stream end (apply_on_stream_done, when a token limit exists): one descriptor per kind of
token, [ccr_usage=<kind>, principal, facts...], hits_addend = the metered count (ccr.usage).

Spend budgets (issue 8, docs/spend.md) are asked by a second rate limit filter (SPEND_FILTER, domain
SPEND_DOMAIN, stage SPEND_STAGE): its own RateLimitPerRoute, on the endpoints extauth prices
(SPEND_ENDPOINTS), sends [spend=<AUTHZ_SPEND>, request_id=<x-request-id>] after the limits allowed
the request. No AUTHZ_SPEND (no budget applies): no descriptor, no call.
"""

from __future__ import annotations

from typing import Any

from ccr.config import GatewayConfig, LimitScope
from ccr.contract import (
    AUTHZ_NS,
    AUTHZ_SPEND,
    H_PRINCIPAL_ID,
    H_REQUEST_ID,
    RL_FACTS,
    RL_PRINCIPAL_KEY,
    RL_REQUEST_ID_KEY,
    RL_SPEND_KEY,
    RL_USAGE_KEY,
    RL_USAGE_KINDS,
    USAGE_NS,
)
from extauth.spend import BATCH_CREATE, CHARGED_ENDPOINTS, RESERVED_ENDPOINTS

Json = dict[str, Any]

RATELIMIT_FILTER = "envoy.filters.http.ratelimit"
RATELIMIT_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
SPEND_FILTER = "ccr.spend"  # the budgets' rate limit filter (router/resources.py spend_filter)
# The endpoints extauth sets AUTHZ_SPEND on (extauth/spend.py): only their routes ask the budgets.
SPEND_ENDPOINTS = RESERVED_ENDPOINTS | CHARGED_ENDPOINTS | {BATCH_CREATE}

# Descriptor key -> the scope of ccr's rules it feeds (docs/ratelimit.md).
_SCOPE: dict[str, LimitScope] = {"key_id": LimitScope.KEY, "user": LimitScope.USER, "groups": LimitScope.GROUP,
                                 "tenant": LimitScope.TENANT, "spiffe_id": LimitScope.SPIFFE_ID,
                                 "model": LimitScope.MODEL}


def _fact(descriptor_key: str, metadata_key: str, skip_if_absent: bool = False) -> Json:
    return {"metadata": {"descriptor_key": descriptor_key, "source": "DYNAMIC", "skip_if_absent": skip_if_absent,
                         "metadata_key": {"key": AUTHZ_NS, "path": [{"key": metadata_key}]}}}


def _facts_in_use(config: GatewayConfig) -> list[tuple[str, str]]:
    if config.limits.envoy_config_dir is not None:
        return list(RL_FACTS)
    scopes = {r.per for r in config.limits.rules}
    return [(d, m) for d, m in RL_FACTS if _SCOPE[d] in scopes]


def route_rate_limits(config: GatewayConfig, hits_format: str | None = None, usage: bool = True) -> list[Json]:
    """RateLimitPerRoute.rate_limits for an API route; `hits_format` counts a request as that many
    hits (a batch create: its request count)."""
    hits: Json = {"hits_addend": {"format": hits_format}} if hits_format else {}
    out: list[Json] = [{
        "actions": [{"request_headers": {"header_name": H_PRINCIPAL_ID, "descriptor_key": RL_PRINCIPAL_KEY}}],
        # The principal's own requests-per-minute, decided by extauth.
        "limit": {"dynamic_metadata": {"metadata_key": {"key": AUTHZ_NS, "path": [{"key": "rpm"}]}}},
        **hits,
    }]
    facts = _facts_in_use(config)
    out += [{"actions": [_fact(d, m)], **hits} for d, m in facts]
    if usage and any(r.metric == "tokens" for r in config.limits.rules):
        entries = [_fact(RL_PRINCIPAL_KEY, "principal_id"), *(_fact(d, m, skip_if_absent=True) for d, m in facts)]
        out += [{
            "actions": [{"generic_key": {"descriptor_key": RL_USAGE_KEY, "descriptor_value": kind}}, *entries],
            "apply_on_stream_done": True,
            "hits_addend": {"format": f"%DYNAMIC_METADATA({USAGE_NS}:{field})%"},
        } for kind, field in RL_USAGE_KINDS]
    return out


def rate_limit_per_route(config: GatewayConfig, hits_format: str | None = None, usage: bool = True) -> Json:
    return {RATELIMIT_FILTER: {"@type": RATELIMIT_PER_ROUTE,
                               "rate_limits": route_rate_limits(config, hits_format, usage)}}


def spend_rate_limits() -> list[Json]:
    """The spend descriptor (ratelimit/spend.py): extauth's worst case and budget subjects, with the
    gateway's request id to settle by. AUTHZ_SPEND absent: Envoy leaves the descriptor out (no call)."""
    return [{"actions": [
        {"metadata": {"descriptor_key": RL_SPEND_KEY, "source": "DYNAMIC",
                      "metadata_key": {"key": AUTHZ_NS, "path": [{"key": AUTHZ_SPEND}]}}},
        {"request_headers": {"header_name": H_REQUEST_ID, "descriptor_key": RL_REQUEST_ID_KEY}},
    ]}]


def spend_per_route(config: GatewayConfig, endpoint: str) -> Json:
    """The spend filter's RateLimitPerRoute for an endpoint's route; nothing where no budget is asked
    (spend off, or an endpoint extauth does not price)."""
    if not config.spend.enabled or endpoint not in SPEND_ENDPOINTS:
        return {}
    return {SPEND_FILTER: {"@type": RATELIMIT_PER_ROUTE, "rate_limits": spend_rate_limits()}}
