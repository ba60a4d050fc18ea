"""The request-time rate limits and the budget reservation, decided inside extauth's Check.

With `limits.admission: extauth` (the default) Envoy makes one blocking call per request, this Check,
instead of three (ext_authz, ShouldRateLimit, and the spend filter's ShouldRateLimit): each grpcio call
costs ≈ 0.3–0.5 ms of server CPU and ≈ 1 ms at c=1 (docs/hot-path.md). Nothing is decided differently:

- the RateLimitRequests are the ones Envoy would have sent, built from the same action lists
  (router/rate_limits.py `request_time_requests`) on the facts this Check hands Envoy;
- they go through the rate limit service's own code on the same Redis: `decide_limits_async` (Decider and
  admission steps) then, when the limits allow, `decide_budgets_async` (SpendGate), both counted in
  ccr_ratelimit_decisions_total (ratelimit/service.py);
- the answer becomes what Envoy's rate limit filters made of it: on OK, x-ratelimit-* (from the
  descriptor statuses, as Envoy's DRAFT_VERSION_03 headers) and the service's headers on the reply
  (OkHttpResponse.response_headers_to_add); over a limit, the same 429 (402 for a budget) with the
  same body and headers; the store down, 503 where a limit or budget fails closed (admitted with
  services.failure_mode_allow, as Envoy's filters then are). The spend
  reservation's fields go to AUTHZ_NS (the audit receiver settles them from there), and a refusal names
  its outcome (AUTHZ_RATELIMIT_OUTCOME) so the audit row reads as before (flags RL / RLSE).

The limits' Redis call is awaited on the event loop (Deciders.acounters, a pipelined asyncio connection:
ratelimit/redis_pipe.py), and so is the budget reservation's (SpendGate.decide_async, on the same
connection): a blocking call held the whole loop for the round trip, 0.4–0.5 ms per request under load,
and Checks that overlap now share one connection (docs/hot-path.md). A rebuild of budget counters from the
ledger (after Redis lost its data) reads PostgreSQL in a thread.
Stream-end token charges stay with Envoy's rate limit filter and the rate limit service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from redis.exceptions import RedisError

from ccr.config import GatewayConfig
from ccr.contract import AUTHZ_ERROR_TYPE, AUTHZ_RATELIMIT_OUTCOME, SPEND_COUNTERS, SPEND_RESERVED
from ccr.errors import error_body
from ratelimit import spend
from ratelimit.service import Deciders, RedisDown, decide_budgets_async, decide_limits_async
from router.rate_limits import request_time_requests

log = logging.getLogger(__name__)

OK = rls_pb2.RateLimitResponse.OK
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
# What Envoy's local reply mapper says when the rate limit service fails (router/resources.py, RLSE).
UNAVAILABLE = "The gateway's rate limit service is unavailable; retry shortly."

# Envoy's x-ratelimit-* (DRAFT_VERSION_03): the window of each unit in seconds (0: not shown).
_Unit = rls_pb2.RateLimitResponse.RateLimit
_WINDOW = {_Unit.SECOND: 1, _Unit.MINUTE: 60, _Unit.HOUR: 3600, _Unit.DAY: 86400, _Unit.WEEK: 604800,
           _Unit.MONTH: 2592000, _Unit.YEAR: 31536000}


def x_ratelimit_headers(statuses) -> list[tuple[str, str]]:
    """x-ratelimit-limit/-remaining/-reset as Envoy's rate limit filter derives them from the statuses:
    the status with the least remaining (the first of equals), and every limit's quota policy."""
    best = None
    policy = ""
    for st in statuses:
        if not st.HasField("current_limit"):
            continue
        if best is None or st.limit_remaining < best.limit_remaining:
            best = st
        window = _WINDOW.get(st.current_limit.unit, 0)
        if window:
            policy += f", {st.current_limit.requests_per_unit};w={window}"
            if st.current_limit.name:
                policy += f';name="{st.current_limit.name}"'
    if best is None:
        return []
    return [("x-ratelimit-limit", f"{best.current_limit.requests_per_unit}{policy}"),
            ("x-ratelimit-remaining", str(best.limit_remaining)),
            ("x-ratelimit-reset", str(best.duration_until_reset.seconds))]


def _add_all(options, headers: list[tuple[str, str]]) -> None:
    """Appended in place (APPEND_IF_EXISTS_OR_ADD is the default action): cheaper than building each
    HeaderValueOption and copying it in (≈ 40 → 15 µs for six headers)."""
    add = options.add
    for k, v in headers:
        h = add().header
        h.key = k
        h.value = v


def _option(k: str, v: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_APPEND)


