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

With `limits.admission: extauth` (the default) extauth makes those request-time decisions itself,
inside its Check: routes then carry only the stream-end entries, the spend filter is left out, and
extauth builds the very RateLimitRequests Envoy would have sent by evaluating these same action
lists (`request_time_requests`) on the facts it is about to hand Envoy. One table, two readers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import struct_pb2

from ccr.config import GatewayConfig, LimitScope
from ccr.contract import (
    AUTHZ_NS,
    AUTHZ_SPEND,
    H_PRINCIPAL_ID,
    H_REQUEST_ID,
    RL_DOMAIN,
    RL_FACTS,
    RL_PRINCIPAL_KEY,
    RL_REQUEST_ID_KEY,
    RL_SPEND_KEY,
    RL_USAGE_KEY,
    RL_USAGE_KINDS,
    SPEND_DOMAIN,
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


def in_extauth(config: GatewayConfig) -> bool:
    """Whether extauth decides the request-time limits and budgets (limits.admission)."""
    return config.limits.admission == "extauth"


def route_rate_limits(config: GatewayConfig, hits_format: str | None = None, usage: bool = True,
                      request_time: bool = True) -> list[Json]:
    """RateLimitPerRoute.rate_limits for an API route; `hits_format` counts a request as that many
    hits (a batch create: its request count). `request_time` False: only the stream-end entries."""
    hits: Json = {"hits_addend": {"format": hits_format}} if hits_format else {}
    out: list[Json] = [] if not request_time else [{
        "actions": [{"request_headers": {"header_name": H_PRINCIPAL_ID, "descriptor_key": RL_PRINCIPAL_KEY}}],
        # The principal's own requests-per-minute, decided by extauth.
        "limit": {"dynamic_metadata": {"metadata_key": {"key": AUTHZ_NS, "path": [{"key": "rpm"}]}}},
        **hits,
    }]
    facts = _facts_in_use(config)
    if request_time:
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
    """The rate limit filter's RateLimitPerRoute; with admission in extauth only the stream-end charges
    (nothing at all where there are none: the filter then makes no call)."""
    limits = route_rate_limits(config, hits_format, usage, request_time=not in_extauth(config))
    if not limits:
        return {}
    return {RATELIMIT_FILTER: {"@type": RATELIMIT_PER_ROUTE, "rate_limits": limits}}


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
    if not config.spend.enabled or endpoint not in SPEND_ENDPOINTS or in_extauth(config):
        return {}
    return {SPEND_FILTER: {"@type": RATELIMIT_PER_ROUTE, "rate_limits": spend_rate_limits()}}


# -- the same actions, evaluated in extauth (limits.admission: extauth) --------------------------

_UNITS = {"MINUTE": rls_pb2.RateLimitResponse.RateLimit.MINUTE}
_UNITS.update({name: value for name, value in rls_pb2.RateLimitResponse.RateLimit.Unit.items()})


def _entry(action: Json, header: Callable[[str], str | None],
           meta: Callable[[str], struct_pb2.Value | None]) -> tuple[str, str] | None | bool:
    """One action's descriptor entry as Envoy makes it: (key, value); None: the descriptor is dropped
    (Envoy sends none when a fact is absent); True: skipped (skip_if_absent)."""
    kind, body = next(iter(action.items()))
    if kind == "request_headers":
        v = header(body["header_name"])
        if v is None:
            return True if body.get("skip_if_absent") else None
        return body["descriptor_key"], v
    if kind == "metadata":
        (path,) = body["metadata_key"]["path"]
        value = meta(path["key"])
        if value is None or value.WhichOneof("kind") != "string_value" or not value.string_value:
            return True if body.get("skip_if_absent") else None
        return body["descriptor_key"], value.string_value
    if kind == "generic_key":
        return body["descriptor_key"], body["descriptor_value"]
    raise ValueError(f"rate limit action {kind!r} has no in-process reading; add it here")


def _format(fmt: str, header: Callable[[str], str | None]) -> int | None:
    """hits_addend's format: only `%REQ(h)%` is used at the request (router/object_routes.py)."""
    if not (fmt.startswith("%REQ(") and fmt.endswith(")%")):
        raise ValueError(f"hits_addend format {fmt!r} has no in-process reading")
    v = header(fmt[5:-2])
    return int(v) if v is not None and v.isdigit() else None


def descriptors(rate_limits: list[Json], header: Callable[[str], str | None],
                meta: Callable[[str], struct_pb2.Value | None]) -> list[ratelimit_pb2.RateLimitDescriptor]:
    """The request-time descriptors Envoy's rate limit filter builds from `rate_limits` (entries with
    apply_on_stream_done are the stream end's), reading the request's headers and AUTHZ_NS metadata."""
    out = []
    for rl in rate_limits:
        if rl.get("apply_on_stream_done"):
            continue
        d = ratelimit_pb2.RateLimitDescriptor()
        for action in rl["actions"]:
            e = _entry(action, header, meta)
            if e is None:
                break
            if e is not True:
                d.entries.add(key=e[0], value=e[1])  # type: ignore[index]
        else:
            if not d.entries:
                continue
            if "limit" in rl:  # the principal's own requests per minute (extauth's `rpm`)
                (path,) = rl["limit"]["dynamic_metadata"]["metadata_key"]["path"]
                v = meta(path["key"])
                if v is not None and v.WhichOneof("kind") == "struct_value":
                    f = v.struct_value.fields
                    d.limit.requests_per_unit = int(f["requests_per_unit"].number_value)
                    d.limit.unit = _UNITS[f["unit"].string_value]
            if "hits_addend" in rl:
                n = _format(rl["hits_addend"]["format"], header)
                if n is not None:
                    d.hits_addend.value = n
            out.append(d)
    return out


def request_time_requests(config: GatewayConfig, endpoint: str, header: Callable[[str], str | None],
                          meta: Callable[[str], struct_pb2.Value | None]
                          ) -> tuple[rls_pb2.RateLimitRequest | None, rls_pb2.RateLimitRequest | None]:
    """(the limits' request, the budgets' request): exactly what Envoy's two rate limit filters would
    send for this endpoint's route under `limits.admission: ratelimit`; None where it sends nothing."""
    from router.object_routes import hits_format

    limits = descriptors(route_rate_limits(config, hits_format(endpoint), usage=False), header, meta)
    lreq = rls_pb2.RateLimitRequest(domain=RL_DOMAIN, descriptors=limits) if limits else None
    sreq = None
    if config.spend.enabled and endpoint in SPEND_ENDPOINTS:
        spend = descriptors(spend_rate_limits(), header, meta)
        sreq = rls_pb2.RateLimitRequest(domain=SPEND_DOMAIN, descriptors=spend) if spend else None
    return lreq, sreq
