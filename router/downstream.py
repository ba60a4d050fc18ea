"""What one client connection may hold before it is authenticated or cut off.

Two parts of the listener, kept out of router/resources.py so they read on their own:

- connection limits: header timeout, idle timeout, header count, HTTP/2 streams and
  windows, the per-connection buffer;
- identity first: a headers-only ext_authz check that runs before the body-buffering one
  on requests whose body may be large, so a stranger's 60 MB upload is refused after its
  headers instead of being buffered whole first;
- per endpoint: only the endpoints decided on their body have it buffered for ext_authz;
  every other one gets a single check at its headers.
"""

from __future__ import annotations

from typing import Any

# Message types named by the dicts below, registered for router/xds.py's JSON -> proto conversion.
from envoy.extensions.common.matching.v3 import extension_matcher_pb2 as _matcher  # noqa: F401
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2 as _skip  # noqa: F401
from envoy.type.matcher.v3 import http_inputs_pb2 as _inputs  # noqa: F401

from ccr.config import DownstreamSettings, GatewayConfig
from ccr.contract import AUTHZ_HTTP_IDENTITY_PREFIX, AUTHZ_PHASE_IDENTITY, AUTHZ_PHASE_MD, CCR_HEADER_PREFIX
from ccr.errors import error_body
from extauth.endpoints import ENDPOINTS, Endpoint
from router.authz_http import ext_authz_fields

T = "type.googleapis.com/"
Json = dict[str, Any]

IDENTITY_FIRST = "ccr.identity_first"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
# Stats of the headers-only check: http.<hcm prefix>.ext_authz.identity.{ok,denied,error}.
IDENTITY_STAT_PREFIX = "identity"


def _secs(s: float) -> str:
    return f"{s:.3f}s"


def connection_limits(d: DownstreamSettings) -> Json:
    """HttpConnectionManager fields bounding a client connection's time and memory."""
    return {
        # Slow loris: headers must be complete in this time, or the connection is closed.
        "request_headers_timeout": _secs(d.request_headers_timeout_s),
        "common_http_protocol_options": {
            "idle_timeout": _secs(d.idle_timeout_s),
            "max_requests_per_connection": d.max_requests_per_connection,
            "max_headers_count": d.max_headers_count,
        },
        # A window is data the peer may send before Envoy reads it: keep it to the buffer size
        # so HTTP/2 cannot push more unread bytes than HTTP/1.1 can.
        "http2_protocol_options": {
            "max_concurrent_streams": d.max_concurrent_streams,
            "initial_stream_window_size": max(65535, d.per_connection_buffer_bytes),
            "initial_connection_window_size": max(65535, d.per_connection_buffer_bytes),
        },
    }


