"""A draining service waits until the health checkers that were watching it were told NOT_SERVING
(ccr.service.ObservedHealth), so Envoy takes it out of rotation before it refuses work."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from ccr.service import ObservedHealth

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Peer:
    def __init__(self, name: str) -> None:
        self.name = name

    def peer(self) -> str:
        return self.name

    async def abort(self, *_: object) -> None:
        raise AssertionError("unexpected abort")


def test_drain_waits_for_each_recent_checker_to_hear_not_serving() -> None:
    now = [100.0]
    checks = ObservedHealth(clock=lambda: now[0])

    async def ask(peer: str) -> int:
        r = await checks.Check(health_pb2.HealthCheckRequest(), Peer(peer))  # type: ignore[arg-type]
        return r.status

    async def run() -> None:
        await ask("envoy-a")
        await ask("envoy-b")
        now[0] = 90.0
        await ask("gone")  # asked long before the drain: not waited for
        now[0] = 101.0
        flipped = now[0]
        await checks.enter_graceful_shutdown()
        assert sorted(checks.watchers_not_told(flipped, recent_s=3.0)) == ["envoy-a", "envoy-b"]
        now[0] = 101.5
        assert await ask("envoy-a") == NOT_SERVING
        assert checks.watchers_not_told(flipped, recent_s=3.0) == ["envoy-b"]
        # Bounded: a checker that never asks again (its Envoy died) does not hold the drain forever.
        assert await checks.until_watchers_told(flipped, timeout_s=0.0) == ["envoy-b"]
        assert await ask("envoy-b") == NOT_SERVING
        assert await checks.until_watchers_told(flipped, timeout_s=0.0) == []

    asyncio.run(run())
