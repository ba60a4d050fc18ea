"""Route tweaks for Message Batches and Files (see extauth/objects.py and router/adapter/objects.py).

* Their routes keep `x-ccr-principal-id` on the way to the adapter, which records and
  filters objects by owner; the adapter removes every x-ccr-* before the provider.
* A batch create is charged one rate-limit hit per request it carries: extauth puts the
  count in its dynamic metadata and the route's rate limit uses it as `hits_addend`.
"""

from __future__ import annotations

from typing import Any

from ccr.contract import AUTHZ_BATCH_REQUESTS, AUTHZ_NS, H_PRINCIPAL_ID, SET_HEADERS
from extauth.endpoints import Endpoint, Kind

Json = dict[str, Any]

OBJECT_KINDS = (Kind.BATCHES, Kind.FILES)


def headers_to_remove(e: Endpoint) -> list[str]:
    if e.kind in OBJECT_KINDS:
        return [h for h in SET_HEADERS if h != H_PRINCIPAL_ID]
    return list(SET_HEADERS)


def endpoint_route(api_route: Json, e: Endpoint) -> Json:
    if e.name != "batches.create":
        return api_route
    limits = [{**rl, "hits_addend": {"format": f"%DYNAMIC_METADATA({AUTHZ_NS}:{AUTHZ_BATCH_REQUESTS})%"}}
              for rl in api_route.get("rate_limits", ())]
    return {**api_route, "rate_limits": limits}
