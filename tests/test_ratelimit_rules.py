"""Decisions of the real ratelimit process on real Redis: ccr's own rules, envoyproxy YAML rules,
hot reload, and Redis down (fail open / closed per limit)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ccr.localservers import start_redis
from ccr.procs import Child, wait_until
from tests.harness import running_service
from tests.test_ratelimit_config import EDGE, MESSAGING

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
HOUR = rls_pb2.RateLimitResponse.RateLimit.HOUR
DAY = rls_pb2.RateLimitResponse.RateLimit.DAY

CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
limits:
  requests_per_minute: 5
  envoy_config_dir: rls
  reload_interval_s: 0.1
  tokens: {input: 1, output: 1, cache_read: 0.5, cache_creation: 1}
  rules:
    - {name: group-rph, per: group, amount: 3, unit: hour}
    - {name: tenant-tokens, per: tenant, metric: tokens, amount: 1000, unit: day}
    - {name: key-bucket, per: key, algorithm: token_bucket, amount: 3600, unit: hour, burst: 2}
    - {name: model-shadow, per: model, amount: 1, unit: day, shadow_mode: true}
    - {name: workload-bucket, per: spiffe_id, algorithm: token_bucket, amount: 2, unit: day}
"""


def _u(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _d(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": k, "value": v} for k, v in entries])
    if hits is not None:
        d.hits_addend.value = hits
    return d


def _req(*descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "ccr",
         hits: int = 0) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors), hits_addend=hits)


def _headers(r: rls_pb2.RateLimitResponse) -> dict[str, str]:
    return {h.key: h.value for h in r.response_headers_to_add}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Path, Child, object]]:
    tmp = tmp_path_factory.mktemp("rules")
    (tmp / "rls").mkdir()
    (tmp / "rls" / "edge.yaml").write_text(EDGE)
    (tmp / "rls" / "messaging.yaml").write_text(MESSAGING)
    with running_service("ratelimit", tmp, CONFIG, redis_url=redis_url) as child, \
            grpc.insecure_channel(str(child.info["address"])) as channel:
        yield tmp / "rls", child, rls_pb2_grpc.RateLimitServiceStub(channel)


@pytest.fixture
def rls(service: tuple[Path, Child, rls_pb2_grpc.RateLimitServiceStub]) -> rls_pb2_grpc.RateLimitServiceStub:
    return service[2]


