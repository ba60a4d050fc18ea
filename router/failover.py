"""Failover chains in Envoy's own terms (ccr/routing.py decides which chain a request uses).

A chain is one cluster whose priority levels are the model's targets in order, each endpoint
tagged with its provider (metadata `ccr.provider`). Its route retries on the statuses the model's
`failover` names, on resets and per-try timeouts, with the previous_priorities retry priority: each
retry goes to the next level, never back to one already tried, and all within the route's total
timeout. Envoy retries only before the response headers reach the client, so a stream is failed
over only before its first byte, and a 4xx the request caused is never retried.

Per attempt the upstream filters (which Envoy runs per try) learn the attempt's provider from the
host Envoy picked (%UPSTREAM_METADATA%) and inject only that provider's credential. The request's
headers are shared by the attempts, so hygiene runs first on every attempt: the previous target's
credential never reaches the next one.

A chain may hold translated targets (Bedrock, Vertex, an OpenAI-compatible server) anywhere, several
too: each one's attempt runs the adapter (ext_proc) guarded the same way, so translation happens per
attempt and only on that target's; Anthropic attempts stay byte-faithful passthrough (`_mixed_filters`).
A translating attempt rewrites the shared header map (:path, content-length, SigV4, no
anthropic-version), so such a chain starts with router/chain_restore.lua, which puts the client's
headers back at the start of every attempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi

from ccr.config import GatewayConfig, Provider, ProviderKind
from ccr.contract import H_ATTEMPT_PROVIDER, H_CLUSTER
from ccr.credentials import secret_name
from ccr.routing import Chain, chains
from ccr.runtime import Runtime
from router.downstream import upstream_hygiene

Json = dict[str, Any]
T = "type.googleapis.com/"
HTTP_OPTS = T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MD_NS = "ccr"  # endpoint metadata namespace: {"provider": name}
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"


def _secs(s: float) -> str:
    return f"{s:.3f}s"


def _endpoint(p: Provider, runtime: Runtime) -> tuple[str, int, str, bool]:
    """(host, port, Host header, tls) of the provider's endpoint (or its test override)."""
    override = runtime.upstream_overrides.get(p.name)
    url = urlsplit(override.endpoint if override else p.endpoint)
    tls = url.scheme == "https"
    host = url.hostname or "localhost"
    return host, url.port or (443 if tls else 80), url.netloc.rsplit("@", 1)[-1], tls


def _is_ip(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


def _tls_socket(host: str) -> Json:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": host,
        "common_tls_context": {
            "alpn_protocols": ["http/1.1"],
            # Verify the provider's certificate and name; never send credentials to an impostor.
            "validation_context": {
                "trusted_ca": {"filename": certifi.where()},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
            },
        },
    }}


