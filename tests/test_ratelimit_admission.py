"""The seam for spend budgets: admission steps run after the limits allowed a request, may refuse it,
and are never asked about a request the limits refused."""

from __future__ import annotations

import uuid
from concurrent import futures

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ccr.config import Limits
from ccr.errors import error_body
from ratelimit.counters import Counters
from ratelimit.limits import LimitPlanner
from ratelimit.service import OVER_LIMIT, Decider, RateLimitServicer, make_redis


class Budget:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def admit(self, request: rls_pb2.RateLimitRequest, response: rls_pb2.RateLimitResponse) -> None:
        who = request.descriptors[0].entries[0].value
        self.seen.append(who)
        if who.startswith("broke"):
            response.overall_code = OVER_LIMIT
            response.raw_body = error_body("rate_limit_error", "budget 'team' exhausted")
            response.response_headers_to_add.add(key="retry-after", value="3600")
        else:
            response.response_headers_to_add.add(key="x-ccr-budget-remaining", value="1.00")


def test_admission_steps_after_the_limits(redis_url: str) -> None:
    client = make_redis(redis_url)
    budget = Budget()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = RateLimitServicer(Decider(Counters(client), LimitPlanner(Limits(requests_per_minute=1))), [budget])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = rls_pb2_grpc.RateLimitServiceStub(ch)

            def call(principal: str) -> rls_pb2.RateLimitResponse:
                d = ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "principal", "value": principal}])
                return stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="ccr", descriptors=[d]), timeout=5)

            rich, broke = f"rich-{uuid.uuid4().hex}", f"broke-{uuid.uuid4().hex}"
            r = call(rich)
            assert r.overall_code == rls_pb2.RateLimitResponse.OK
            assert {h.key for h in r.response_headers_to_add} >= {"x-ccr-budget-remaining",
                                                                  "anthropic-ratelimit-requests-limit"}
            r = call(broke)
            assert r.overall_code == OVER_LIMIT and b"budget 'team' exhausted" in r.raw_body
            assert budget.seen == [rich, broke]
            r = call(rich)  # 1 per minute: the limits refuse, the budget is not asked
            assert r.overall_code == OVER_LIMIT and b"1 request per minute" in r.raw_body
            assert budget.seen == [rich, broke]
    finally:
        server.stop(0)
        client.close()
