"""What each API route sends to the ratelimit service (router/rate_limits.py), what the planner
makes of it (ratelimit/limits.py), and that Envoy accepts the generated config."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import struct_pb2

from ccr.config import GatewayConfig, Limits, parse_config
from ccr.contract import (
    AUTHZ_GROUP_LIST,
    AUTHZ_NS,
    AUTHZ_SPEND,
    AUTHZ_USER_ID,
    H_BATCH_REQUESTS,
    H_PRINCIPAL_ID,
    H_REQUEST_ID,
    RL_USAGE_KINDS,
    USAGE_NS,
)
from extauth.endpoints import ENDPOINTS
from ratelimit.envoy_config import load_dir
from ratelimit.limits import LimitPlanner
from router import resources
from router.rate_limits import RATELIMIT_FILTER, RATELIMIT_PER_ROUTE, SPEND_FILTER, request_time_requests
from tests.test_router import _runtime, _validate

REPO = Path(__file__).resolve().parent.parent

RULES: list[dict[str, Any]] = [
    {"name": "p", "per": "principal", "amount": 10},
    {"name": "k", "per": "key", "amount": 10},
    {"name": "u", "per": "user", "amount": 10},
    {"name": "g", "per": "group", "amount": 10, "metric": "tokens"},
    {"name": "t", "per": "tenant", "amount": 10},
    {"name": "s", "per": "spiffe_id", "amount": 10, "algorithm": "token_bucket", "burst": 3},
    {"name": "m", "per": "model", "value": "claude-x", "amount": 10, "unit": "day"},
]


def _config(admission: str = "ratelimit", **limits: Any) -> GatewayConfig:
    """These tests read what Envoy sends the rate limit service: the `ratelimit` admission path unless
    said otherwise (with `extauth`, the default, extauth evaluates the same lists: tests at the end)."""
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["limits"] = {"requests_per_minute": 60, "admission": admission, **limits}
    return parse_config(doc)


def _routes(cfg: GatewayConfig) -> dict[str, dict[str, Any]]:
    rc = resources.route_config(cfg)
    return {r.get("name"): r for r in rc["virtual_hosts"][0]["routes"]}


def _limits(route: dict[str, Any]) -> list[dict[str, Any]]:
    return route["typed_per_filter_config"][RATELIMIT_FILTER]["rate_limits"]  # type: ignore[no-any-return]


def _keys(rl: dict[str, Any]) -> list[str]:
    out = []
    for a in rl["actions"]:
        kind, body = next(iter(a.items()))
        out.append(body.get("descriptor_key", kind))
    return out


def test_without_rules_only_the_principal_descriptor() -> None:
    routes = _routes(_config())
    for e in ENDPOINTS:
        (only,) = _limits(routes[e.name])
        assert _keys(only) == ["principal"]
        assert only["limit"]["dynamic_metadata"]["metadata_key"] == {"key": AUTHZ_NS, "path": [{"key": "rpm"}]}
        assert "rate_limits" not in routes[e.name]["route"]  # Envoy would ignore it next to the filter's own


def test_facts_from_metadata_and_usage_at_stream_end() -> None:
    routes = _routes(_config(rules=RULES))
    msgs = _limits(routes["messages.create"])
    at_request = [rl for rl in msgs if not rl.get("apply_on_stream_done")]
    assert [_keys(rl) for rl in at_request] == [["principal"], ["key_id"], ["user"], ["groups"], ["tenant"],
                                                ["spiffe_id"], ["model"]]
    for rl in at_request[1:]:  # read from what extauth decided, never from a header
        md = rl["actions"][0]["metadata"]
        assert md["source"] == "DYNAMIC" and md["metadata_key"]["key"] == AUTHZ_NS and not md["skip_if_absent"]
    at_end = [rl for rl in msgs if rl.get("apply_on_stream_done")]
    assert [rl["hits_addend"]["format"] for rl in at_end] == [
        f"%DYNAMIC_METADATA({USAGE_NS}:{f})%" for f in
        ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
    for rl in at_end:
        assert _keys(rl) == ["ccr_usage", "principal", "key_id", "user", "groups", "tenant", "spiffe_id", "model"]
        assert all(a["metadata"]["skip_if_absent"] for a in rl["actions"][2:])
    # Only Messages create is charged at stream end; a batch create counts its requests as hits.
    assert not any(rl.get("apply_on_stream_done") for rl in _limits(routes["messages.count_tokens"]))
    batch = _limits(routes["batches.create"])
    assert all(rl["hits_addend"]["format"] == "%REQ(x-ccr-batch-requests)%" for rl in batch)


def test_only_the_facts_in_use_are_sent() -> None:
    routes = _routes(_config(rules=[{"name": "t", "per": "tenant", "amount": 5}]))
    assert [_keys(rl) for rl in _limits(routes["messages.create"])] == [["principal"], ["tenant"]]
    routes = _routes(_config(envoy_config_dir="rls"))  # YAML rules may use any of them
    assert len(_limits(routes["messages.create"])) == 7


def test_spend_descriptor_on_the_spend_filter_of_priced_routes_only() -> None:
    """Budgets are asked by their own filter (ccr.spend): its RateLimitPerRoute carries the spend
    descriptor on Messages creates, batch creates and batch results only; the limits filter never sees it."""
    cfg = _config(rules=RULES)
    assert cfg.spend.enabled
    routes = _routes(cfg)
    msgs = routes["messages.create"]["typed_per_filter_config"]
    (spend,) = msgs[SPEND_FILTER]["rate_limits"]
    assert msgs[SPEND_FILTER]["@type"] == RATELIMIT_PER_ROUTE
    assert _keys(spend) == ["spend", "request_id"]
    md = spend["actions"][0]["metadata"]  # extauth's worst case; absent (no budget applies): no call
    assert md["source"] == "DYNAMIC" and md["metadata_key"] == {"key": AUTHZ_NS, "path": [{"key": AUTHZ_SPEND}]}
    assert not md.get("skip_if_absent")
    assert spend["actions"][1]["request_headers"]["header_name"] == "x-request-id"
    for name in ("batches.results", "batches.create"):
        assert routes[name]["typed_per_filter_config"][SPEND_FILTER]["rate_limits"] == [spend], name
    for name in ("messages.count_tokens", "batches.get", "batches.cancel", "models.list"):
        assert SPEND_FILTER not in routes[name]["typed_per_filter_config"], name
    for e in ENDPOINTS:  # the limits' own list: stage 0 only, never the spend descriptor
        assert all("spend" not in _keys(rl) and "stage" not in rl for rl in _limits(routes[e.name])), e.name
    hcm_filters = [f["name"] for f in resources.listener(cfg, 18080)["filter_chains"][0]["filters"][0]
                   ["typed_config"]["http_filters"]]
    assert hcm_filters.index(SPEND_FILTER) == hcm_filters.index(RATELIMIT_FILTER) + 1
    off = _routes(parse_config({**yaml.safe_load((REPO / "ccr.example.yaml").read_text()),
                                "limits": {"admission": "ratelimit"}, "spend": {"enabled": False}}))
    assert not any(SPEND_FILTER in r.get("typed_per_filter_config", {}) for r in off.values())


def test_generated_config_with_every_descriptor_passes_envoy_validate(tmp_path: Path) -> None:
    cfg = _config(rules=RULES, envoy_config_dir="rls")
    r = _validate(tmp_path, resources.static_bootstrap(cfg, _runtime(), 18080))
    assert r.returncode == 0, r.stderr[-4000:]


def _d(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": k, "value": v} for k, v in entries])
    if hits is not None:
        d.hits_addend.value = hits
    return d


def test_planner_maps_each_descriptor_to_its_rules() -> None:
    planner = LimitPlanner(Limits.model_validate({"requests_per_minute": 60, "rules": RULES,
                                                  "tokens": {"cache_read": 0.5}}))
    req = rls_pb2.RateLimitRequest(domain="ccr", descriptors=[
        _d(("principal", "oidc:i#a")), _d(("key_id", "key_1")), _d(("user", "oidc:i#a")), _d(("groups", "a,b,a")),
        _d(("tenant", "acme")), _d(("spiffe_id", "spiffe://x/y")), _d(("model", "claude-x")), _d(("model", "other"))])
    got = [(p.desc, p.key, p.hits, p.limit.about) for p in planner.plan(req)]
    assert got == [
        (0, "ccr:rl:ccr:principal=oidc:i#a:minute", 1, "principal oidc:i#a"),  # the default
        (0, "ccr:rl:rule:p:sliding_window.2:minute:principal=oidc:i#a", 1, "principal oidc:i#a"),
        (1, "ccr:rl:rule:k:sliding_window.2:minute:key=key_1", 1, "API key key_1"),
        (2, "ccr:rl:rule:u:sliding_window.2:minute:user=oidc:i#a", 1, "user oidc:i#a"),
        (3, "ccr:rl:rule:g:sliding_window.2:minute:group=a", 0, "group a"),  # tokens: checked, not counted
        (3, "ccr:rl:rule:g:sliding_window.2:minute:group=b", 0, "group b"),
        (4, "ccr:rl:rule:t:sliding_window.2:minute:tenant=acme", 1, "tenant acme"),
        (5, "ccr:rl:rule:s:token_bucket:minute:spiffe_id=spiffe://x/y", 1, "workload spiffe://x/y"),
        (6, "ccr:rl:rule:m:sliding_window.2:day:model=claude-x", 1, "model claude-x"),
    ]
    charge = rls_pb2.RateLimitRequest(domain="ccr", descriptors=[
        _d(("ccr_usage", "output"), ("principal", "oidc:i#a"), ("groups", "a,b"), hits=40),
        _d(("ccr_usage", "cache_read"), ("principal", "oidc:i#a"), ("groups", "a,b"), hits=9)])
    got = [(p.desc, p.key, p.hits, p.charge) for p in planner.plan(charge)]
    assert got == [(0, "ccr:rl:rule:g:sliding_window.2:minute:group=a", 40, True),
                   (0, "ccr:rl:rule:g:sliding_window.2:minute:group=b", 40, True),
                   (1, "ccr:rl:rule:g:sliding_window.2:minute:group=a", 4, True),  # 9 x 0.5, rounded
                   (1, "ccr:rl:rule:g:sliding_window.2:minute:group=b", 4, True)]
    # A usage descriptor without its own count (the usage was unknown) charges nothing.
    assert planner.plan(rls_pb2.RateLimitRequest(domain="ccr", hits_addend=5, descriptors=[
        _d(("ccr_usage", "output"), ("groups", "a"))])) == []
    # Elsewhere than domain ccr, these keys mean nothing to ccr's rules.
    assert planner.plan(rls_pb2.RateLimitRequest(domain="other", descriptors=[_d(("tenant", "acme"))])) == []


# -- limits.admission: extauth (the default) -----------------------------------------------------

FACTS = {"principal_id": "oidc:i#a", "key_id": "key_1", AUTHZ_USER_ID: "oidc:i#a", AUTHZ_GROUP_LIST: "a,b",
         "tenant": "acme", "spiffe_id": "spiffe://x/y", "model": "claude-x",
         "rpm": {"requests_per_unit": 42, "unit": "MINUTE"}, AUTHZ_SPEND: '{"v":1}'}


def _meta(facts: dict[str, Any]) -> Any:
    s = struct_pb2.Struct()
    s.update(facts)
    return s.fields.get


def test_in_extauth_routes_keep_only_the_stream_end_charges_and_no_spend_filter() -> None:
    cfg = _config("extauth", rules=RULES)
    assert parse_config(yaml.safe_load((REPO / "ccr.example.yaml").read_text())).limits.admission == "extauth"
    routes = _routes(cfg)
    msgs = _limits(routes["messages.create"])
    assert msgs and all(rl.get("apply_on_stream_done") and _keys(rl)[0] == "ccr_usage" for rl in msgs)
    for e in ENDPOINTS:
        tpfc = routes[e.name]["typed_per_filter_config"]
        assert SPEND_FILTER not in tpfc, e.name
        if e.name != "messages.create":  # nothing to charge at stream end: no list, no call
            assert RATELIMIT_FILTER not in tpfc, e.name
    hcm_filters = [f["name"] for f in resources.listener(cfg, 18080)["filter_chains"][0]["filters"][0]
                   ["typed_config"]["http_filters"]]
    assert SPEND_FILTER not in hcm_filters and RATELIMIT_FILTER in hcm_filters
    # Without token limits nothing is charged at stream end either.
    assert RATELIMIT_FILTER not in _routes(_config("extauth"))["messages.create"]["typed_per_filter_config"]


def test_extauth_builds_exactly_what_envoys_actions_would_send() -> None:
    """request_time_requests evaluates the old path's own action lists: one descriptor per fact present,
    the principal with its rpm override, the batch's hits, and the spend descriptor with the request id."""
    cfg = _config("extauth", rules=RULES)
    headers = {H_PRINCIPAL_ID: "oidc:i#a", H_REQUEST_ID: "rid-1"}
    limits, spend = request_time_requests(cfg, "messages.create", headers.get, _meta(FACTS))
    assert limits is not None and spend is not None
    assert limits.domain == "ccr" and spend.domain == "ccr_spend"
    got = [[(e.key, e.value) for e in d.entries] for d in limits.descriptors]
    assert got == [[("principal", "oidc:i#a")], [("key_id", "key_1")], [("user", "oidc:i#a")], [("groups", "a,b")],
                   [("tenant", "acme")], [("spiffe_id", "spiffe://x/y")], [("model", "claude-x")]]
    first = limits.descriptors[0]
    assert (first.limit.requests_per_unit, first.limit.unit) == (42, rls_pb2.RateLimitResponse.RateLimit.MINUTE)
    assert not any(d.HasField("hits_addend") for d in limits.descriptors)
    assert [[(e.key, e.value) for e in d.entries] for d in spend.descriptors] == [[("spend", '{"v":1}'),
                                                                                  ("request_id", "rid-1")]]
    # Absent facts are left out, as Envoy leaves out a descriptor whose metadata is absent; no spend fact: no call.
    few = {k: v for k, v in FACTS.items() if k in ("principal_id", "model", "rpm")}
    limits, spend = request_time_requests(cfg, "messages.create", headers.get, _meta(few))
    assert limits is not None and spend is None
    assert [[(e.key, e.value) for e in d.entries] for d in limits.descriptors] == [[("principal", "oidc:i#a")],
                                                                                  [("model", "claude-x")]]
    # A batch create counts its requests; count_tokens is never asked about a budget.
    batch = {**headers, H_BATCH_REQUESTS: "7"}
    limits, _ = request_time_requests(cfg, "batches.create", batch.get, _meta(FACTS))
    assert limits is not None and {d.hits_addend.value for d in limits.descriptors} == {7}
    assert request_time_requests(cfg, "messages.count_tokens", headers.get, _meta(FACTS))[1] is None
    # The same lists the old path hands Envoy: built from route_rate_limits, minus the stream-end ones.
    old = _limits(_routes(_config("ratelimit", rules=RULES))["messages.create"])
    assert len(old) == len(got) + len(RL_USAGE_KINDS)


