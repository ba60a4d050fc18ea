"""Envoy resources (listener, routes, clusters) generated from the gateway config.

Written as plain dicts in Envoy's own JSON/YAML shape so that they read like the
Envoy docs; router/xds.py turns them into typed protobufs for ADS, and the
validate path embeds the same dicts in a static bootstrap for `envoy --mode validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi

from ccr import listener_tls
from ccr.config import GatewayConfig, ListenerTLS, Provider, ProviderKind
from ccr.contract import (
    ADAPTER_PROVIDER_MD,
    ADAPTER_TRANSLATE_MD,
    ALS_TAG_SERVED_PROVIDER,
    AUTHZ_HTTP_FULL_PREFIX,
    CCR_HEADER_PREFIX,
    H_CLIENT_REQUEST_ID,
    H_CLUSTER,
    H_REQUEST_ID,
    H_TRACEPARENT,
    H_TRACESTATE,
    ID_ACCESSLOG,
    ID_ADAPTER,
    ID_ENVOY,
    ID_EXTAUTH,
    ID_RATELIMIT,
    ID_SIGNIN,
    OTLP_CLUSTER,
    RL_DOMAIN,
    RUN_TRUST_DOMAIN,
    SIGNIN_PREFIX,
    SPEND_DOMAIN,
    SPEND_STAGE,
    USAGE_NS,
)
from ccr.credentials import secret_name
from ccr.errors import error_body
from ccr.pki import RunPki
from ccr.runtime import EXTAUTH_HTTP, Runtime
from extauth.endpoints import ENDPOINTS, Endpoint
from router import authz_http
from router.body_capture import capture_filters
from router.downstream import (
    IDENTITY_FIRST,
    connection_limits,
    decision_retry,
    fallback_reply_mappers,
    identity_first_filter,
    local_reply_mappers,
    upstream_hygiene,
)
from router.failover import MD_NS as ENDPOINT_MD_NS
from router.object_routes import headers_to_remove, per_filter_config
from router.rate_limits import SPEND_FILTER, in_extauth
from router.replicas import host_port, lb_endpoints, replica_checks

LISTENER = "ccr_http"
ROUTES = "ccr_routes"
EXTAUTH, RATELIMIT, ADAPTER, ACCESSLOG = "ccr_extauth", "ccr_ratelimit", "ccr_adapter", "ccr_accesslog"
# Cluster -> the run identity (ccr/pki.py) of the service behind it.
SERVICE_IDENTITY = {EXTAUTH: ID_EXTAUTH, RATELIMIT: ID_RATELIMIT, ADAPTER: ID_ADAPTER, ACCESSLOG: ID_ACCESSLOG}
SIGNIN = "ccr_signin"
METER_LUA = Path(__file__).with_name("meter.lua")

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTS = T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_AUTHZ_PER_ROUTE = T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"

Json = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    listeners: list[Json]
    routes: list[Json]
    clusters: list[Json]
    # ClusterLoadAssignments of the EDS clusters (router/failover.py, GPU pools).
    endpoints: list[Json] = field(default_factory=list)


def _secs(s: float) -> str:
    return f"{s:.3f}s"


def _error_text(kind: str, message: str) -> str:
    # Envoy's local-reply formatter fills %...% operators; keep the text free of them.
    return error_body(kind, message).decode()


# Envoy's static cluster to the SPIRE agent's SDS API (the Workload API socket), in the bootstrap.
SPIRE_AGENT_CLUSTER = "spire_agent"


def spiffe_sds_config() -> Json:
    return {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": SPIRE_AGENT_CLUSTER}}]}}


def spiffe_upstream_tls(trust_domain: str, server: str, alpn: tuple[str, ...] = ("h2",)) -> Json:
    """Envoy presents its SVID (SDS, from the SPIRE agent) and accepts only spiffe://<td>/<server>,
    chained to the trust bundle of `trust_domain` (SDS too): both rotate without a config change."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": list(alpn),
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificate_sds_secret_configs": [{"name": f"spiffe://{trust_domain}/{ID_ENVOY}",
                                                    "sds_config": spiffe_sds_config()}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                    "exact": f"spiffe://{trust_domain}/{server}"}}]},
                "validation_context_sds_secret_config": {"name": f"spiffe://{trust_domain}",
                                                         "sds_config": spiffe_sds_config()},
            },
        },
    }}


def _service_tls(runtime: Runtime, server: str, alpn: tuple[str, ...] = ("h2",)) -> Json | None:
    if runtime.spiffe_socket:
        return spiffe_upstream_tls(runtime.spiffe_trust_domain or RUN_TRUST_DOMAIN, server, alpn)
    return _mtls_socket(runtime.mtls, server)


