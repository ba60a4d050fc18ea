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

from ccr.config import GatewayConfig
from ccr.contract import H_BATCH_REQUESTS, H_PRINCIPAL_ID, SET_HEADERS
from extauth.endpoints import Endpoint, Kind
from router.downstream import authz_per_route
from router.rate_limits import rate_limit_per_route, spend_per_route

Json = dict[str, Any]

OBJECT_KINDS = (Kind.BATCHES, Kind.FILES)
METERED_ENDPOINT = "messages.create"


def headers_to_remove(e: Endpoint) -> list[str]:
    if e.kind in OBJECT_KINDS:
        return [*(h for h in SET_HEADERS if h != H_PRINCIPAL_ID), H_BATCH_REQUESTS]
    return list(SET_HEADERS)


def hits_format(endpoint: str) -> str | None:
    """A batch create counts one hit per request it carries (the header extauth sets)."""
    return f"%REQ({H_BATCH_REQUESTS})%" if endpoint == "batches.create" else None


def per_filter_config(config: GatewayConfig, e: Endpoint) -> Json:
    """typed_per_filter_config for the endpoint's route: its ext_authz settings and its rate limits
    (router/rate_limits.py), given to the filter because Envoy applies `hits_addend` only there."""
    authz = authz_per_route(e)
    hits = hits_format(e.name)
    # Only Messages replies carry billable usage; the others would make a stream-end call for nothing.
    # The spend filter has its own list, on the endpoints extauth prices (not batch creates).
    return {**authz, **rate_limit_per_route(config, hits, usage=e.name == METERED_ENDPOINT),
            **spend_per_route(config, e.name)}
