"""Route tweaks for Message Batches and Files (see extauth/objects.py and router/adapter/objects.py).

* Their routes keep `x-ccr-principal-id` on the way to the adapter, which records and
  filters objects by owner; the adapter removes every x-ccr-* before the provider.
* A batch create is charged one rate-limit hit per request it carries: extauth sets the
  count in `x-ccr-batch-requests` and the route's rate limit uses it as `hits_addend`.
* Endpoints decided without their body get one ext_authz check at the headers
  (router/downstream.py `authz_per_route`).
"""

from __future__ import annotations

from typing import Any

from ccr.contract import H_BATCH_REQUESTS, H_PRINCIPAL_ID, SET_HEADERS
from extauth.endpoints import Endpoint, Kind
from router.downstream import authz_per_route

Json = dict[str, Any]

OBJECT_KINDS = (Kind.BATCHES, Kind.FILES)
RATELIMIT_FILTER = "envoy.filters.http.ratelimit"
RATELIMIT_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"


def headers_to_remove(e: Endpoint) -> list[str]:
    if e.kind in OBJECT_KINDS:
        return [*(h for h in SET_HEADERS if h != H_PRINCIPAL_ID), H_BATCH_REQUESTS]
    return list(SET_HEADERS)


def per_filter_config(api_route: Json, e: Endpoint) -> Json:
    """typed_per_filter_config for the endpoint's route. Envoy applies `hits_addend` only to
    rate limits given to the filter itself (RateLimitPerRoute), not to the route's own list."""
    authz = authz_per_route(e)
    if e.name != "batches.create":
        return authz
    # The filter's own rate limits have no stage (the filter's stage, 0, applies).
    limits = [{**{k: v for k, v in rl.items() if k != "stage"},
               "hits_addend": {"format": f"%REQ({H_BATCH_REQUESTS})%"}}
              for rl in api_route.get("rate_limits", ()) if rl.get("stage", 0) == 0]  # not the spend stage
    return {**authz, RATELIMIT_FILTER: {"@type": RATELIMIT_PER_ROUTE, "rate_limits": limits}}