def _mtls_socket(pki: RunPki | None, server: str) -> Json | None:
    """Envoy as the run's `envoy` identity, accepting only the server's own identity.

    None when the run issued no identity for `server` (it serves plaintext).
    """
    if pki is None or server not in pki.identities:
        return None
    me = pki.identity(ID_ENVOY)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": me.cert},
                                  "private_key": {"filename": me.key}}],
            "validation_context": {
                "trusted_ca": {"filename": pki.ca},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                    "exact": pki.identity(server).spiffe_id}}],
            },
        },
    }}


def _grpc_cluster(name: str, addresses: list[str], buffer_bytes: int, transport_socket: Json | None = None,
                  replicas: bool = False) -> Json:
    kind, eps = lb_endpoints(addresses)
    cluster: Json = {
        "name": name,
        "type": kind,
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": buffer_bytes,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]},
        "typed_extension_protocol_options": {HTTP_OPTS_KEY: {
            "@type": HTTP_OPTS,
            "explicit_http_config": {"http2_protocol_options": {
                # Room for 20 MB+ bodies in one gRPC message without stalling on flow control.
                "initial_stream_window_size": 16 * 1024 * 1024,
                "initial_connection_window_size": 64 * 1024 * 1024,
            }},
        }},
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    if replicas:
        replica_checks(cluster)
    return cluster


def _grpc_service(cluster: str, timeout_s: float, metadata: dict[str, str] | None = None,
                  retry: bool = False) -> Json:
    svc: Json = {"envoy_grpc": {"cluster_name": cluster}, "timeout": _secs(timeout_s)}
    if metadata:
        svc["initial_metadata"] = [{"key": k, "value": v} for k, v in metadata.items()]
    if retry:
        svc["retry_policy"] = decision_retry(timeout_s)
    return svc


def _upstream_endpoint(provider: Provider, runtime: Runtime) -> str:
    override = runtime.upstream_overrides.get(provider.name)
    return override.endpoint if override else provider.endpoint


def _provider_cluster(provider: Provider, runtime: Runtime, config: GatewayConfig, objects: bool,
                      translate: bool = False) -> Json:
    url = urlsplit(_upstream_endpoint(provider, runtime))
    tls = url.scheme == "https"
    host = url.hostname or "localhost"
    port = url.port or (443 if tls else 80)
    is_ip = host.replace(".", "").isdigit() or ":" in host
    name = provider.translate_cluster if translate else provider.objects_cluster if objects else provider.cluster
    # Body capture (audit.bodies): a filter of its own on the adapter's clusters; the Messages
    # cluster's meter captures itself.
    filters = (capture_filters(config) + translate_filters(provider, runtime) if translate
               else upstream_filters(provider, runtime, objects, config))
    if objects and not translate:
        filters = capture_filters(config) + filters
    cluster: Json = {
        "name": name,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _secs(provider.connect_timeout_s),
        # The translate cluster buffers a whole request for the adapter, as extauth's does (and so does
        # the alias step, router/alias.lua).
        "per_connection_buffer_limit_bytes": config.gateway.max_request_bytes if translate or (
            config.aliases and not objects) else config.gateway.downstream.per_connection_buffer_bytes,
        "load_assignment": {
            "cluster_name": name,
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
            # Per attempt, so a retry to another provider is handled for that provider.
            "http_filters": _with_alias(config, filters, objects),
        }},
    }
    if provider.max_concurrent_requests is not None:
        n = provider.max_concurrent_requests
        # Saturation is refused at once (529 by the listener's local reply mapper), never queued.
        cluster["circuit_breakers"] = {"thresholds": [{
            "max_requests": n, "max_connections": n, "max_pending_requests": provider.max_queued_requests}]}
    if provider.pool is not None:
        return _pool_cluster(cluster, provider)
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


def provider_cluster_names(p: Provider) -> list[str]:
    """The clusters `clusters()` builds for provider `p`."""
    return ([p.cluster, p.objects_cluster] if p.kind == ProviderKind.anthropic else []) + [p.translate_cluster]


