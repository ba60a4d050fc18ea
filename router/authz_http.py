"""Envoy's side of ext_authz over HTTP/1.1 (`services.authz_transport: http`; docs/hot-path.md).

extauth's HTTP front (extauth/http_front.py) answers the same checks as its gRPC Check, at a fraction
of the per-call cost. What gRPC carries in typed fields travels here in headers, so Envoy needs:

- the check request: every client header, plus the peer facts Envoy alone knows (its own values,
  after every client x-ccr-* was stripped by the listener);
- allow-lists of the answer's headers (Envoy copies only listed names: a list matching everything
  would also copy the answer's own content-length and host onto the provider request);
- header_to_metadata filters that turn the answer's x-ccr-md-* headers back into typed AUTHZ_NS
  metadata, on an allow (request rules, after ext_authz) and on a refusal (response rules, before the
  authorization filters, which a local reply passes on its way out), removing the headers;
- local reply mappers that turn the stand-in statuses of refusals an HTTP answer cannot carry (200,
  5xx) back into the real ones (AUTHZ_HTTP_STATUS_STANDINS);
- an HTTP/1.1 cluster to the front, mTLS with Envoy's SVID when SPIFFE is on.
"""

from __future__ import annotations

from typing import Any

from ccr.config import GatewayConfig
from ccr.contract import (
    AUTHZ_HTTP_CLIENT_HEADER_PREFIXES,
    AUTHZ_HTTP_CLIENT_HEADERS,
    AUTHZ_HTTP_HEALTH_PATH,
    AUTHZ_HTTP_MD_KEYS,
    AUTHZ_HTTP_STATUS_STANDINS,
    AUTHZ_NS,
    CCR_HEADER_PREFIX,
    H_AUTHZ_BODY_CAPTURE,
    H_AUTHZ_CONTENT_LENGTH,
    H_AUTHZ_HEADERS_TO_REMOVE,
    H_AUTHZ_MD_PREFIX,
    H_AUTHZ_PEER_ADDRESS,
    H_AUTHZ_PEER_CERT,
    H_AUTHZ_PEER_URI,
    H_AUTHZ_PROTOCOL,
    authz_md_header,
)
from router.replicas import lb_endpoints, replica_checks