class InCheckAdmission:
    """The request-time limits and budgets of an allowed Check (limits.admission: extauth)."""

    def __init__(self, parts: Deciders, config: GatewayConfig) -> None:
        if parts.acounters is None:
            raise ValueError("the in-Check admission decides on the event loop: build its deciders with on_loop=True")
        self.parts = parts
        self.counters = parts.acounters
        self.config = config

    def use_config(self, config: GatewayConfig) -> None:
        self.config = config  # the Decider follows config versions itself (ratelimit/service.py deciders)

    async def admit(self, resp: pb.CheckResponse, endpoint: str, request_headers: Mapping[str, str]
                    ) -> pb.CheckResponse:
        """`resp`: this request's own OK CheckResponse (changed in place on an allow); the answer to send."""
        ok = resp.ok_response
        set_headers = {h.header.key: h.header.value for h in ok.headers}

        def header(name: str) -> str | None:
            v = set_headers.get(name)
            return v if v is not None else request_headers.get(name)

        fields = resp.dynamic_metadata.fields
        lreq, sreq = request_time_requests(self.config, endpoint, header, fields.get)
        added: list[tuple[str, str]] = []
        if lreq is not None:
            try:
                parts = self.parts
                lresp = await decide_limits_async(parts.decider, self.counters, parts.steps, lreq)
            except (RedisDown, RedisError, OSError) as e:
                if self.config.services.failure_mode_allow:  # as Envoy's filter without failure_mode_deny
                    log.error("redis unavailable; admitting undecided (services.failure_mode_allow): %s", e)
                    return resp
                log.error("redis unavailable, refusing to decide: %s: %s", type(e).__name__, e)
                return _refused(resp, 503, "error", error_body("api_error", UNAVAILABLE), [])
            added = x_ratelimit_headers(lresp.statuses)
            added += [(h.key, h.value) for h in lresp.response_headers_to_add]
            if lresp.overall_code != OK:
                return _refused(resp, 429, "over_limit", lresp.raw_body,
                                [*added, ("x-envoy-ratelimited", "true")])
        if sreq is not None:
            gate = self.parts.gate
            try:
                if gate is None:
                    raise spend.Unavailable("spend budgets are disabled (spend.enabled)")
                sresp = await decide_budgets_async(gate, self.counters.pipe, sreq)
            except (spend.Unavailable, ValueError) as e:
                if self.config.services.failure_mode_allow:
                    log.error("budgets could not be decided; admitting (services.failure_mode_allow): %s", e)
                    _add_all(ok.response_headers_to_add, added)
                    return resp
                log.error("budgets could not be decided, refusing: %s", e)
                return _refused(resp, 503, "error", error_body("api_error", UNAVAILABLE), added)
            if sresp.overall_code != OK:
                return _refused(resp, 402, "budget", sresp.raw_body,
                                [*added, *((h.key, h.value) for h in sresp.response_headers_to_add),
                                 ("x-envoy-ratelimited", "true")])
            added += [(h.key, h.value) for h in sresp.response_headers_to_add]
            md = sresp.dynamic_metadata.fields
            if SPEND_RESERVED in md:
                fields[SPEND_RESERVED].CopyFrom(md[SPEND_RESERVED])
                fields[SPEND_COUNTERS].CopyFrom(md[SPEND_COUNTERS])
        if added:
            _add_all(ok.response_headers_to_add, added)
        return resp


_ERROR_TYPE = {429: "rate_limit_error", 402: "billing_error", 503: "api_error"}
_GRPC = {429: code_pb2.RESOURCE_EXHAUSTED, 402: code_pb2.PERMISSION_DENIED, 503: code_pb2.UNAVAILABLE}


def _refused(allowed: pb.CheckResponse, status: int, outcome: str, body: bytes,
             headers: list[tuple[str, str]]) -> pb.CheckResponse:
    """The refusal Envoy's rate limit filter would have sent, carrying the allowed Check's facts (the audit
    row's principal, model, decision id) and the outcome."""
    meta = struct_pb2.Struct()
    meta.CopyFrom(allowed.dynamic_metadata)
    meta.fields[AUTHZ_ERROR_TYPE].string_value = _ERROR_TYPE[status]
    meta.fields[AUTHZ_RATELIMIT_OUTCOME].string_value = outcome
    # content-type once: the body's own (the services add theirs for Envoy's local reply, which replaces it).
    opts = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                                       append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]
    opts += [_option(k, v) for k, v in headers if k != "content-type"]
    return pb.CheckResponse(
        status=status_pb2.Status(code=_GRPC[status]),
        denied_response=pb.DeniedHttpResponse(status=http_status_pb2.HttpStatus(code=status), headers=opts,
                                              body=body.decode()),
        dynamic_metadata=meta,
    )


def maybe_admission(config: GatewayConfig, make: Callable[[], Deciders]) -> InCheckAdmission | None:
    """The in-Check admission when the config puts it there, else None (Envoy asks the rate limit service)."""
    if config.limits.admission != "extauth":
        return None
    return InCheckAdmission(make(), config)
