"""Side by side with envoyproxy/ratelimit (Go, the reference): the same YAML file, the same requests,
the same answers. Both on the session's real Redis (each with its own keys).

The Go binary is built by /work/shared/peers/envoyproxy-ratelimit.sh into ~/.cache/ccr-peers/bin;
without it this module is skipped (it compares, it does not test ccr alone).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ccr.procs import free_port, spawn, wait_until
from tests.harness import running_service

PEER_BIN = Path.home() / ".cache/ccr-peers/bin/service_cmd"
pytestmark = pytest.mark.skipif(not PEER_BIN.exists(), reason=f"reference service not built at {PEER_BIN}")

COMPAT = """\
domain: compat
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: user
    value: vip
    rate_limit: {unlimited: true}
  - key: path
    value: /api/*
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: path
    value: /api/special
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: org
    descriptors:
      - key: member
        rate_limit:
          name: org_member
          unit: day
          requests_per_unit: 2
          replaces: [{name: per_member}]
  - key: member
    rate_limit: {name: per_member, unit: day, requests_per_unit: 4}
  - key: team
    value: red
    detailed_metric: true
    descriptors:
      - key: job
        rate_limit: {unit: minute, requests_per_unit: 2}
"""

GATEWAY = """
version: 1
providers: [{name: anthropic}]
models: [{match: "claude-*", provider: anthropic}]
limits: {envoy_config_dir: rls}
"""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[object, object]]:
    tmp = tmp_path_factory.mktemp("peer")
    (tmp / "rls").mkdir()
    (tmp / "rls" / "compat.yaml").write_text(COMPAT)
    cfg = tmp / "peer" / "ratelimit" / "config"
    cfg.mkdir(parents=True)
    (cfg / "compat.yaml").write_text(COMPAT)
    u = urlsplit(redis_url)
    port = free_port()
    env = {"REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": f"{u.hostname}:{u.port}", "REDIS_AUTH": u.password or "",
           "RUNTIME_ROOT": str(tmp / "peer"), "RUNTIME_SUBDIRECTORY": "ratelimit", "RUNTIME_WATCH_ROOT": "false",
           "USE_STATSD": "false", "GRPC_HOST": "127.0.0.1", "HOST": "127.0.0.1", "DEBUG_HOST": "127.0.0.1",
           "GRPC_PORT": str(port), "PORT": str(free_port()), "DEBUG_PORT": str(free_port()), "LOG_LEVEL": "warn"}
    peer = spawn("envoyproxy-ratelimit", [str(PEER_BIN)], tmp / "logs", env=env)
    try:
        with running_service("ratelimit", tmp, GATEWAY, redis_url=redis_url) as ours, \
                grpc.insecure_channel(str(ours.info["address"])) as ours_ch, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as peer_ch:
            wait_until(peer, lambda: _ready(peer_ch), 30, "serving")
            yield rls_pb2_grpc.RateLimitServiceStub(ours_ch), rls_pb2_grpc.RateLimitServiceStub(peer_ch)
    finally:
        peer.stop()


def _ready(ch: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(ch).result(timeout=0.5)
        return True
    except grpc.FutureTimeoutError:
        return False


def _req(*descriptors: list[tuple[str, str]], hits: int = 0,
         own_hits: dict[int, int] | None = None) -> rls_pb2.RateLimitRequest:
    ds = []
    for i, entries in enumerate(descriptors):
        d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": k, "value": v} for k, v in entries])
        if own_hits and i in own_hits:
            d.hits_addend.value = own_hits[i]
        ds.append(d)
    return rls_pb2.RateLimitRequest(domain="compat", descriptors=ds, hits_addend=hits)


def _view(r: rls_pb2.RateLimitResponse) -> tuple:
    """What must agree: overall code, and per descriptor code, limit and remaining."""
    return (r.overall_code, [(s.code, s.limit_remaining,
                              (s.current_limit.requests_per_unit, s.current_limit.unit)
                              if s.HasField("current_limit") else None) for s in r.statuses])


def test_same_answers_as_envoyproxy_ratelimit(stubs: tuple[rls_pb2_grpc.RateLimitServiceStub,
                                                           rls_pb2_grpc.RateLimitServiceStub]) -> None:
    ours, peer = stubs
    u = uuid.uuid4().hex[:8]
    sequence = [
        *[_req([("user", f"alice{u}")]) for _ in range(4)],  # key-only, then over
        _req([("user", "vip")]),  # exact value: unlimited
        *[_req([("path", f"/api/{u}")]) for _ in range(3)],  # wildcard
        *[_req([("path", "/api/special")], [("user", f"bob{u}")]) for _ in range(2)],  # shadow beside a limit
        _req([("nothing", "here")]),  # no rule
        *[_req([("org", "o"), ("member", f"m{u}")], [("member", f"m{u}")]) for _ in range(3)],  # replaces
        _req([("member", f"m{u}")]),  # per_member alone: the replaced calls did not count it
        _req([("team", "red"), ("job", f"j{u}")], hits=3),  # request hits_addend
        _req([("team", "red"), ("job", f"k{u}")], [("user", f"carol{u}")], hits=2, own_hits={0: 0}),  # own hits
        _req([("team", "red")]),  # a node without a limit
        _req([("team", "blue"), ("job", "x")]),  # no such value
    ]
    for i, req in enumerate(sequence):
        a, b = ours.ShouldRateLimit(req, timeout=5), peer.ShouldRateLimit(req, timeout=5)
        assert _view(a) == _view(b), f"request {i}: {req}\nours: {a}\nenvoyproxy/ratelimit: {b}"
        for sa, sb in zip(a.statuses, b.statuses, strict=True):
            if sb.HasField("current_limit"):
                assert abs(sa.duration_until_reset.seconds - sb.duration_until_reset.seconds) <= 1, i