def _pool_cluster(cluster: Json, provider: Provider) -> Json:
    """A GPU pool's cluster: its endpoints are the registered workers, pushed by EDS (router/pools.py);
    Envoy health-checks each one, ejects failing ones, and sends each request to the worker with
    the fewest active requests (weighted by the room each reports)."""
    pool = provider.pool
    assert pool is not None
    cluster.update({
        "type": "STATIC",  # EDS over ADS (split_eds); empty in a static config
        "metadata": {"filter_metadata": {"ccr": {"eds": True, "pool": provider.name}}},
        "load_assignment": {"cluster_name": cluster["name"], "endpoints": []},
        "lb_policy": "LEAST_REQUEST",
        "health_checks": [{
            "timeout": _secs(max(pool.health_interval_s, 1.0)), "interval": _secs(pool.health_interval_s),
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "http_health_check": {"path": pool.health_path},
            # A pool sees bursts: idle stretches must not slow the checks down to Envoy's 60 s default.
            "no_traffic_interval": _secs(pool.health_interval_s),
            "no_traffic_healthy_interval": _secs(pool.health_interval_s),
        }],
        # A worker the registry dropped (deregistered, or its heartbeat stopped) leaves at once, even
        # while its health check still passes.
        "ignore_health_on_host_removal": True,
        # A worker that refuses a connection is ejected at once (the request that met it fails: 503),
        # one that answers 5xx three times in a row too; the active health check also takes it out.
        "outlier_detection": {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
                              "consecutive_5xx": 3, "consecutive_gateway_failure": 2,
                              "base_ejection_time": "10s", "max_ejection_percent": 100},
        # Workers speak plain HTTP/1.1 inside the deployment.
        "typed_extension_protocol_options": {HTTP_OPTS_KEY: {
            **cluster["typed_extension_protocol_options"][HTTP_OPTS_KEY],
            "explicit_http_config": {"http_protocol_options": {}}}},
    })
    cluster["typed_extension_protocol_options"][HTTP_OPTS_KEY].pop("auto_config", None)
    cluster.pop("dns_lookup_family", None)
    return cluster


def _meter_lua(config: GatewayConfig) -> str:
    """router/meter.lua, its body capture on when audit.bodies names someone (docs/audit.md "Bodies")."""
    src = METER_LUA.read_text()
    if config.audit.bodies:
        off = "\nM.CAPTURE_ENABLED = false\n"
        if off not in src:
            raise RuntimeError("router/meter.lua lost its CAPTURE_ENABLED switch")
        src = src.replace(off, "\nM.CAPTURE_ENABLED = true\n", 1)
    return src


ALIAS_LUA = Path(__file__).with_name("alias.lua")


def alias_filter() -> Json:
    """router/alias.lua: puts an alias's concrete model id into the attempt's request (per attempt)."""
    return {"name": "ccr.alias", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": ALIAS_LUA.read_text()}}}


def _with_alias(config: GatewayConfig, filters: list[Json], objects: bool = False) -> list[Json]:
    """The alias step first on every Messages cluster, only when the config has aliases (Batches and
    Files never carry one: a batch names concrete models)."""
    return [alias_filter(), *filters] if config.aliases and not objects else filters


def upstream_filters(provider: Provider, runtime: Runtime, objects: bool, config: GatewayConfig) -> list[Json]:
    """A passthrough provider's upstream filters. Each provider has two clusters (extauth picks
    one per endpoint): Messages and Models call no Python on the way; Batches and Files go
    through the adapter, whose owner records they need.

    1. objects cluster: adapter ext_proc (object ownership, path scoping, batch usage);
       Messages cluster: Lua usage meter (router/meter.lua), reading usage from the JSON or SSE
       reply as it streams past, into USAGE_NS; it never holds or changes a byte;
    3. header hygiene: no client credential, no x-ccr-* fact, and an unencoded reply
       (which the meter reads; the listener compresses for clients that ask);
    4. the provider's credential, from its SDS file (ccr/credentials.py), Envoy only.
    """
    secret_file = runtime.provider_credentials.get(provider.name)
    if not secret_file:
        raise ValueError(f"runtime lacks the credential file of provider {provider.name}")
    adapter = {"name": "envoy.filters.http.ext_proc", "typed_config": {
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
    }}
    meter = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": _meter_lua(config)},
    }}
    return [
        adapter if objects else meter,
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": upstream_hygiene()},
        }},
        {"name": "envoy.filters.http.credential_injector", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                "header": "x-api-key",
                "credential": {"name": secret_name(provider.name), "sds_config": {
                    "path_config_source": {"path": secret_file}, "resource_api_version": "V3"}},
            }},
        }},
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
    ]


def _header_hygiene() -> Json:
    return {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": upstream_hygiene()},
    }}


def _credential_injector(provider: Provider, secret_file: str, header: str) -> Json:
    return {"name": "envoy.filters.http.credential_injector", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
        "overwrite": True,
        "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
            "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
            "header": header,
            "credential": {"name": secret_name(provider.name), "sds_config": {
                "path_config_source": {"path": secret_file}, "resource_api_version": "V3"}},
        }},
    }}