def test_group_limit_counts_each_group_and_names_the_one_hit(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    g1, g2, g3 = _u("g"), _u("g"), _u("g")
    for i in range(3):
        r = rls.ShouldRateLimit(_req(_d(("groups", f"{g1},{g2}"))), timeout=5)
        assert r.overall_code == OK
        assert r.statuses[0].limit_remaining == 2 - i
        assert r.statuses[0].current_limit.requests_per_unit == 3 and r.statuses[0].current_limit.unit == HOUR
        assert _headers(r)["anthropic-ratelimit-requests-remaining"] == str(2 - i)
    r = rls.ShouldRateLimit(_req(_d(("groups", f"{g1},{g2}"))), timeout=5)
    assert r.overall_code == OVER and r.statuses[0].code == OVER
    h = _headers(r)
    assert 3600 - 60 <= int(h["retry-after"]) <= 3600 + 60  # sliding: the oldest slot (1/60 h) ages out whole
    message = json.loads(r.raw_body)["error"]["message"]
    assert message.startswith("Rate limit 'group-rph' of 3 requests per hour exceeded for group ")
    assert f"retry after {h['retry-after']} seconds" in message and "resets at 20" in message
    # g2 was counted as often as g1; a third group is not.
    assert rls.ShouldRateLimit(_req(_d(("groups", g2))), timeout=5).overall_code == OVER
    r = rls.ShouldRateLimit(_req(_d(("groups", f"{g3}"))), timeout=5)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 2


def test_token_limit_checked_before_the_call_and_charged_at_stream_end(
        rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    t = _u("t")
    before = rls.ShouldRateLimit(_req(_d(("tenant", t))), timeout=5)
    assert before.overall_code == OK
    h = _headers(before)
    assert h["anthropic-ratelimit-tokens-limit"] == "1000" and h["anthropic-ratelimit-tokens-remaining"] == "1000"

    def charge(**by_kind: int) -> rls_pb2.RateLimitResponse:
        return rls.ShouldRateLimit(_req(*(_d(("ccr_usage", kind), ("principal", "p"), ("tenant", t), hits=n)
                                          for kind, n in by_kind.items())), timeout=5)

    # Checking is free: many checks, no tokens used.
    for _ in range(3):
        assert rls.ShouldRateLimit(_req(_d(("tenant", t))), timeout=5).overall_code == OK
    # 600 in + 300 out + 100 cache reads at weight 0.5 = 1000 - 50
    assert charge(input=600, output=300, cache_read=100).overall_code == OK
    r = rls.ShouldRateLimit(_req(_d(("tenant", t))), timeout=5)
    assert r.overall_code == OK and _headers(r)["anthropic-ratelimit-tokens-remaining"] == "50"
    charge(output=80)  # past the limit: what was spent is charged anyway
    r = rls.ShouldRateLimit(_req(_d(("tenant", t))), timeout=5)
    assert r.overall_code == OVER
    assert _headers(r)["anthropic-ratelimit-tokens-remaining"] == "0"
    assert json.loads(r.raw_body)["error"]["message"].startswith(
        f"Rate limit 'tenant-tokens' of 1000 tokens per day exceeded for tenant {t}; resets at ")


def test_token_bucket_burst_then_refill(service: tuple[Path, Child, rls_pb2_grpc.RateLimitServiceStub]) -> None:
    _, child, rls = service
    k = _u("key")
    assert [rls.ShouldRateLimit(_req(_d(("key_id", k))), timeout=5).overall_code for _ in range(3)] == [OK, OK, OVER]
    r = rls.ShouldRateLimit(_req(_d(("key_id", k))), timeout=5)
    assert r.overall_code == OVER and _headers(r)["retry-after"] == "1"  # 3600 per hour: one a second
    wait_until(child, lambda: rls.ShouldRateLimit(_req(_d(("key_id", k))), timeout=5).overall_code == OK,
               5, "refilled")


def test_shadow_rule_reports_but_never_refuses(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    m = _u("claude")
    for _ in range(3):  # 1 a day: the second and third are over, and allowed
        r = rls.ShouldRateLimit(_req(_d(("model", m))), timeout=5)
        assert r.overall_code == OK and r.statuses[0].code == OK and not r.raw_body
        assert r.statuses[0].limit_remaining == 0 and r.statuses[0].current_limit.requests_per_unit == 1
        assert "retry-after" not in _headers(r)


def test_yaml_rules_shadow_unlimited_replaces_and_hits(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    edge = "edge_proxy_per_ip"
    p = "/login/" + uuid.uuid4().hex
    for _ in range(7):  # 5 per minute in shadow mode: counted, never refused
        r = rls.ShouldRateLimit(_req(_d(("path", p)), domain=edge), timeout=5)
        assert r.overall_code == OK and r.statuses[0].code == OK
    assert r.statuses[0].limit_remaining == 0 and r.statuses[0].current_limit.requests_per_unit == 5

    r = rls.ShouldRateLimit(_req(_d(("remote_address", "50.0.0.5")), domain=edge), timeout=5)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 2**32 - 1
    assert not r.statuses[0].HasField("current_limit")

    n = uuid.uuid4().hex
    both = _req(_d(("message_type", "marketing"), ("to_number", n)), _d(("to_number", n)), domain="messaging")
    r = rls.ShouldRateLimit(both, timeout=5)
    assert r.statuses[0].current_limit.requests_per_unit == 5 and r.statuses[0].limit_remaining == 4
    assert not r.statuses[1].HasField("current_limit")  # per_type replaced by per_number: not counted
    r = rls.ShouldRateLimit(_req(_d(("to_number", n)), domain="messaging"), timeout=5)
    assert r.statuses[0].current_limit.unit == DAY and r.statuses[0].limit_remaining == 99

    # The request's hits_addend counts every descriptor but one that has its own (0: check only).
    ip1, ip2 = _u("10.1"), _u("10.2")
    r = rls.ShouldRateLimit(_req(_d(("remote_address", ip1), hits=0), _d(("remote_address", ip2)),
                                 domain=edge, hits=4), timeout=5)
    assert [s.limit_remaining for s in r.statuses] == [10, 6]


def test_yaml_hot_reload_keeps_last_good(service: tuple[Path, Child, rls_pb2_grpc.RateLimitServiceStub]) -> None:
    d, child, rls = service

    def limit_now() -> int:
        r = rls.ShouldRateLimit(_req(_d(("path", _u("/p"))), domain="edge_proxy_per_ip"), timeout=5)
        return int(r.statuses[0].current_limit.requests_per_unit)

    assert limit_now() == 100
    (d / "edge.yaml").write_text(EDGE.replace("requests_per_unit: 100", "requests_per_unit: 250"))
    wait_until(child, lambda: limit_now() == 250, 10, "reloaded")
    (d / "edge.yaml").write_text(EDGE.replace("requests_per_unit: 100", "requests_per_unit: 300\n      colour: red"))
    wait_until(child, lambda: "colour" in child.log_path.read_text(), 10, "reporting the bad file")
    assert "keeping the last good one" in child.log_path.read_text()
    assert limit_now() == 250
    (d / "edge.yaml").write_text(EDGE)
    wait_until(child, lambda: limit_now() == 100, 10, "reloaded again")


REDIS_DOWN_CONFIG = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
limits:
  on_redis_down: open
  rules:
    - {name: key-open, per: key, amount: 100, unit: minute}
    - {name: tenant-closed, per: tenant, amount: 100, unit: minute, on_redis_down: closed}
"""


def test_redis_down_fails_open_or_closed_per_limit(tmp_path: Path) -> None:
    own = start_redis(tmp_path / "redis", tmp_path / "logs")  # ours to stop; the session's stays up
    try:
        with running_service("ratelimit", tmp_path, REDIS_DOWN_CONFIG, redis_url=str(own.info["url"])) as child, \
                grpc.insecure_channel(str(child.info["address"])) as channel:
            rls = rls_pb2_grpc.RateLimitServiceStub(channel)
            open_req = _req(_d(("principal", "p1")), _d(("key_id", "k1")))
            closed_req = _req(_d(("principal", "p1")), _d(("tenant", "t1")))
            r = rls.ShouldRateLimit(open_req, timeout=5)
            assert r.overall_code == OK and r.statuses[1].limit_remaining == 99
            assert rls.ShouldRateLimit(closed_req, timeout=5).overall_code == OK

            own.stop()
            r = rls.ShouldRateLimit(open_req, timeout=5)  # every limit involved is fail-open
            assert r.overall_code == OK and not r.raw_body
            with pytest.raises(grpc.RpcError) as exc:
                rls.ShouldRateLimit(closed_req, timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        log = child.log_path.read_text()
        assert "allowing uncounted" in log and "refusing to decide" in log
    finally:
        own.stop()


def test_concurrent_calls_on_two_replicas_allow_exactly_the_limit(
        service: tuple[Path, Child, rls_pb2_grpc.RateLimitServiceStub], tmp_path: Path, redis_url: str) -> None:
    """Two ratelimit processes on one Redis, 40 calls at once across both: the sliding window
    (3 per hour per group) admits exactly 3, and the token bucket (2 a day) exactly 2."""
    _, _, first = service
    d = tmp_path / "rls"
    d.mkdir()
    with running_service("ratelimit", tmp_path, CONFIG, redis_url=redis_url) as second_child, \
            grpc.insecure_channel(str(second_child.info["address"])) as ch:
        second = rls_pb2_grpc.RateLimitServiceStub(ch)
        for descriptor, allowed in ((("groups", _u("g")), 3), (("spiffe_id", _u("spiffe://t/w")), 2)):
            req = _req(_d(descriptor))
            futures = [(first if i % 2 else second).ShouldRateLimit.future(req, timeout=10) for i in range(40)]
            codes = [f.result().overall_code for f in futures]
            assert codes.count(OK) == allowed and codes.count(OVER) == 40 - allowed, descriptor
