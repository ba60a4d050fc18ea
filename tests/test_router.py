"""The router's generated Envoy config, checked by the real Envoy binary, and its ADS protocol."""

import asyncio
import functools
import json
import re
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from ccr import metrics
from ccr.config import load_config
from ccr.credentials import write_secret
from ccr.runtime import Runtime, UpstreamOverride
from ccr.supervisor import envoy_binary, render_bootstrap
from extauth.endpoints import ENDPOINTS, Endpoint
from router import authz_http, resources
from router.xds import CDS, LDS, RDS, AdsServer, Snapshot

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def _credential_file() -> str:
    """An SDS file for the example config's provider (Envoy's validate mode loads it)."""
    return str(write_secret(Path(tempfile.mkdtemp()) / "anthropic.json", "anthropic", "sk-ant-test"))


def _runtime(**kw: object) -> Runtime:
    kw.setdefault("provider_credentials", {"anthropic": _credential_file()})
    return Runtime(config_path=str(REPO / "ccr.example.yaml"), run_dir="/tmp", postgres_dsn="postgresql://x",
                   redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                   adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080, **kw)


def _validate(tmp_path: Path, doc: dict | str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "envoy.json"
    f.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("emulated", [False, True], ids=["tls-provider", "emulator-provider"])
def test_generated_config_passes_envoy_validate(tmp_path: Path, emulated: bool) -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    overrides = {"anthropic": UpstreamOverride(endpoint="http://127.0.0.1:9999", api_key_env="K")} if emulated else {}
    doc = resources.static_bootstrap(cfg, _runtime(upstream_overrides=overrides), 18080)
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "OK" in r.stdout


def test_envoy_rejects_a_broken_resource(tmp_path: Path) -> None:
    """The validate check can fail: a cluster without a name is refused."""
    cfg = load_config(REPO / "ccr.example.yaml")
    doc = resources.static_bootstrap(cfg, _runtime(), 18080)
    doc["static_resources"]["clusters"][0]["name"] = ""
    assert _validate(tmp_path, doc).returncode != 0


def test_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    text = render_bootstrap("ccr-test", "127.0.0.1", 0, "127.0.0.1:7005")
    f = tmp_path / "bootstrap.yaml"
    f.write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]
    # Only identity, admin, the ADS cluster and the overload manager live in the bootstrap.
    doc = yaml.safe_load(text)
    assert set(doc) == {"node", "admin", "dynamic_resources", "static_resources", "overload_manager"}
    assert set(doc["static_resources"]) == {"clusters"} and len(doc["static_resources"]["clusters"]) == 1