def _is(name: str) -> Json:
    return {"single_predicate": {
        "input": {"name": "attempt_provider", "typed_config": {
            "@type": T + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": H_ATTEMPT_PROVIDER}},
        "value_match": {"exact": name}}}


def _guarded(p: Provider | list[Provider], filter_: Json, label: str = "") -> Json:
    """`filter_` runs only on an attempt whose host is provider `p` (or one of them; skipped on the others)."""
    ps = p if isinstance(p, list) else [p]
    attempt = _is(ps[0].name) if len(ps) == 1 else {"or_matcher": {"predicate": [_is(x.name) for x in ps]}}
    return {"name": f"ccr.chain.{label or ps[0].name}", "typed_config": {
        "@type": T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "xds_matcher": {"matcher_list": {"matchers": [{
            "predicate": {"not_matcher": attempt},
            "on_match": {"action": {"name": "skip", "typed_config": {
                "@type": T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
        }]}},
        "extension_config": filter_,
    }}


_SET_ATTEMPT = {"append": {"header": {"key": H_ATTEMPT_PROVIDER, "value": f"%UPSTREAM_METADATA({MD_NS}:provider)%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}


def _codec() -> Json:
    return {"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}


def _strip() -> Json:
    return {"name": "ccr.chain.strip", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"remove": H_ATTEMPT_PROVIDER}]}}}


def _mixed_filters(chain: Chain, runtime: Runtime, meter_lua: str) -> list[Json]:
    """A chain crossing provider kinds (ccr/routing.py failover_capable), in any order. Per attempt (after
    the restore step, `_upstream_filters`): hygiene and the attempt's provider first; on an Anthropic attempt the
    usage meter (it also strips x-ccr-*, so the attempt's provider is set again after it) and its key; on
    a translated attempt its own adapter (translation, signing, metering) and, for a keyed OpenAI-compatible
    server, its key. Every filter but hygiene runs only for its own target."""
    from router.resources import translated_credential, translating_adapter

    passthrough = [p for p in chain.providers if p.kind == ProviderKind.anthropic]
    translated = [p for p in chain.providers if p.kind != ProviderKind.anthropic]
    out = [
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [*upstream_hygiene(), _SET_ATTEMPT]}}},
    ]
    if passthrough:
        out += [
            _guarded(passthrough, {"name": "envoy.filters.http.lua", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": meter_lua}}}, "meter"),
            {"name": "ccr.chain.attempt", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [_SET_ATTEMPT]}}},
        ]
    for p in passthrough:
        out += [_guarded(p, f) for f in _injectors(p, runtime)]
    for p in translated:
        out.append(_guarded(p, translating_adapter(p), f"{p.name}.adapter"))
        out += [_guarded(p, f, f"{p.name}.key") for f in translated_credential(p, runtime)]
    return [*out, _strip(), _codec()]


def _injectors(p: Provider, runtime: Runtime) -> list[Json]:
    secret_file = runtime.provider_credentials.get(p.name)
    if not secret_file:
        raise ValueError(f"runtime lacks the credential file of provider {p.name}")
    return [{"name": "envoy.filters.http.credential_injector", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
        "overwrite": True,
        "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
            "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
            "header": "x-api-key",
            "credential": {"name": secret_name(p.name), "sds_config": {
                "path_config_source": {"path": secret_file}, "resource_api_version": "V3"}},
        }},
    }}]