def translate_filters(provider: Provider, runtime: Runtime) -> list[Json]:
    """The translating cluster's upstream filters (router/adapter/translate.py), per attempt:

    1. header hygiene first: the client's credentials and x-ccr-* go before anything is added;
    2. the adapter (ext_proc): request body buffered (the provider's request is built from all of
       it), reply body full duplex (rewritten into the client's schema at the adapter's pace, with
       keep-alives while a provider is silent), usage metered into USAGE_NS;
       for Bedrock and Vertex it also signs the attempt (SigV4 over the final body and path,
       or a service-account OAuth token), holding those credentials itself;
    3. for the Anthropic API and a keyed OpenAI-compatible server, Envoy's credential injector,
       as on the passthrough cluster (x-api-key / authorization from the SDS file).
    """
    filters = [_header_hygiene(), translating_adapter(provider)]
    filters += translated_credential(provider, runtime)
    filters.append({"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}})
    return filters


def translated_credential(provider: Provider, runtime: Runtime) -> list[Json]:
    """Envoy's credential injector for a translated attempt to the Anthropic API or a keyed
    OpenAI-compatible server (Bedrock and Vertex are signed by the adapter itself)."""
    secret_file = runtime.provider_credentials.get(provider.name)
    if provider.kind == ProviderKind.anthropic:
        if not secret_file:
            raise ValueError(f"runtime lacks the credential file of provider {provider.name}")
        return [_credential_injector(provider, secret_file, "x-api-key")]
    if provider.kind == ProviderKind.openai and secret_file:
        return [_credential_injector(provider, secret_file, "authorization")]
    return []


def translating_adapter(provider: Provider) -> Json:
    """The adapter's ext_proc filter translating an attempt to `provider` (router/adapter/translate.py)."""
    return {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": _grpc_service(ADAPTER, 30.0, {ADAPTER_PROVIDER_MD: provider.name, ADAPTER_TRANSLATE_MD: "1"}),
        "failure_mode_allow": False,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            # The adapter answers the reply at its own pace: translated chunks, and SSE pings while
            # a provider that sends none is silent. Envoy requires trailers SEND with this mode.
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SEND",
        },
        # A Vertex token refresh may take a round trip to the token endpoint.
        "message_timeout": "10s",
        "status_on_error": {"code": 502},
        "metadata_options": {"receiving_namespaces": {"untyped": [USAGE_NS]}},
    }}


def clusters(config: GatewayConfig, runtime: Runtime) -> list[Json]:
    buf = config.gateway.max_request_bytes
    services = {EXTAUTH: runtime.extauth, RATELIMIT: runtime.ratelimit,
                ADAPTER: runtime.adapter, ACCESSLOG: runtime.accesslog}
    missing = [name for name, addr in services.items() if not addr]
    if missing:
        raise ValueError(f"runtime lacks addresses for {missing}")
    # The access-log stream's buffer is how much Envoy holds for a slow receiver before it drops
    # entries (stat access_logs.grpc_access_log.logs_dropped): sized by audit.envoy_backlog_bytes.
    out = [_grpc_cluster(name, runtime.service_endpoints.get(SERVICE_IDENTITY[name]) or [str(addr)],
                         config.audit.envoy_backlog_bytes if name == ACCESSLOG else buf,
                         _service_tls(runtime, SERVICE_IDENTITY[name]),
                         replicas=bool(runtime.service_endpoints))
           for name, addr in services.items()]
    if config.services.authz_transport == "http":
        if not runtime.extauth_http:
            raise ValueError("runtime lacks the address of extauth's HTTP front (services.authz_transport: http)")
        out.append(authz_http.cluster(config, runtime.service_endpoints.get(EXTAUTH_HTTP) or [runtime.extauth_http],
                                      _service_tls(runtime, ID_EXTAUTH, ("http/1.1",)),
                                      replicas=bool(runtime.service_endpoints)))
    for p in config.providers:
        if p.kind == ProviderKind.anthropic:  # passthrough Messages/Models, and Batches/Files
            out += [_provider_cluster(p, runtime, config, objects) for objects in (False, True)]
        out.append(_provider_cluster(p, runtime, config, objects=False, translate=True))
    from router.failover import chain_clusters  # (it builds on this module's filters)

    out += chain_clusters(config, runtime, _meter_lua(config))
    out += _signin_clusters(config, runtime)
    if config.telemetry.otlp_endpoint:  # Envoy's spans go to the OTLP collector (tracing_config)
        out.append(_grpc_cluster(OTLP_CLUSTER, [config.telemetry.otlp_endpoint], 1024 * 1024))
    return out