def test_body_limits_are_raised_together() -> None:
    """Whole bodies up to max_request_bytes reach extauth; client and provider connections
    stream through the (much smaller) per-connection buffer."""
    cfg = load_config(REPO / "ccr.example.yaml")
    res = resources.build(cfg, _runtime(), 18080)
    limit, buf = cfg.gateway.max_request_bytes, cfg.gateway.downstream.per_connection_buffer_bytes
    assert buf < limit
    assert res.listeners[0]["per_connection_buffer_limit_bytes"] == buf
    hcm = res.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    body_authz = next(f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    assert body_authz["with_request_body"]["max_request_bytes"] == limit
    by_name = {c["name"]: c["per_connection_buffer_limit_bytes"] for c in res.clusters}
    assert by_name.pop("provider_anthropic") == buf
    assert by_name.pop("provider_anthropic_objects") == buf
    assert by_name.pop("provider_anthropic_translate") == limit  # the adapter gets whole request bodies
    assert set(by_name.values()) == {limit}  # the gRPC services get whole bodies in one message


def test_route_table_is_deny_by_default() -> None:
    """One route per registry endpoint (method + path), then a 404 for everything else that
    skips authorization; paths are normalised and client x-ccr-* stripped before any filter."""
    cfg = load_config(REPO / "ccr.example.yaml")
    res = resources.build(cfg, _runtime(), 18080)
    routes = res.routes[0]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes] == [e.name for e in ENDPOINTS] + ["not_found"]
    for r, e in zip(routes, ENDPOINTS, strict=False):
        m = r["match"]
        assert m["headers"] == [{"name": ":method", "string_match": {"exact": e.method}}]
        assert m.get("path") == e.template or re.fullmatch(m["safe_regex"]["regex"], concrete_path(e))
        assert "prefix" not in m and r["route"]["cluster_header"] == "x-ccr-cluster"
    last = routes[-1]
    assert last["match"] == {"prefix": "/"} and last["direct_response"]["status"] == 404
    assert last["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    hcm = res.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] and hcm["merge_slashes"]
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    # The first early mutation, before anything else may add an x-ccr-* of the gateway's own.
    early = hcm["early_header_mutation_extensions"][0]
    assert early["typed_config"]["mutations"] == [{"remove_on_match": {"key_matcher": {"prefix": "x-ccr-"}}}]


def concrete_path(e: Endpoint) -> str:
    return re.sub(r"\{[a-z_]+\}", "id_01", e.template)


async def _ads_exchange() -> None:
    cfg = load_config(REPO / "ccr.example.yaml")
    ads = AdsServer(Snapshot.of(resources.build(cfg, _runtime(), 18080)))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            reqs: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

            async def gen():  # type: ignore[no-untyped-def]
                while True:
                    yield await reqs.get()

            call = stub.StreamAggregatedResources(gen())
            node = {"node": {"id": "n1"}}
            await reqs.put(discovery_pb2.DiscoveryRequest(type_url=CDS, **node))
            cds = await asyncio.wait_for(call.read(), 5)
            names = set()
            for r in cds.resources:
                c = cluster_pb2.Cluster()
                r.Unpack(c)
                names.add(c.name)
            assert {"ccr_extauth", "ccr_ratelimit", "ccr_adapter", "ccr_accesslog", "provider_anthropic",
                    "provider_anthropic_objects", "provider_anthropic_translate"} == names
            v1 = cds.version_info
            # ACK, then subscribe to LDS and RDS.
            await reqs.put(discovery_pb2.DiscoveryRequest(type_url=CDS, version_info=v1,
                                                          response_nonce=cds.nonce, **node))
            await reqs.put(discovery_pb2.DiscoveryRequest(type_url=LDS, **node))
            lds = await asyncio.wait_for(call.read(), 5)
            assert lds.type_url == LDS and len(lds.resources) == 1
            await reqs.put(discovery_pb2.DiscoveryRequest(type_url=RDS, resource_names=["ccr_routes"], **node))
            rds = await asyncio.wait_for(call.read(), 5)
            assert rds.type_url == RDS and len(rds.resources) == 1
            await asyncio.sleep(0.05)
            assert ads.acked["n1"][CDS] == v1
            # A NACK is not answered with the same version again, and is counted.
            nacks = metrics.REGISTRY.get_sample_value("ccr_xds_nacks_total", {"type": "Listener"}) or 0.0
            await reqs.put(discovery_pb2.DiscoveryRequest(
                type_url=LDS, version_info="", response_nonce=lds.nonce, **node,
                error_detail=status_pb2.Status(code=3, message="bad listener")))
            pending = asyncio.ensure_future(call.read())
            await asyncio.sleep(0.3)
            assert not pending.done()
            assert metrics.REGISTRY.get_sample_value("ccr_xds_nacks_total", {"type": "Listener"}) == nacks + 1
            # A config change is pushed to the stream for every subscribed type.
            cfg2 = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"request_timeout_s": 30.0})})
            await ads.update(Snapshot.of(resources.build(cfg2, _runtime(), 18080)))
            seen = set()
            first = await asyncio.wait_for(pending, 5)
            assert first.version_info != v1
            seen.add(first.type_url)
            while len(seen) < 3:
                resp = await asyncio.wait_for(call.read(), 5)
                if resp is grpc.aio.EOF:
                    break
                assert resp.version_info != v1
                seen.add(resp.type_url)
            assert seen == {CDS, LDS, RDS}
            assert metrics.REGISTRY.get_sample_value(
                "ccr_xds_version_info", {"type": "Cluster", "version": first.version_info}) == 1
            assert metrics.REGISTRY.get_sample_value("ccr_xds_version_info", {"type": "Cluster", "version": v1}) is None
            call.cancel()
    finally:
        await server.stop(0)


