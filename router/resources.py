"""Envoy resources (listener, routes, clusters) generated from the gateway config.

Written as plain dicts in Envoy's own JSON/YAML shape so that they read like the
Envoy docs; router/xds.py turns them into typed protobufs for ADS, and the
validate path embeds the same dicts in a static bootstrap for `envoy --mode validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi

from ccr.config import GatewayConfig, Provider
from ccr.contract import (
    ADAPTER_PROVIDER_MD,
    AUTHZ_NS,
    H_CLUSTER,
    H_PRINCIPAL_ID,
    RL_DOMAIN,
    RL_PRINCIPAL_KEY,
    SET_HEADERS,
    USAGE_NS,
)
from ccr.errors import error_body
from ccr.runtime import Runtime
from router.downstream import (
    connection_limits,
    fallback_reply_mappers,
    identity_first_filter,
    local_reply_mappers,
)

LISTENER = "ccr_http"
ROUTES = "ccr_routes"
EXTAUTH, RATELIMIT, ADAPTER, ACCESSLOG = "ccr_extauth", "ccr_ratelimit", "ccr_adapter", "ccr_accesslog"

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTS = T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Json = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    listeners: list[Json]
    routes: list[Json]
    clusters: list[Json]


def _secs(s: float) -> str:
    return f"{s:.3f}s"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _error_text(kind: str, message: str) -> str:
    # Envoy's local-reply formatter fills %...% operators; keep the text free of them.
    return error_body(kind, message).decode()


def _grpc_cluster(name: str, address: str, buffer_bytes: int) -> Json:
    host, port = _host_port(address)
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": buffer_bytes,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
        "typed_extension_protocol_options": {HTTP_OPTS_KEY: {
            "@type": HTTP_OPTS,
            "explicit_http_config": {"http2_protocol_options": {
                # Room for 20 MB+ bodies in one gRPC message without stalling on flow control.
                "initial_stream_window_size": 16 * 1024 * 1024,
                "initial_connection_window_size": 64 * 1024 * 1024,
            }},
        }},
    }


def _grpc_service(cluster: str, timeout_s: float, metadata: dict[str, str] | None = None) -> Json:
    svc: Json = {"envoy_grpc": {"cluster_name": cluster}, "timeout": _secs(timeout_s)}
    if metadata:
        svc["initial_metadata"] = [{"key": k, "value": v} for k, v in metadata.items()]
    return svc


def _upstream_endpoint(provider: Provider, runtime: Runtime) -> str:
    override = runtime.upstream_overrides.get(provider.name)
    return override.endpoint if override else provider.endpoint


def _provider_cluster(provider: Provider, runtime: Runtime, config: GatewayConfig) -> Json:
    url = urlsplit(_upstream_endpoint(provider, runtime))
    tls = url.scheme == "https"
    host = url.hostname or "localhost"
    port = url.port or (443 if tls else 80)
    is_ip = host.replace(".", "").isdigit() or ":" in host
    cluster: Json = {
        "name": provider.cluster,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _secs(provider.connect_timeout_s),
        "per_connection_buffer_limit_bytes": config.gateway.downstream.per_connection_buffer_bytes,
        "load_assignment": {
            "cluster_name": provider.cluster,
            # The route rewrites Host to this name: the provider must see its own host,
            # not the gateway's.
            "endpoints": [{"lb_endpoints": [{"endpoint": {
                "hostname": url.netloc.rsplit("@", 1)[-1],
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
        "typed_extension_protocol_options": {HTTP_OPTS_KEY: {
            "@type": HTTP_OPTS,
            "auto_config" if tls else "explicit_http_config":
                {"http2_protocol_options": {}} if tls else {"http_protocol_options": {}},
            # Per-attempt translation, credentials and metering: the adapter runs as an
            # upstream filter so a retry to another provider is handled for that provider.
            "http_filters": [
                {"name": "envoy.filters.http.ext_proc", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                    "grpc_service": _grpc_service(ADAPTER, 5.0, {ADAPTER_PROVIDER_MD: provider.name}),
                    "failure_mode_allow": False,
                    "processing_mode": {
                        "request_header_mode": "SEND",
                        "response_header_mode": "SEND",
                        "request_body_mode": "NONE",
                        "response_body_mode": "STREAMED",
                        "request_trailer_mode": "SKIP",
                        "response_trailer_mode": "SKIP",
                    },
                    "allow_mode_override": True,
                    "message_timeout": "5s",
                    # 502 marks "adapter unreachable" for the local-reply mapper.
                    "status_on_error": {"code": 502},
                    "metadata_options": {"receiving_namespaces": {"untyped": [USAGE_NS]}},
                }},
                {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
            ],
        }},
    }
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                # Verify the provider's certificate and name; never send credentials to an impostor.
                "validation_context": {
                    "trusted_ca": {"filename": certifi.where()},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                },
            },
        }}
    return cluster


def clusters(config: GatewayConfig, runtime: Runtime) -> list[Json]:
    buf = config.gateway.max_request_bytes
    services = {EXTAUTH: runtime.extauth, RATELIMIT: runtime.ratelimit,
                ADAPTER: runtime.adapter, ACCESSLOG: runtime.accesslog}
    missing = [name for name, addr in services.items() if not addr]
    if missing:
        raise ValueError(f"runtime lacks addresses for {missing}")
    out = [_grpc_cluster(name, str(addr), buf) for name, addr in services.items()]
    out += [_provider_cluster(p, runtime, config) for p in config.providers]
    return out


def route_config(config: GatewayConfig) -> Json:
    timeout = _secs(config.gateway.request_timeout_s)
    api_route: Json = {
        "cluster_header": H_CLUSTER,
        "auto_host_rewrite": True,
        "timeout": timeout,
        "idle_timeout": timeout,
        "rate_limits": [{
            "stage": 0,
            "actions": [{"request_headers": {"header_name": H_PRINCIPAL_ID, "descriptor_key": RL_PRINCIPAL_KEY}}],
            # The principal's own requests-per-minute, decided by extauth.
            "limit": {"dynamic_metadata": {"metadata_key": {"key": AUTHZ_NS, "path": [{"key": "rpm"}]}}},
        }],
    }
    return {
        "name": ROUTES,
        "virtual_hosts": [{
            "name": "anthropic_api",
            "domains": ["*"],
            "routes": [
                {"match": {"prefix": "/v1/"}, "route": api_route,
                 # Decided facts stay inside the gateway; the upstream never sees them.
                 "request_headers_to_remove": list(SET_HEADERS)},
                {"match": {"prefix": "/"}, "direct_response": {
                    "status": 404,
                    "body": {"inline_string": _error_text(
                        "not_found_error", "Not found: this gateway serves the Anthropic API under /v1/.")},
                }},
            ],
        }],
    }


def _local_reply_mappers() -> list[Json]:
    """Anthropic-shaped bodies for replies Envoy makes itself (our services write their own)."""

    def mapper(filter_: Json, status: int | None, kind: str, message: str) -> Json:
        m: Json = {"filter": filter_, "body_format_override": {
            "text_format_source": {"inline_string": _error_text(kind, message)},
            "content_type": "application/json"}}
        if status is not None:
            m["status_code"] = status
        return m

    def flags(*names: str) -> Json:
        return {"response_flag_filter": {"flags": list(names)}}

    def status(code: int) -> Json:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": code, "runtime_key": f"ccr.local_reply.{code}"}}}}

    return [
        mapper(status(413), None, "request_too_large",
               "Request exceeds the gateway's maximum request size (gateway.max_request_bytes)."),
        mapper({"and_filter": {"filters": [flags("UAEX"), status(503)]}}, 503, "api_error",
               "The gateway's authorization service is unavailable; retry shortly."),
        mapper(flags("RLSE"), 503, "api_error",
               "The gateway's rate limit service is unavailable; retry shortly."),
        mapper(status(502), None, "api_error",
               "The gateway's provider adapter is unavailable; retry shortly."),
        mapper(flags("UT"), 504, "api_error", "The upstream provider timed out."),
        mapper(flags("UH", "UF", "URX", "UO", "NC", "UC", "UR", "DC"), None, "api_error",
               "The upstream provider is unreachable or reset the connection; retry shortly."),
        mapper(flags("NR"), 404, "not_found_error", "No route for this path."),
    ]


def listener(config: GatewayConfig, listen_port: int, inline_routes: bool = False) -> Json:
    g = config.gateway
    hcm: Json = {
        "@type": HCM,
        "stat_prefix": "ccr",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Clients get the id their access-log row is keyed on, for support and audit.
        "always_set_request_id_in_response": True,
        "request_timeout": "0s",
        "stream_idle_timeout": _secs(g.request_timeout_s),
        "max_request_headers_kb": 96,
        **connection_limits(g.downstream),
        "local_reply_config": {"mappers": [*local_reply_mappers(), *_local_reply_mappers(),
                                           *fallback_reply_mappers()]},
        "http_filters": [
            identity_first_filter(config, EXTAUTH, 30.0),
            {"name": "envoy.filters.http.ext_authz", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "grpc_service": _grpc_service(EXTAUTH, 30.0),
                "failure_mode_allow": config.services.failure_mode_allow,
                "status_on_error": {"code": 503},
                # The body is read once, here: extauth needs the model for policy and routing.
                "with_request_body": {"max_request_bytes": g.max_request_bytes,
                                      "allow_partial_message": False, "pack_as_bytes": True},
                # extauth sets x-ccr-cluster, which selects the route's cluster.
                "clear_route_cache": True,
            }},
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": RL_DOMAIN,
                "stage": 0,
                "timeout": "2s",
                "failure_mode_deny": not config.services.failure_mode_allow,
                "rate_limit_service": {"transport_api_version": "V3",
                                       "grpc_service": _grpc_service(RATELIMIT, 2.0)},
            }},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.router.v3.Router",
                # Envoy's internal x-envoy-* request headers are not for the provider.
                "suppress_envoy_headers": True}},
        ],
        "access_log": [{"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "ccr",
                "transport_api_version": "V3",
                "grpc_service": _grpc_service(ACCESSLOG, 5.0),
                "buffer_flush_interval": "0.2s",
            },
        }}],
    }
    if inline_routes:
        hcm["route_config"] = route_config(config)
    else:
        hcm["rds"] = {"route_config_name": ROUTES,
                      "config_source": {"ads": {}, "resource_api_version": "V3"}}
    return {
        "name": LISTENER,
        "address": {"socket_address": {"address": g.listen.host, "port_value": listen_port}},
        # Bodies stream through this with flow control; only ext_authz buffers one whole,
        # raising its own stream's limit to max_request_bytes (after identity_first for large ones).
        "per_connection_buffer_limit_bytes": g.downstream.per_connection_buffer_bytes,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def build(config: GatewayConfig, runtime: Runtime, listen_port: int, inline_routes: bool = False) -> Resources:
    return Resources(
        listeners=[listener(config, listen_port, inline_routes)],
        routes=[] if inline_routes else [route_config(config)],
        clusters=clusters(config, runtime),
    )


def static_bootstrap(config: GatewayConfig, runtime: Runtime, listen_port: int) -> Json:
    """The same resources as a static bootstrap, for `envoy --mode validate`."""
    res = build(config, runtime, listen_port, inline_routes=True)
    return {
        "node": {"id": "ccr-validate", "cluster": "ccr"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": res.listeners, "clusters": res.clusters},
    }
