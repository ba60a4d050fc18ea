"""Failover chains and residency as config, as routing decisions and as Envoy resources (checked by
the real Envoy binary); tests/test_e2e_failover.py runs them through the whole gateway."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccr import routing
from ccr.config import GatewayConfig, Model
from ccr.contract import CHAIN_REQUEST_NS, H_CLUSTER
from ccr.credentials import write_secret
from ccr.runtime import Runtime
from ccr.supervisor import envoy_binary
from router import resources

REPO = Path(__file__).resolve().parent.parent


def _config(**model: Any) -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["providers"] = [
        {"name": "us1", "endpoint": "https://api.anthropic.com", "api_key_env": "A", "region": "us"},
        {"name": "eu1", "endpoint": "https://eu.example.com", "api_key_env": "B", "region": "eu"},
        {"name": "us2", "endpoint": "http://127.0.0.1:9001", "api_key_env": "C", "region": "us"},
        {"name": "oss", "kind": "openai", "endpoint": "http://127.0.0.1:9002", "region": "us"},
    ]
    doc["models"] = [{"match": "claude-*", "targets": ["us1", "eu1", "us2"], **model}, {"match": "oss-*",
                                                                                      "provider": "oss"}]
    return GatewayConfig.model_validate(doc)


def _runtime() -> Runtime:
    d = Path(tempfile.mkdtemp())
    creds = {n: str(write_secret(d / f"{n}.json", n, "k")) for n in ("us1", "eu1", "us2", "oss")}
    return Runtime(config_path=str(REPO / "ccr.example.yaml"), run_dir="/tmp", postgres_dsn="postgresql://x",
                   redis_url="redis://x", extauth="127.0.0.1:7001", ratelimit="127.0.0.1:7002",
                   adapter="127.0.0.1:7003", accesslog="127.0.0.1:7004", listen_port=18080,
                   provider_credentials=creds)


def test_targets_config() -> None:
    assert Model(match="m", targets=["a", "b"]).provider == "a"
    with pytest.raises(ValueError, match="must be the first of targets"):
        Model(match="m", provider="b", targets=["a", "b"])
    with pytest.raises(ValueError, match="at most once"):
        Model(match="m", targets=["a", "a"])
    with pytest.raises(ValueError, match="errors the request caused"):
        Model(match="m", provider="a", failover={"on_status": [429, 451]})
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        _config(targets=["us1", "nope"])


def test_route_keeps_a_bound_request_in_its_region() -> None:
    cfg = _config()
    assert routing.route(cfg, 0, "anthropic", None) == ("us1", "chain_0_any")
    assert routing.route(cfg, 0, "anthropic", "us") == ("us1", "chain_0_us")
    assert routing.route(cfg, 0, "anthropic", "eu") == ("eu1", "provider_eu1")  # one target: its own cluster
    assert routing.route(cfg, 0, "anthropic", "ap") is None  # nowhere to go: refused, never elsewhere
    assert routing.route(cfg, 1, "anthropic", "eu") is None
    chains = {c.name: [p.name for p in c.providers] for c in routing.chains(cfg)}
    assert chains == {"chain_0_any": ["us1", "eu1", "us2"], "chain_0_us": ["us1", "us2"]}


def _resources(cfg: GatewayConfig) -> resources.Resources:
    return resources.build(cfg, _runtime(), 18080)


def test_chain_cluster_levels_credentials_and_tls() -> None:
    res = _resources(_config())
    by_name = {c["name"]: c for c in res.clusters}
    us = by_name["chain_0_us"]
    levels = us["load_assignment"]["endpoints"]
    assert [lv["priority"] for lv in levels] == [0, 1]
    assert [lv["lb_endpoints"][0]["metadata"]["filter_metadata"]["ccr"]["provider"] for lv in levels] == ["us1", "us2"]
    # Only the TLS endpoint gets the TLS socket, verified for its own name.
    (match,) = us["transport_socket_matches"]
    assert match["match"] == {"provider": "us1"}
    assert match["transport_socket"]["typed_config"]["sni"] == "api.anthropic.com"
    filters = us["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"]
    guarded = [f for f in filters if f["name"].startswith("ccr.chain.") and f["name"] != "ccr.chain.strip"]
    assert [f["name"] for f in guarded] == ["ccr.chain.us1", "ccr.chain.us2"]  # no eu credential in the us chain
    assert filters[-1]["name"] == "envoy.filters.http.upstream_codec"


def test_chain_routes_retry_only_on_the_models_statuses() -> None:
    res = _resources(_config(failover={"on_status": [529, 503], "per_try_timeout_s": 5, "total_timeout_s": 30}))
    routes = res.routes[0]["virtual_hosts"][0]["routes"]
    names = [r.get("name") for r in routes]
    i = names.index("messages.create")
    assert names[i - 2:i] == ["messages.create.chain_0_any", "messages.create.chain_0_us"]
    r = routes[i - 1]
    assert {"name": H_CLUSTER, "string_match": {"exact": "chain_0_us"}} in r["match"]["headers"]
    assert r["route"]["cluster"] == "chain_0_us" and "cluster_header" not in r["route"]
    policy = r["route"]["retry_policy"]
    assert policy["retriable_status_codes"] == [503, 529]
    assert "5xx" not in policy["retry_on"] and "4xx" not in policy["retry_on"]
    assert policy["num_retries"] == 1 and policy["per_try_timeout"] == "5.000s"
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert r["route"]["timeout"] == "30.000s"
    # Same rate limits and header removal as the endpoint's own route.
    assert r["typed_per_filter_config"] == routes[i]["typed_per_filter_config"]


def test_chain_config_passes_envoy_validate(tmp_path: Path) -> None:
    doc = resources.static_bootstrap(_config(), _runtime(), 18080)
    f = tmp_path / "envoy.json"
    f.write_text(json.dumps(doc))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]


def test_split_is_weighted_sticky_per_principal_and_kept_in_region() -> None:
    doc_cfg = _config()
    split = Model(match="ab-*", split={"us1": 90, "eu1": 10})
    assert split.provider == "us1" and split.chain == ["us1", "eu1"]
    with pytest.raises(ValueError, match="split replaces provider and targets"):
        Model(match="ab-*", split={"us1": 1}, targets=["us1", "eu1"])
    cfg = doc_cfg.model_copy(update={"models": [split, *doc_cfg.models]})
    picks = [routing.route(cfg, 0, "anthropic", None, f"principal-{i}") for i in range(2000)]
    share = sum(1 for p in picks if p == ("us1", "provider_us1")) / len(picks)
    assert 0.86 < share < 0.94  # 90/10 by weight
    assert {p for p in picks} == {("us1", "provider_us1"), ("eu1", "provider_eu1")}
    # The same principal always gets the same variant.
    assert all(routing.route(cfg, 0, "anthropic", None, f"principal-{i}") == picks[i] for i in range(200))
    # A bound request gets a variant in its region only; none there: refused.
    assert {routing.route(cfg, 0, "anthropic", "eu", f"principal-{i}") for i in range(50)} == {("eu1", "provider_eu1")}
    assert routing.route(cfg, 0, "anthropic", "ap", "principal-1") is None
    assert "chain_0_any" not in {c.name for c in routing.chains(cfg)}  # a split has no failover chain


# -- chains across provider kinds, aliases ---------------------------------------------------------


def _mixed(targets: list[str], **extra: Any) -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["providers"] = [
        {"name": "us1", "endpoint": "https://api.anthropic.com", "api_key_env": "A", "region": "us"},
        {"name": "us2", "endpoint": "http://127.0.0.1:9001", "api_key_env": "C", "region": "us"},
        {"name": "oss", "kind": "openai", "endpoint": "http://127.0.0.1:9002", "region": "us"},
        {"name": "bed", "kind": "bedrock", "endpoint": "http://127.0.0.1:9003", "region": "us",
         "aws_access_key_id_env": "K", "aws_secret_access_key_env": "S"},
    ]
    doc["models"] = [{"match": "claude-*", "targets": targets}]
    doc.update(extra)
    return GatewayConfig.model_validate(doc)


def test_a_chain_may_hold_translated_targets_in_any_order() -> None:
    ok = _mixed(["us1", "us2", "bed"])
    assert routing.route(ok, 0, "anthropic", None) == ("us1", "chain_0_any")
    assert routing.route(ok, 0, "anthropic", "us") == ("us1", "chain_0_us")
    # count_tokens is not translated: never a chain holding Bedrock, the first target's own cluster.
    assert routing.route(ok, 0, "anthropic", None, translatable=False) == ("us1", "provider_us1")
    assert routing.route(_mixed(["us1", "us2"]), 0, "anthropic", None, translatable=False) == ("us1", "chain_0_any")
    # Other client schemas always need the adapter: the first target's own cluster, no failover.
    assert routing.route(ok, 0, "openai", None) == ("us1", "provider_us1_translate")
    # A translated target first, or several of them: a chain too (router/chain_restore.lua restores the
    # client's headers per attempt).
    for targets in (["bed", "us1"], ["us1", "oss", "bed"], ["bed", "oss"]):
        cfg = _mixed(targets)
        assert [c.name for c in routing.chains(cfg)] == ["chain_0_any", "chain_0_us"]
        assert routing.route(cfg, 0, "anthropic", None) == (targets[0], "chain_0_any")
        first = cfg.provider(targets[0])
        assert routing.route(cfg, 0, "anthropic", None, translatable=False) == (
            first.name, first.cluster_for("anthropic"))


def test_the_restore_step_comes_first_only_on_chains_that_translate(tmp_path: Path) -> None:
    lua = (REPO / "router" / "chain_restore.lua").read_text()
    assert f'local NS = "{CHAIN_REQUEST_NS}"' in lua
    cfg = _mixed(["bed", "oss", "us1"])
    rt = _runtime()
    res = resources.build(cfg, rt, 18080)
    names = [f["name"] for f in {c["name"]: c for c in res.clusters}["chain_0_any"][
        "typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"]]
    assert names == ["ccr.chain.restore", "envoy.filters.http.header_mutation", "ccr.chain.meter",
                     "ccr.chain.attempt", "ccr.chain.us1", "ccr.chain.bed.adapter", "ccr.chain.oss.adapter",
                     "ccr.chain.oss.key", "ccr.chain.strip", "envoy.filters.http.upstream_codec"]
    only_translated = resources.build(_mixed(["bed", "oss"]), rt, 18080)
    names = [f["name"] for f in {c["name"]: c for c in only_translated.clusters}["chain_0_any"][
        "typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"]]
    assert "ccr.chain.meter" not in names and names[0] == "ccr.chain.restore"
    anthropic_only = resources.build(_mixed(["us1", "us2"]), rt, 18080)
    assert "ccr.chain.restore" not in json.dumps(anthropic_only.clusters)
    for c in (cfg, _mixed(["bed", "oss"])):
        f = tmp_path / "envoy.json"
        f.write_text(json.dumps(resources.static_bootstrap(c, rt, 18080)))
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-4000:]


def test_mixed_chain_filters_guard_each_target_and_pass_envoy_validate(tmp_path: Path) -> None:
    cfg = _mixed(["us1", "us2", "bed"], aliases={"claude-x": "claude-sonnet-4-5-20250929"})
    rt = _runtime()  # no credential file for bed: Bedrock is signed by the adapter
    res = resources.build(cfg, rt, 18080)
    chain = {c["name"]: c for c in res.clusters}["chain_0_any"]
    filters = chain["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"]
    names = [f["name"] for f in filters]
    assert names == ["ccr.chain.restore", "ccr.alias", "envoy.filters.http.header_mutation", "ccr.chain.meter",
                     "ccr.chain.attempt", "ccr.chain.us1", "ccr.chain.us2", "ccr.chain.bed.adapter", "ccr.chain.strip",
                     "envoy.filters.http.upstream_codec"]
    adapter = filters[names.index("ccr.chain.bed.adapter")]["typed_config"]
    assert adapter["extension_config"]["typed_config"]["grpc_service"]["initial_metadata"] == [
        {"key": "x-ccr-provider", "value": "bed"}, {"key": "x-ccr-translate", "value": "1"}]
    # The adapter buffers the request: so may the chain.
    assert chain["per_connection_buffer_limit_bytes"] == cfg.gateway.max_request_bytes
    f = tmp_path / "envoy.json"
    f.write_text(json.dumps(resources.static_bootstrap(cfg, rt, 18080)))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f), "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]


def test_aliases_resolve_in_one_place_and_bad_ones_are_refused() -> None:
    cfg = _mixed(["us1", "us2"], aliases={"claude-x": "claude-sonnet-4-5-20250929"})
    r = routing.resolve(cfg, "claude-x")
    assert r is not None and (r.requested, r.served, r.model_index, r.is_alias) == (
        "claude-x", "claude-sonnet-4-5-20250929", 0, True)
    same = routing.resolve(cfg, "claude-opus-4-1")
    assert same is not None and not same.is_alias and same.served == "claude-opus-4-1"
    assert routing.resolve(cfg, "gpt-4o") is None
    for aliases, why in (({"a": "b", "b": "claude-1"}, "is itself an alias"), ({"a": "gpt-4o"}, "matches no"),
                         ({"claude-1": "claude-1"}, "cannot resolve to itself"), ({"a.b": "claude-1"}, "pattern")):
        with pytest.raises(ValueError, match=why):
            _mixed(["us1"], aliases=aliases)
    with pytest.raises(ValueError, match="do not match"):
        Model(match="claude-haiku-*", provider="us1", listed=["claude-opus-4-1"])