def tracing_config(config: GatewayConfig) -> Json:
    """HCM tracing (telemetry.otlp_endpoint): Envoy starts a trace (sampled at telemetry.sample_ratio) or
    continues the client's W3C traceparent, and its gRPC calls to extauth, ratelimit, the adapter carry
    their own child span's traceparent in their initial metadata (docs/observability.md)."""
    return {
        "random_sampling": {"value": config.telemetry.sample_ratio * 100},
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": T + "envoy.config.trace.v3.OpenTelemetryConfig",
            # Envoy's exporter batches and never holds a request; 1s bounds one export.
            "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
            "service_name": "ccr-envoy",
        }},
    }


def _signin_clusters(config: GatewayConfig, runtime: Runtime) -> list[Json]:
    """The sign-in HTTP service (plain HTTP/1.1 on the services' host), when configured."""
    if config.identity.signin is None:
        return []
    if not runtime.signin:
        raise ValueError("runtime lacks the address of the signin service")
    host, port = host_port(runtime.signin)
    cluster: Json = {
        "name": SIGNIN,
        "type": "STATIC",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": 64 * 1024,
        "load_assignment": {"cluster_name": SIGNIN, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": host, "port_value": port}}}}]}]},
    }
    if runtime.spiffe_socket:  # HTTP/1.1 over SPIFFE mTLS
        cluster["transport_socket"] = spiffe_upstream_tls(runtime.spiffe_trust_domain or RUN_TRUST_DOMAIN,
                                                          ID_SIGNIN, alpn=("http/1.1",))
    return [cluster]


def _no_authorization() -> Json:
    """Per-route: neither ext_authz filter (the identity-first one nor the full one) runs."""
    return {EXT_AUTHZ_FILTER: {"@type": EXT_AUTHZ_PER_ROUTE, "disabled": True},
            IDENTITY_FIRST: {"@type": T + "envoy.config.route.v3.FilterConfig", "disabled": True}}


def _signin_routes(config: GatewayConfig) -> list[Json]:
    """SIGNIN_PREFIX goes to the sign-in service, and only there. Signing in is what a caller
    without credentials does, so ext_authz is off for this route alone; nothing under the
    prefix can reach a provider (this route has no provider cluster and no cluster_header)."""
    if config.identity.signin is None:
        return []
    return [{
        "match": {"prefix": SIGNIN_PREFIX},
        "route": {"cluster": SIGNIN, "timeout": "30s"},
        "typed_per_filter_config": _no_authorization(),
    }]


def _api_route(config: GatewayConfig) -> Json:
    timeout = _secs(config.gateway.request_timeout_s)
    return {
        # Only what extauth set: client-sent x-ccr-* never get this far (early header mutation),
        # so with no decision there is no cluster and nothing is forwarded.
        "cluster_header": H_CLUSTER,
        "auto_host_rewrite": True,
        "timeout": timeout,
        "idle_timeout": timeout,
        # Rate limits: per endpoint, in typed_per_filter_config (router/rate_limits.py).
    }


def spend_filter(config: GatewayConfig, replicas: bool = False) -> list[Json]:
    """A second rate limit filter for budgets: its own stage and domain, and 402 (billing_error) when a
    hard budget has no room; the request limits' 429 stay as they are. Its descriptors are per route
    (router/rate_limits.py spend_per_route)."""
    if not config.spend.enabled or in_extauth(config):  # extauth reserves in its Check (limits.admission)
        return []
    return [{"name": SPEND_FILTER, "typed_config": {
        "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        "domain": SPEND_DOMAIN,
        "stage": SPEND_STAGE,
        "timeout": "2s",
        "failure_mode_deny": not config.services.failure_mode_allow,
        "rate_limited_status": {"code": 402},
        "rate_limit_service": {"transport_api_version": "V3",
                               "grpc_service": _grpc_service(RATELIMIT, 2.0, retry=replicas)},
    }}]


def _endpoint_match(e: Endpoint) -> Json:
    """Exactly this method and path (Envoy strips the query string before matching)."""
    path: Json = {"path": e.template} if e.is_exact else {"safe_regex": {"regex": e.regex}}
    return {**path, "headers": [{"name": ":method", "string_match": {"exact": e.method}}]}


def _endpoint_routes(config: GatewayConfig) -> list[Json]:
    from router.failover import chain_routes

    api_route = _api_route(config)
    out = []
    for e in ENDPOINTS:
        route = {
            "name": e.name,
            "match": _endpoint_match(e),
            "route": api_route,
            "typed_per_filter_config": per_filter_config(config, e),
            # Decided facts stay inside the gateway; the upstream never sees them (the adapter
            # removes the principal id that Batches and Files routes keep for it).
            "request_headers_to_remove": headers_to_remove(e),
        }
        if e.schema == "anthropic" and (e.model_in_body or e.model_in_path):
            out += chain_routes(config, api_route, route)  # failover chains (router/failover.py)
        out.append(route)
    return out


def _not_found_route() -> Json:
    """Everything that is not a known endpoint: 404 here, with no authorization call
    (no body is buffered for it) and nothing forwarded."""
    return {
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": _error_text(
            "not_found_error", "Not found: this gateway serves only the Anthropic API endpoints it knows "
            "(e.g. POST /v1/messages); check the method and the path's spelling.")}},
        "typed_per_filter_config": _no_authorization(),
    }