def _filters(chain: Chain, runtime: Runtime, meter_lua: str) -> list[Json]:
    if any(p.kind != ProviderKind.anthropic for p in chain.providers):
        return _mixed_filters(chain, runtime, meter_lua)
    hygiene = {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [
            *upstream_hygiene(),
            # The attempt's provider, from the endpoint Envoy picked for this try.
            _SET_ATTEMPT,
        ]},
    }}
    injectors = []
    for p in chain.providers:
        secret_file = runtime.provider_credentials.get(p.name)
        if not secret_file:
            raise ValueError(f"runtime lacks the credential file of provider {p.name}")
        injectors.append(_guarded(p, {"name": "envoy.filters.http.credential_injector", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                "@type": T + "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                "header": "x-api-key",
                "credential": {"name": secret_name(p.name), "sds_config": {
                    "path_config_source": {"path": secret_file}, "resource_api_version": "V3"}},
            }},
        }}))
    return [
        # The usage meter (router/meter.lua) first: it also drops credentials and x-ccr-* on its way.
        {"name": "envoy.filters.http.lua", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": meter_lua}}},
        hygiene,
        *injectors,
        {"name": "ccr.chain.strip", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": H_ATTEMPT_PROVIDER}]}}},
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
    ]


CHAIN_RESTORE_LUA = Path(__file__).with_name("chain_restore.lua")


def _restore() -> Json:
    """router/chain_restore.lua: every attempt starts from the client's request headers (a translating
    attempt before it rewrote the shared header map)."""
    return {"name": "ccr.chain.restore", "typed_config": {
        "@type": T + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": CHAIN_RESTORE_LUA.read_text()}}}


def _with_alias(config: GatewayConfig, filters: list[Json]) -> list[Json]:
    from router.resources import alias_filter

    return [alias_filter(), *filters] if config.aliases else filters


def _upstream_filters(chain: Chain, config: GatewayConfig, filters: list[Json]) -> list[Json]:
    # Only a translating attempt rewrites the request's headers: Anthropic-only chains need no restore.
    if any(p.kind != ProviderKind.anthropic for p in chain.providers):
        return [_restore(), *filters]
    return filters


def chain_cluster(chain: Chain, runtime: Runtime, config: GatewayConfig, meter_lua: str) -> Json:
    levels, sockets, all_ip = [], [], True
    for prio, p in enumerate(chain.providers):
        host, port, netloc, tls = _endpoint(p, runtime)
        all_ip = all_ip and _is_ip(host)
        md: Json = {MD_NS: {"provider": p.name}}
        if tls:
            md["envoy.transport_socket_match"] = {"provider": p.name}
            sockets.append({"name": p.name, "match": {"provider": p.name}, "transport_socket": _tls_socket(host)})
        levels.append({"priority": prio, "lb_endpoints": [{
            # The route rewrites Host to this name: the provider must see its own host.
            "endpoint": {"hostname": netloc, "address": {"socket_address": {"address": host, "port_value": port}}},
            "metadata": {"filter_metadata": md},
        }]})
    cluster: Json = {
        "name": chain.name,
        "type": "STATIC" if all_ip else "STRICT_DNS",
        # Over ADS its endpoints come by EDS (split_eds): a target's address changes without a CDS update.
        "metadata": {"filter_metadata": {MD_NS: {"eds": all_ip}}},
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _secs(min(p.connect_timeout_s for p in chain.providers)),
        # A translated target's adapter (and the alias step) buffers the whole request, as extauth does.
        "per_connection_buffer_limit_bytes": config.gateway.max_request_bytes if config.aliases or any(
            p.kind != ProviderKind.anthropic for p in chain.providers)
        else config.gateway.downstream.per_connection_buffer_bytes,
        "load_assignment": {"cluster_name": chain.name, "endpoints": levels},
        # A level takes all the load while its host is healthy; no spill-over by health percentages.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        # Envoy allows 3 concurrent retries per cluster by default: in an outage every request
        # retries at once, and the rest would fail instead of failing over.
        "circuit_breakers": {"thresholds": [{"max_retries": 100_000}]},
        "typed_extension_protocol_options": {HTTP_OPTS_KEY: {
            "@type": HTTP_OPTS,
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": _upstream_filters(chain, config, _with_alias(config, _filters(chain, runtime, meter_lua))),
        }},
    }
    if sockets:
        cluster["transport_socket_matches"] = sockets
    return cluster


def chain_clusters(config: GatewayConfig, runtime: Runtime, meter_lua: str) -> list[Json]:
    return [chain_cluster(c, runtime, config, meter_lua) for c in chains(config)]


def retry_policy(chain: Chain) -> Json:
    f = chain.failover
    on = ["retriable-status-codes", "connect-failure", "refused-stream"]
    if f.on_reset:
        on.append("reset")
    policy: Json = {
        "retry_on": ",".join(on),
        "retriable_status_codes": sorted(set(f.on_status)),
        "num_retries": len(chain.providers) - 1,
        "retry_priority": {"name": PREVIOUS_PRIORITIES, "typed_config": {
            "@type": T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
            "update_frequency": 1}},
        # No back-off between targets: the next one is another provider, not the same one again.
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
    }
    if f.per_try_timeout_s is not None:  # a timed-out try counts as a reset ("reset" in retry_on)
        policy["per_try_timeout"] = _secs(f.per_try_timeout_s)
    return policy


def chain_routes(config: GatewayConfig, base: Json, endpoint_route: Json) -> list[Json]:
    """For one Messages-like endpoint route: a route per chain (matched on the cluster extauth
    named) with the chain's retry policy and total timeout, placed before the endpoint's own."""
    out = []
    for c in chains(config):
        route = dict(base)
        route.pop("cluster_header", None)
        route["cluster"] = c.name
        route["retry_policy"] = retry_policy(c)
        if c.failover.total_timeout_s is not None:
            route["timeout"] = _secs(c.failover.total_timeout_s)
        match = dict(endpoint_route["match"])
        match["headers"] = [*match.get("headers", []),
                            {"name": H_CLUSTER, "string_match": {"exact": c.name}}]
        out.append({**endpoint_route, "name": f"{endpoint_route['name']}.{c.name}", "match": match,
                    "route": route})
    return out


def split_eds(clusters: list[Json]) -> tuple[list[Json], list[Json]]:
    """Clusters marked `ccr.eds` become EDS clusters over ADS; their load assignments are returned
    separately (ClusterLoadAssignment resources), named as the cluster."""
    out, assignments = [], []
    for c in clusters:
        if not c.get("metadata", {}).get("filter_metadata", {}).get(MD_NS, {}).get("eds"):
            out.append(c)
            continue
        c = dict(c)
        assignments.append(c.pop("load_assignment"))
        c.pop("dns_lookup_family", None)
        c["type"] = "EDS"
        c["eds_cluster_config"] = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
        out.append(c)
    return out, assignments