def test_ads_serves_acks_nacks_and_pushes_updates() -> None:
    asyncio.run(_ads_exchange())


def test_adapter_cluster_speaks_mtls_to_the_adapter_identity_only(tmp_path: Path) -> None:
    """Envoy presents its run identity and accepts only the adapter's; Envoy itself validates it."""
    from ccr.contract import ID_ADAPTER, ID_ENVOY
    from ccr.pki import issue_run_pki

    pki = issue_run_pki(tmp_path / "pki", [ID_ENVOY, ID_ADAPTER])
    cfg = load_config(REPO / "ccr.example.yaml")
    doc = resources.static_bootstrap(cfg, _runtime(mtls=pki), 18080)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    tls = clusters[resources.ADAPTER]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://ccr.local/adapter"}}]
    assert tls["validation_context"]["trusted_ca"] == {"filename": pki.ca}
    assert tls["tls_certificates"] == [{"certificate_chain": {"filename": pki.identity(ID_ENVOY).cert},
                                        "private_key": {"filename": pki.identity(ID_ENVOY).key}}]
    # Services without a run identity stay as they are (until issue 10 moves every hop).
    assert "transport_socket" not in clusters[resources.EXTAUTH]
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]


def test_only_the_objects_cluster_calls_the_adapter() -> None:
    """Messages clusters call no Python on the way (the Lua meter reads usage natively); Batches and
    Files go to the provider's objects cluster, whose first upstream filter is the adapter."""
    cfg = load_config(REPO / "ccr.example.yaml")
    clusters = {c["name"]: c for c in resources.build(cfg, _runtime(), 18080).clusters}

    def filters(name: str) -> list[str]:
        opts = clusters[name]["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]
        return [f["name"] for f in opts["http_filters"]]

    tail = ["envoy.filters.http.header_mutation", "envoy.filters.http.credential_injector",
            "envoy.filters.http.upstream_codec"]
    assert filters("provider_anthropic") == ["envoy.filters.http.lua", *tail]
    assert filters("provider_anthropic_objects") == ["envoy.filters.http.ext_proc", *tail]


def test_replicated_services_pass_envoy_validate(tmp_path: Path) -> None:
    """`ccr serve` deployments: replicas by address or DNS name, health-checked, decision calls retried."""
    # Envoy asks the rate limit service itself (limits.admission: ratelimit): the budgets' filter is there too.
    cfg = load_config(REPO / "ccr.example.yaml")
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"admission": "ratelimit"})})
    eps = {"extauth": ["extauth.ccr.svc.cluster.local:9001"], "ratelimit": ["10.0.0.5:9002", "10.0.0.6:9002"],
           "adapter": ["127.0.0.1:7003"], "accesslog": ["127.0.0.1:7004"]}
    doc = resources.static_bootstrap(cfg, _runtime(service_endpoints=eps), 18080)
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert clusters[resources.EXTAUTH]["type"] == "STRICT_DNS"
    assert clusters[resources.RATELIMIT]["type"] == "STATIC"
    assert len(clusters[resources.RATELIMIT]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    for name in (resources.EXTAUTH, resources.RATELIMIT, resources.ADAPTER, resources.ACCESSLOG):
        assert clusters[name]["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    text = json.dumps(doc)
    # Both ext_authz filters and both rate limit filters (the limits, and the budgets: ccr.spend).
    assert text.count('"retry_policy"') == 4
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (spend,) = [f for f in hcm["http_filters"] if f["name"] == "ccr.spend"]
    assert spend["typed_config"]["rate_limit_service"]["grpc_service"]["retry_policy"]
    # The default (limits.admission: extauth): extauth reserves budgets in its Check; no ccr.spend filter.
    default = json.dumps(resources.static_bootstrap(load_config(REPO / "ccr.example.yaml"),
                                                    _runtime(service_endpoints=eps), 18080))
    assert default.count('"retry_policy"') == 3 and '"ccr.spend"' not in default
    # One local replica (`ccr up`): nothing to retry onto, no health checks.
    single = resources.static_bootstrap(cfg, _runtime(), 18080)
    assert '"retry_policy"' not in json.dumps(single) and '"health_checks"' not in json.dumps(single)


def test_bootstrap_reaches_router_replicas_by_name(tmp_path: Path) -> None:
    text = render_bootstrap("ccr-test", "127.0.0.1", 0, ["router.ccr.svc:7005", "10.1.2.3:7005"])
    f = tmp_path / "bootstrap.yaml"
    f.write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]
    xds = yaml.safe_load(text)["static_resources"]["clusters"][0]
    assert xds["type"] == "STRICT_DNS" and len(xds["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def _http_transport_config(**result_names: list[str]):
    from ccr.config import GatewayConfig

    data = load_config(REPO / "ccr.example.yaml").model_dump(mode="json")
    data["services"]["authz_transport"] = "http"
    data["policy"]["result_names"] = result_names
    return GatewayConfig.model_validate(data)


def test_http_authz_transport_config_passes_envoy_validate(tmp_path: Path) -> None:
    cfg = _http_transport_config(headers=["x-tier"], response_headers=["x-why"], metadata=["tier_flag"])
    doc = resources.static_bootstrap(cfg, _runtime(extauth_http="127.0.0.1:7005"), 18080)
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]
    text = json.dumps(doc)
    assert '"http_service"' in text and '"grpc_service": {"envoy_grpc": {"cluster_name": "ccr_extauth"' not in text


def test_http_authz_transport_needs_the_front_address() -> None:
    with pytest.raises(ValueError, match="HTTP front"):
        resources.clusters(_http_transport_config(), _runtime())


def test_replicated_http_fronts_pass_envoy_validate(tmp_path: Path) -> None:
    """`ccr serve` with authz_transport: http: extauth's HTTP fronts as replicas, health-checked on the
    front's own health path, outlier-ejected, and both ext_authz checks retried on connection loss with
    their whole timeout per attempt; the real Envoy accepts every field."""
    from ccr.contract import AUTHZ_HTTP_HEALTH_PATH
    from ccr.runtime import EXTAUTH_HTTP

    cfg = _http_transport_config(headers=["x-tier"])
    eps = {"extauth": ["10.0.0.5:9001", "10.0.0.6:9001"], EXTAUTH_HTTP: ["10.0.0.5:9011", "10.0.0.6:9011"],
           "ratelimit": ["127.0.0.1:7002"], "adapter": ["127.0.0.1:7003"], "accesslog": ["127.0.0.1:7004"]}
    doc = resources.static_bootstrap(cfg, _runtime(extauth_http="10.0.0.5:9011", service_endpoints=eps), 18080)
    r = _validate(tmp_path, doc)
    assert r.returncode == 0, r.stderr[-4000:]
    front = {c["name"]: c for c in doc["static_resources"]["clusters"]}[authz_http.CLUSTER]
    assert front["type"] == "STATIC"
    assert [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in front["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [9011, 9011]
    (check,) = front["health_checks"]
    assert check["http_health_check"]["path"] == AUTHZ_HTTP_HEALTH_PATH and "grpc_health_check" not in check
    assert front["outlier_detection"]["max_ejection_percent"] == 50
    assert front["common_lb_config"]["healthy_panic_threshold"] == {"value": 50}
    (limits,) = front["circuit_breakers"]["thresholds"]
    assert limits["max_retries"] >= 1000 and limits["max_connections"] == 65536
    services = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "server_uri" in node:
                services.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc["static_resources"]["listeners"])
    assert len(services) == 2  # identity-first and the full check
    for svc in services:
        retry = svc["retry_policy"]
        assert retry["retry_on"] == "connect-failure,reset"
        assert retry["retry_back_off"]["max_interval"] == svc["server_uri"]["timeout"]
    # By DNS name: STRICT_DNS. One local front (`ccr up`): no checks, no retries.
    named = resources.clusters(cfg, _runtime(extauth_http="extauth.ccr.svc:9011",
                                             service_endpoints={**eps, EXTAUTH_HTTP: ["extauth.ccr.svc:9011"]}))
    assert {c["name"]: c for c in named}[authz_http.CLUSTER]["type"] == "STRICT_DNS"
    single = resources.static_bootstrap(cfg, _runtime(extauth_http="127.0.0.1:7005"), 18080)
    assert '"retry_policy"' not in json.dumps(single) and '"health_checks"' not in json.dumps(single)