def below_regex(n: int) -> str:
    """A regex (RE2 and Python `re` alike) matching exactly the decimal integers 0..n-1.

    Written without leading zeros: "007" does not match, so an odd spelling of a length
    counts as large (checked first), never as small.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    s = str(n)
    k = len(s)
    alternatives = ["0"]
    if k >= 2:
        alternatives.append(f"[1-9][0-9]{{0,{k - 2}}}")  # fewer digits than n
    for i, c in enumerate(s):  # as many digits: same prefix, then a smaller digit, then anything
        low = 1 if i == 0 else 0
        if int(c) > low:
            alternatives.append(f"{s[:i]}[{low}-{int(c) - 1}][0-9]{{{k - i - 1}}}")
    return "^(?:" + "|".join(alternatives) + ")$"


# With replicas (`ccr serve`), a unary decision call (ext_authz Check, ShouldRateLimit) that could
# not reach a replica, or whose replica went away mid-call, is tried again on another one: a
# replica stopping must not fail requests. Not with one local replica (`ccr up`): there is nothing
# to retry onto, and Envoy keeps a copy of each CheckRequest (the whole body) for a retry, which
# under heap pressure turns the overload manager's clean 500 into a 503. Streams (the access log,
# the adapter) are never retried by Envoy.
def decision_retry(timeout_s: float) -> Json:
    """The GrpcService retry policy of a decision call whose whole timeout is `timeout_s`.

    Envoy turns a GrpcService (core) retry policy into a route retry policy whose per-try timeout
    is the back-off's max_interval (Http::Utility::convertCoreToRouteRetryPolicy). With 50 ms
    there, every Check or ShouldRateLimit slower than 50 ms (any, on a loaded host) was cut off,
    retried, and counted against its replica as a local-origin failure; outlier detection then
    ejected the live replica, and with the other one dead every decision failed (the flaky
    standalone test: 73 rate limit 503s). So max_interval is the call's own timeout: an attempt is
    never cut short, retries are for connection failures and resets only, and the jittered back-off
    of two retries from a 5 ms base stays under 20 ms whatever the max."""
    return {
        "retry_on": "connect-failure,reset,refused-stream,unavailable",
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": _secs(timeout_s)},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
    }


def upstream_hygiene() -> list[Json]:
    """Request mutations every upstream attempt starts with: no client credential and no x-ccr-*
    header reaches a provider (the attempt's own credential is injected after this), and replies come
    uncompressed so the usage meter can read them. A fresh list: callers may append their own."""
    return [
        {"remove": "authorization"},
        {"remove": "x-api-key"},
        {"remove_on_match": {"key_matcher": {"prefix": CCR_HEADER_PREFIX}}},
        {"append": {"header": {"key": "accept-encoding", "value": "identity"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
    ]


def identity_first_filter(config: GatewayConfig, ext_authz_cluster: str, timeout_s: float,
                          retry: bool = False) -> Json:
    """A headers-only ext_authz check, skipped when Content-Length says the body is small.

    It runs when Content-Length is at least `identity_first_body_bytes`, or absent (chunked
    uploads, HTTP/2, and GETs, which then cost two checks). Until it answers, Envoy reads at
    most the per-connection buffer of the body. extauth knows the phase from the gRPC
    metadata this filter sends (only Envoy talks to extauth) and checks identity only; the
    body-buffering check after it still decides everything (policy, model, routing).
    """
    if config.services.authz_transport == "http":  # the phase is told by the path prefix
        transport = ext_authz_fields(config, AUTHZ_HTTP_IDENTITY_PREFIX, _secs(timeout_s), retry)
    else:
        transport = {"transport_api_version": "V3", "grpc_service": {
            "envoy_grpc": {"cluster_name": ext_authz_cluster},
            "timeout": _secs(timeout_s),
            "initial_metadata": [{"key": AUTHZ_PHASE_MD, "value": AUTHZ_PHASE_IDENTITY}],
            **({"retry_policy": decision_retry(timeout_s)} if retry else {}),
        }}
    authz: Json = {
        "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        **transport,
        "failure_mode_allow": config.services.failure_mode_allow,
        "status_on_error": {"code": 503},
        "stat_prefix": IDENTITY_STAT_PREFIX,
    }
    small_body = {"single_predicate": {
        "input": {"name": "content-length", "typed_config": {
            "@type": T + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": "content-length"}},
        "value_match": {"safe_regex": {"google_re2": {},
                                        "regex": below_regex(config.gateway.downstream.identity_first_body_bytes)}},
    }}
    skip = {"action": {"name": "skip", "typed_config": {
        "@type": T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}}
    return {"name": IDENTITY_FIRST, "typed_config": {
        "@type": T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extension_config": {"name": "envoy.filters.http.ext_authz", "typed_config": authz},
        "xds_matcher": {"matcher_list": {"matchers": [{"predicate": small_body, "on_match": skip}]}},
    }}


# The endpoints whose decision reads the request body: a Messages body names the model and may
# reference files (extauth/server.py), a batch create carries the requests it is charged and
# checked for (extauth/objects.py). Every other endpoint is decided on method, path and credential.
BODY_DECIDED: frozenset[str] = frozenset({e.name for e in ENDPOINTS if e.model_in_body or e.model_in_path}
                                           | {"batches.create"})
# Decided on headers, but still buffered: that buffering is what answers an upload larger than
# gateway.max_request_bytes with 413 (a streamed body is bounded by nothing else).
BOUNDED_BY_BUFFERING: frozenset[str] = frozenset({"files.upload"})


def authz_per_route(e: Endpoint) -> Json:
    """typed_per_filter_config for an endpoint decided without its body: one check, at its headers.

    These requests carry no body (GETs, DELETEs, a batch cancel): the full check is sent as
    soon as the headers are in, so the identity-first check before it would only ask the same
    question twice (without a Content-Length, each of them paid both). A body sent anyway is
    never buffered for the check: a stranger's is refused at its headers.
    """
    if e.name in BODY_DECIDED | BOUNDED_BY_BUFFERING:
        return {}
    return {
        EXT_AUTHZ_FILTER: {"@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                           "check_settings": {"disable_request_body_buffering": True}},
        IDENTITY_FIRST: {"@type": T + "envoy.config.route.v3.FilterConfig", "disabled": True},
    }


def _reply(filter_: Json, status: int, kind: str, message: str) -> Json:
    # Envoy's local-reply formatter fills %...% operators; the messages have none.
    return {"filter": filter_, "status_code": status, "body_format_override": {
        "text_format_source": {"inline_string": error_body(kind, message).decode()},
        "content_type": "application/json"}}


def _status(code: int) -> Json:
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
        "default_value": code, "runtime_key": f"ccr.local_reply.{code}"}}}}


OVERLOADED = "The gateway is overloaded (memory); retry shortly."


def local_reply_mappers() -> list[Json]:
    """Anthropic-shaped bodies for the refusals these limits cause inside Envoy."""
    return [
        # Overload manager (stop_accepting_requests, reset_high_memory_stream): 529 is what the
        # Anthropic API and SDKs use for "overloaded, retry later".
        _reply({"response_flag_filter": {"flags": ["OM"]}}, 529, "overloaded_error", OVERLOADED),
        _reply(_status(408), 408, "invalid_request_error",
            "Request headers were not received in time (gateway.downstream.request_headers_timeout_s)."),
    ]


def fallback_reply_mappers() -> list[Json]:
    """Last in the mapper list: replies no more specific mapper claimed."""
    return [
        # An HTTP/1.1 upload cut by the http1_server_abort_dispatch load-shed point: the codec's
        # 500 carries no response flag yet when it is mapped.
        _reply(_status(500), 500, "api_error", "The gateway is overloaded (memory) or failed internally; "
               "retry shortly."),
    ]