def test_planner_cache_holds_nothing_the_cyclic_gc_walks(tmp_path: Path) -> None:
    """The plan cache grows with every principal seen (up to 100k descriptors): what it holds must
    not be GC-tracked, or each full collection walks all of it while calls wait (43 ms for 40k)."""
    rules_dir = tmp_path / "rls"
    rules_dir.mkdir()
    (rules_dir / "edge.yaml").write_text("domain: edge\ndescriptors:\n  - key: ip\n"
                                         "    rate_limit: {unit: minute, requests_per_unit: 5}\n")
    planner = LimitPlanner(Limits.model_validate({"requests_per_minute": 60, "rules": RULES}), load_dir(rules_dir))
    over = _d(("principal", "p-override"))
    over.limit.requests_per_unit, over.limit.unit = 7, rls_pb2.RateLimitResponse.RateLimit.HOUR
    for i in range(50):
        planner.plan(rls_pb2.RateLimitRequest(domain="ccr", descriptors=[
            _d(("principal", f"p{i}")), _d(("key_id", f"k{i}")), _d(("groups", f"a{i},b")), _d(("model", "claude-x")),
            _d(("spiffe_id", f"spiffe://x/{i}")), over]))
        planner.plan(rls_pb2.RateLimitRequest(domain="edge", descriptors=[_d(("ip", f"10.0.0.{i}"))]))
    cached = planner._cache
    assert len(cached) > 200
    for _ in range(4):  # the GC untracks tuples from the inside out, at worst one nesting level per pass
        gc.collect()

    def tracked(o: object) -> list[object]:
        found = [o] if gc.is_tracked(o) else []
        if isinstance(o, tuple):
            for x in o:
                found += tracked(x)
        return found

    assert [(t, k) for k, v in cached.items() for t in tracked(k) + tracked(v)] == []
    # What plan() hands out is still a Limit, with the cached fields.
    (p,) = planner.plan(rls_pb2.RateLimitRequest(domain="edge", descriptors=[_d(("ip", "10.0.0.3"))]))
    assert p.limit.amount == 5 and p.limit.period_ms == 60_000 and p.limit.about == "descriptor edge:ip=10.0.0.3"