def route_config(config: GatewayConfig) -> Json:
    """Deny by default: one route per known endpoint, a direct 404 for every other path."""
    out: Json = {
        "name": ROUTES,
        "virtual_hosts": [{
            "name": "anthropic_api",
            "domains": ["*"],
            "routes": [*_signin_routes(config), *_endpoint_routes(config), _not_found_route()],
        }],
    }
    if config.services.authz_transport == "http":  # a provider must not write the audit row's facts
        out["response_headers_to_remove"] = authz_http.upstream_response_headers_to_remove(config)
    return out


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

    def cel(expression: str) -> Json:
        return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
            "expression": expression}}}

    def code_details(details: str) -> Json:
        # Envoy's own reason for a local reply; the only handle on replies sent before any filter
        # ran (response flags such as DPE are set only after the reply is formatted).
        return cel(f"response.code_details == '{details}'")

    def status(code: int) -> Json:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": code, "runtime_key": f"ccr.local_reply.{code}"}}}}

    return [
        # Envoy's own 413 (a body past a buffer limit); a policy's 413 (an ext_authz denial, e.g. a
        # tier's size ceiling) keeps its own reason and decision id.
        mapper(cel("response.code == 413 && response.code_details != 'ext_authz_denied'"), None,
               "request_too_large", "Request exceeds the gateway's maximum request size (gateway.max_request_bytes)."),
        # extauth unreachable or failing (not its own 503 refusals, which carry their own body: an internal
        # error naming its decision, or the limits' store down with limits.admission: extauth).
        mapper({"and_filter": {"filters": [flags("UAEX"), status(503),
                                           cel("response.code_details != 'ext_authz_denied'")]}}, 503,
               "api_error", "The gateway's authorization service is unavailable; retry shortly."),
        mapper(flags("RLSE"), 503, "api_error",
               "The gateway's rate limit service is unavailable; retry shortly."),
        mapper(status(502), None, "api_error",
               "The gateway's provider adapter is unavailable; retry shortly."),
        mapper(flags("UT"), 504, "api_error", "The upstream provider timed out."),
        # No cluster: nobody decided where this request goes (fail-open with extauth down).
        mapper(flags("NC"), 503, "api_error",
               "The gateway has no authorization decision for this request; retry shortly."),
        # A circuit breaker is open (a provider's max_concurrent_requests): overloaded, as the API says it.
        mapper(flags("UO"), 529, "overloaded_error",
               "The provider is at its concurrent request limit on this gateway; retry shortly."),
        mapper(flags("UH", "UF", "URX", "UO", "UC", "UR", "DC"), None, "api_error",
               "The upstream provider is unreachable or reset the connection; retry shortly."),
        mapper(flags("NR"), 404, "not_found_error", "No route for this path."),
        # Refused before any filter ran (HCM path normalisation, the HTTP/1 codec).
        mapper(code_details("path_normalization_failed"), 400, "invalid_request_error",
               "Invalid request path: an encoded '/' or '\\', a NUL or a fragment is not allowed; "
               "send the endpoint's exact path, e.g. /v1/messages."),
        mapper(cel("response.code == 400 && response.code_details.startsWith('http1.')"), 400,
               "invalid_request_error", "Malformed HTTP request (request line, path or headers)."),
    ]