Json = dict[str, Any]
T = "type.googleapis.com/"
CLUSTER = "ccr_extauth_http"
H2M = T + "envoy.extensions.filters.http.header_to_metadata.v3.Config"
# A server_uri needs a URI; Envoy sends the check to `cluster`, and this names the Host it sends.
_URI = "http://extauth"
# Envoy's own facts about the downstream connection, which a gRPC CheckRequest carries in `source`.
# The client's own Content-Length and protocol complete the CheckRequest's http facts (the check's own
# Content-Length is Envoy's).
PEER_HEADERS = (
    (H_AUTHZ_PEER_ADDRESS, "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
    (H_AUTHZ_PEER_URI, "%DOWNSTREAM_PEER_URI_SAN%"),
    (H_AUTHZ_PEER_CERT, "%DOWNSTREAM_PEER_CERT%"),
    (H_AUTHZ_CONTENT_LENGTH, "%REQ(content-length)%"),
    (H_AUTHZ_PROTOCOL, "%PROTOCOL%"),
)


def md_keys(config: GatewayConfig) -> tuple[str, ...]:
    """Every AUTHZ_NS key an answer may carry: the gateway's own and those the policy declared."""
    return AUTHZ_HTTP_MD_KEYS + tuple(k for k in config.policy.result_names.metadata if k not in AUTHZ_HTTP_MD_KEYS)


def _exact(names: list[str] | tuple[str, ...]) -> list[Json]:
    return [{"exact": n} for n in names]


def _prefixes(prefixes: tuple[str, ...]) -> list[Json]:
    return [{"prefix": p} for p in prefixes]


def check_retry(timeout_s: str) -> Json:
    """The HttpService retry policy of a check whose whole timeout is `timeout_s`, with replicas (`ccr serve`).

    A replica that stops (SIGTERM) first answers 503 to its health checks, then closes its idle
    connections and answers each check in flight with `Connection: close`. A check Envoy writes on a
    pooled connection just as the replica closes it is reset before any answer: retried on another
    replica (previous_hosts), it costs the client nothing; so does a check sent to a replica that was
    killed before a health check noticed (connect-failure). Only connection failures and resets are
    retried, never an answer: a 5xx answer is extauth failing, and a check charges limits (a check reset
    after its replica decided, a replica killed mid-check, may be charged twice: the gRPC calls' trade
    too). As with the gRPC decision calls (router/downstream.py decision_retry), Envoy
    makes the back-off's max_interval the per-try timeout, so it is the check's own timeout: an attempt
    is never cut short (and its replica never counted as failing because the host was slow)."""
    return {
        "retry_on": "connect-failure,reset",
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": timeout_s},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
    }


def http_service(config: GatewayConfig, path_prefix: str, timeout_s: str, retry: bool = False) -> Json:
    """`retry`: extauth runs as replicas (`ccr serve`): a check that loses its connection goes to another."""
    names = config.policy.result_names
    client = _exact(AUTHZ_HTTP_CLIENT_HEADERS) + _prefixes(AUTHZ_HTTP_CLIENT_HEADER_PREFIXES)
    return {
        "server_uri": {"uri": _URI, "cluster": CLUSTER, "timeout": timeout_s},
        **({"retry_policy": check_retry(timeout_s)} if retry else {}),
        "path_prefix": path_prefix,
        "authorization_request": {
            "headers_to_add": [{"key": k, "value": v} for k, v in PEER_HEADERS],
        },
        "authorization_response": {
            # The request headers extauth sets (x-ccr-*, the metadata headers among them) and the policy's.
            "allowed_upstream_headers": {"patterns": [{"prefix": CCR_HEADER_PREFIX}, *_exact(names.headers)]},
            # A refusal's headers for the client, and its metadata headers (read and removed on the way out).
            "allowed_client_headers": {"patterns": [*client, {"prefix": H_AUTHZ_MD_PREFIX},
                                                    *_exact(names.headers), *_exact(names.response_headers)]},
            "allowed_client_headers_on_success": {"patterns": [*client, *_exact(names.response_headers)]},
            # The body capture, as a string under this name (the audit receiver decodes it).
            "dynamic_metadata_from_headers": {"patterns": [{"exact": H_AUTHZ_BODY_CAPTURE}]},
        },
    }


def ext_authz_fields(config: GatewayConfig, path_prefix: str, timeout_s: str, retry: bool = False) -> Json:
    """The ExtAuthz fields that pick this transport (instead of grpc_service and transport_api_version)."""
    return {
        "http_service": http_service(config, path_prefix, timeout_s, retry),
        # Every client header, as a gRPC CheckRequest carries them (policies may read any).
        "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
    }


def _rule(key: str, remove: bool = True) -> Json:
    return {"header": authz_md_header(key), "remove": remove, "on_header_present": {
        "metadata_namespace": AUTHZ_NS, "key": key, "type": "PROTOBUF_VALUE", "encode": "BASE64"}}


def allow_metadata_filter(config: GatewayConfig) -> Json:
    """After ext_authz: an allow's metadata headers (now request headers) into AUTHZ_NS, typed."""
    return {"name": "ccr.authz_metadata", "typed_config": {
        "@type": H2M, "request_rules": [_rule(k) for k in md_keys(config)]}}


def refusal_metadata_filter(config: GatewayConfig) -> Json:
    """First in the chain: a refusal's metadata headers (in the local reply) into AUTHZ_NS, typed.

    Upstream replies pass this filter too: the route configuration removes these names from them
    (`upstream_response_headers_to_remove`), so a provider cannot write the audit row's facts."""
    return {"name": "ccr.authz_refusal_metadata", "typed_config": {
        "@type": H2M, "response_rules": [_rule(k) for k in md_keys(config)]}}


def upstream_response_headers_to_remove(config: GatewayConfig) -> list[str]:
    return [authz_md_header(k) for k in md_keys(config)]


def status_mappers() -> list[Json]:
    """Local reply mappers: an ext_authz refusal's stand-in status back to the real one."""
    return [{"filter": {"and_filter": {"filters": [
        {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": standin, "runtime_key": f"ccr.authz_http.standin_{standin}"}}}},
        {"response_flag_filter": {"flags": ["UAEX"]}},
    ]}}, "status_code": real} for real, standin in AUTHZ_HTTP_STATUS_STANDINS.items()]


def health_check() -> Json:
    """The front's own health answer (AUTHZ_HTTP_HEALTH_PATH): 200 while it serves, 503 from the moment its
    process begins to drain, so Envoy stops sending it checks before it stops taking them."""
    return {"path": AUTHZ_HTTP_HEALTH_PATH, "host": _URI.removeprefix("http://")}


def cluster(config: GatewayConfig, addresses: list[str], transport_socket: Json | None,
            replicas: bool = False) -> Json:
    """HTTP/1.1 to extauth's front(s): one host:port per replica, or DNS names (STRICT_DNS). Its answers
    may carry a request body for the audit (body capture, base64 in a metadata header), so the response
    header limit follows audit.body_max_bytes. `replicas` (`ccr serve`): health-checked and
    outlier-ejected as the gRPC services' replicas are (router/replicas.py replica_checks)."""
    kind, eps = lb_endpoints(addresses)
    headers_kb = min(8192, max(96, (config.audit.body_max_bytes * 4 // 3) // 1024 + 64))
    out: Json = {
        "name": CLUSTER,
        "type": kind,
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": config.gateway.max_request_bytes,
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": eps}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_response_headers_kb": headers_kb},
            "explicit_http_config": {"http_protocol_options": {}},
        }},
    }
    # HTTP/1.1 carries one check per connection at a time: Envoy's default of 1024 connections would refuse
    # checks beyond 1024 in flight (the listener's own limits bound them instead).
    limits: Json = {"max_connections": 65536, "max_pending_requests": 65536, "max_requests": 65536}
    if transport_socket is not None:
        out["transport_socket"] = transport_socket
    if replicas:
        replica_checks(out, {"http_health_check": health_check()})
        # (replica_checks' reason: every check in flight to a replica that dies is retried at once.)
        limits["max_retries"] = out["circuit_breakers"]["thresholds"][0]["max_retries"]
    out["circuit_breakers"] = {"thresholds": [limits]}
    return out


# Envoy names this header itself; listed so its use is visible next to the others.
HEADERS_TO_REMOVE = H_AUTHZ_HEADERS_TO_REMOVE