def _gateway_request_id() -> list[Json]:
    """HCM early header mutations: the request id is always the gateway's.

    They run before Envoy's request-id handling, which keeps a client's x-request-id
    whenever the peer is not an "edge" client; here the client's value is moved to
    x-client-request-id (logged, never a key) and x-request-id removed, so Envoy always
    generates a fresh UUID: the audit row's unique key and the id in the response.
    A client-sent x-client-request-id is dropped first, so that header only ever holds
    what the client sent as x-request-id.
    """
    return [{"name": "envoy.http.early_header_mutation.header_mutation", "typed_config": {
        "@type": T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
        "mutations": [
            {"remove": H_CLIENT_REQUEST_ID},
            # An absent x-request-id formats as empty, and an empty value is not added.
            {"append": {"header": {"key": H_CLIENT_REQUEST_ID, "value": f"%REQ({H_REQUEST_ID})%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
            {"remove": H_REQUEST_ID},
        ],
    }}]


def _compressor_filter() -> Json:
    """Compress replies for clients that ask (the adapter asks providers for identity).

    JSON and event streams. Envoy's gzip compressor flushes at the end of every chunk it
    is given, so a stream is not held back: measured through Envoy 1.40 with the emulator
    pacing 30 tokens/s, the first delta arrived after 0.12 s gzip-encoded vs 0.14 s
    unencoded (2.1 s streams both); tests/test_e2e_usage.py checks that a compressed stream's
    first deltas reach the client while the provider is still holding the rest back.
    """
    return {"name": "envoy.filters.http.compressor", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.compressor.v3.Compressor",
        "response_direction_config": {"common_config": {
            # Applies to replies with a content-length; streams are always compressed.
            "min_content_length": 256,
            "content_type": ["application/json", "text/event-stream"]}},
        "compressor_library": {"name": "gzip", "typed_config": {
            "@type": T + "envoy.extensions.compression.gzip.compressor.v3.Gzip"}},
    }}


def _path_handling() -> Json:
    """One spelling per path before any filter or route sees it: dot segments resolved,
    %-encoded unreserved characters decoded, '//' merged, and an encoded '/' or '\\'
    (which a provider might decode into a different path) refused with 400."""
    return {
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
    }


def _strip_client_ccr_headers() -> list[Json]:
    """Client-sent x-ccr-* are removed before ext_authz runs, so that with fail-open
    authorization (extauth down) nothing the client chose can pick a cluster or a principal."""
    return [{"name": "envoy.http.early_header_mutation.header_mutation", "typed_config": {
        "@type": T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
        "mutations": [{"remove_on_match": {"key_matcher": {"prefix": CCR_HEADER_PREFIX}}}],
    }}]


def listener(config: GatewayConfig, listen_port: int, inline_routes: bool = False, replicas: bool = False) -> Json:
    """`replicas`: the decision services run as several replicas (`ccr serve`): retry their calls."""
    g = config.gateway
    over_http = config.services.authz_transport == "http"
    hcm: Json = {
        "@type": HCM,
        "stat_prefix": "ccr",
        "codec_type": "AUTO",
        # A client's own x-forwarded-client-cert is dropped: only Envoy says who the peer is.
        "forward_client_cert_details": "SANITIZE",
        "generate_request_id": True,
        "early_header_mutation_extensions": _strip_client_ccr_headers() + _gateway_request_id(),
        # Clients get the id their access-log row is keyed on, for support and audit.
        "always_set_request_id_in_response": True,
        "request_timeout": "0s",
        "stream_idle_timeout": _secs(g.request_timeout_s),
        "max_request_headers_kb": 96,
        **connection_limits(g.downstream),
        "local_reply_config": {"mappers": [*(authz_http.status_mappers() if over_http else []),
                                           *local_reply_mappers(), *_local_reply_mappers(),
                                           *fallback_reply_mappers()]},
        **_path_handling(),
        "http_filters": [
            *([authz_http.refusal_metadata_filter(config)] if over_http else []),
            identity_first_filter(config, EXTAUTH, 30.0, retry=replicas),
            {"name": EXT_AUTHZ_FILTER, "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                **(authz_http.ext_authz_fields(config, AUTHZ_HTTP_FULL_PREFIX, "30s", replicas) if over_http else {
                    "transport_api_version": "V3",
                    "grpc_service": _grpc_service(EXTAUTH, 30.0, retry=replicas)}),
                "failure_mode_allow": config.services.failure_mode_allow,
                "status_on_error": {"code": 503},
                # The body is read once, here: extauth needs the model for policy and routing.
                "with_request_body": {"max_request_bytes": g.max_request_bytes,
                                      "allow_partial_message": False, "pack_as_bytes": True},
                # extauth sets x-ccr-cluster, which selects the route's cluster.
                "clear_route_cache": True,
                # The verified client certificate, so extauth can insist on an X.509-SVID (over HTTP:
                # authz_http.PEER_HEADERS).
                **({} if over_http else {"include_peer_certificate": True}),
            }},
            *([authz_http.allow_metadata_filter(config)] if over_http else []),
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": RL_DOMAIN,
                "stage": 0,
                "timeout": "2s",
                "failure_mode_deny": not config.services.failure_mode_allow,
                "rate_limit_service": {"transport_api_version": "V3",
                                       "grpc_service": _grpc_service(RATELIMIT, 2.0, retry=replicas)},
                # x-ratelimit-limit/-remaining/-reset from the descriptor statuses; the service adds
                # the anthropic-ratelimit-* family itself (response_headers_to_add).
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            }},
            *spend_filter(config, replicas),
            _compressor_filter(),
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
                # Entries go to the receiver in batches of this size, or after this interval.
                "buffer_size_bytes": config.audit.envoy_batch_bytes,
                "buffer_flush_interval": f"{config.audit.envoy_flush_interval_ms / 1000}s",
                # The provider of the endpoint that served the last attempt (a failover chain's endpoints
                # carry it): the audit row's provider, from Envoy's own host selection.
                "custom_tags": [{"tag": ALS_TAG_SERVED_PROVIDER, "metadata": {
                    "kind": {"host": {}}, "metadata_key": {"key": ENDPOINT_MD_NS, "path": [{"key": "provider"}]}}}],
            },
            # The client's own request id (moved aside by _gateway_request_id).
            "additional_request_headers_to_log": [H_CLIENT_REQUEST_ID] + (
                [H_TRACEPARENT, H_TRACESTATE] if config.telemetry.otlp_endpoint else []),
        }}],
    }
    if config.telemetry.otlp_endpoint:
        hcm["tracing"] = tracing_config(config)
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


def downstream_tls(tls: ListenerTLS, base: Path, sds_dir: str | None = None) -> Json:
    """The listener's TLS transport socket; with a client CA, client certificates are
    verified against it (and required when the config says so). Relative file names
    are relative to the config file. With `sds_dir` (where the process starting Envoy wrote
    ccr/listener_tls.py's SDS files) the certificate and CA come from those watched files and
    rotate without a restart; without it (a static config for another Envoy) they are inline."""
    common: Json = {
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
    }
    resources = listener_tls.secrets(tls, base)  # also checks that every file exists
    if sds_dir is not None:
        common["tls_certificate_sds_secret_configs"] = [
            listener_tls.sds_secret_config(sds_dir, listener_tls.CERT_SECRET)]
        if listener_tls.CLIENT_CA_SECRET in resources:
            common["validation_context_sds_secret_config"] = listener_tls.sds_secret_config(
                sds_dir, listener_tls.CLIENT_CA_SECRET)
    else:
        cert = resources[listener_tls.CERT_SECRET]["tls_certificate"]
        common["tls_certificates"] = [{"certificate_chain": cert["certificate_chain"],
                                       "private_key": cert["private_key"]}]
        if listener_tls.CLIENT_CA_SECRET in resources:
            ca = resources[listener_tls.CLIENT_CA_SECRET]["validation_context"]
            common["validation_context"] = {"trusted_ca": ca["trusted_ca"]}
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": tls.require_client_cert,
        "common_tls_context": common,
    }}


def _with_listener_tls(lst: Json, config: GatewayConfig, runtime: Runtime) -> Json:
    if config.gateway.tls is not None:
        base = Path(runtime.config_path).resolve().parent
        for chain in lst["filter_chains"]:
            chain["transport_socket"] = downstream_tls(config.gateway.tls, base, runtime.listener_sds_dir)
    return lst


def build(config: GatewayConfig, runtime: Runtime, listen_port: int, inline_routes: bool = False) -> Resources:
    """`inline_routes`: a static config (validate mode): routes and endpoints inside their parents."""
    from router.failover import split_eds

    cs = clusters(config, runtime)
    cs, endpoints = (cs, []) if inline_routes else split_eds(cs)
    return Resources(
        listeners=[_with_listener_tls(listener(config, listen_port, inline_routes, bool(runtime.service_endpoints)),
                                      config, runtime)],
        routes=[] if inline_routes else [route_config(config)],
        clusters=cs,
        endpoints=endpoints,
    )


def static_bootstrap(config: GatewayConfig, runtime: Runtime, listen_port: int) -> Json:
    """The same resources as a static bootstrap, for `envoy --mode validate`."""
    res = build(config, runtime, listen_port, inline_routes=True)
    return {
        "node": {"id": "ccr-validate", "cluster": "ccr"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": res.listeners, "clusters": res.clusters},
    }
