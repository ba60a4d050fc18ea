"""GPU pool registry and its registration API (router/pools.py), with an injected clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from ccr.config import GatewayConfig
from router import resources
from router.pools import Refused, Registry, api
from router.xds import EDS, Snapshot
from tests.test_router import REPO, _runtime


def _config() -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["providers"] += [{"name": "gpu-eu", "kind": "openai", "endpoint": "http://pool", "region": "eu",
                          "pool": {"max_ttl_s": 10}}]
    doc["models"] = [{"match": "oss-*", "provider": "gpu-eu"}, *doc["models"]]
    return GatewayConfig.model_validate(doc)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _worker(**kw: Any) -> dict[str, Any]:
    return {"address": "10.0.0.5:8000", "region": "eu", "models": ["oss-1"], "capacity": 10, "ttl_s": 3, **kw}


def test_register_heartbeat_expire_deregister() -> None:
    clock, changes = Clock(), []
    reg = Registry(_config(), clock, lambda: changes.append(1))
    reg.register("gpu-eu", "w1", _worker())
    assert len(changes) == 1
    (cla,) = reg.assignments(resources.provider_cluster_names)
    assert cla["cluster_name"] == "provider_gpu-eu_translate"
    (ep,) = cla["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "10.0.0.5", "port_value": 8000}
    assert ep["load_balancing_weight"] == 10
    # A heartbeat renews the TTL; a new queue depth changes the weight (a push), the same one does not.
    clock.t += 2.5
    reg.register("gpu-eu", "w1", _worker(queue_depth=4))
    assert len(changes) == 2
    assert reg.assignments(resources.provider_cluster_names)[0]["endpoints"][0]["lb_endpoints"][0][
        "load_balancing_weight"] == 6
    reg.register("gpu-eu", "w1", _worker(queue_depth=4))
    assert len(changes) == 2
    clock.t += 2.9
    assert reg.expire() == 0  # renewed 2.9 s ago, TTL 3 s
    clock.t += 0.2
    assert reg.expire() == 1 and len(changes) == 3  # the heartbeat stopped: gone
    assert reg.assignments(resources.provider_cluster_names)[0]["endpoints"] == []
    reg.register("gpu-eu", "w2", _worker())
    assert reg.deregister("gpu-eu", "w2") and not reg.deregister("gpu-eu", "w2")


@pytest.mark.parametrize(("pool", "body", "status", "words"), [
    ("gpu-eu", _worker(region="us"), 403, "is in region 'eu'"),
    ("nope", _worker(), 404, "no pool"),
    ("anthropic", _worker(), 404, "no pool"),  # a provider that is not a pool takes no workers
    ("gpu-eu", _worker(address="gpu.internal:8000"), 400, "IP address"),
    ("gpu-eu", _worker(ttl_s=60), 400, "at most 10"),
    ("gpu-eu", _worker(capacity=0), 400, "capacity"),
])
def test_registrations_that_are_refused(pool: str, body: dict[str, Any], status: int, words: str) -> None:
    reg = Registry(_config(), Clock())
    with pytest.raises(Refused, match=words) as e:
        reg.register(pool, "w1", body)
    assert e.value.status == status
    assert all(not ws for ws in reg.workers.values())


def test_pool_endpoints_replace_only_their_assignment() -> None:
    cfg = _config()
    base = Snapshot.of(resources.build(cfg, _runtime(), 18080))
    empty = dict(base.by_type[EDS])
    assert "provider_gpu-eu_translate" in empty
    reg = Registry(cfg, Clock())
    reg.register("gpu-eu", "w1", _worker())
    snap = base.with_endpoints(reg.assignments(resources.provider_cluster_names))
    assert snap.version != base.version
    assert snap.by_type[EDS] != base.by_type[EDS] and snap.by_type[EDS][0][0] == "provider_gpu-eu_translate"
    assert {k: v for k, v in snap.by_type.items() if k != EDS} == {k: v for k, v in base.by_type.items() if k != EDS}


def test_api_needs_the_token() -> None:
    async def go() -> None:
        reg = Registry(_config(), Clock())
        client = TestClient(TestServer(api(reg, "s3cret")))
        await client.start_server()
        try:
            url = "/v1/pools/gpu-eu/workers/w1"
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                r = await client.put(url, json=_worker(), headers=headers)
                assert r.status == 401
            assert not reg.workers["gpu-eu"]
            ok = {"authorization": "Bearer s3cret"}
            r = await client.put(url, json=_worker(), headers=ok)
            assert r.status == 200 and "w1" in reg.workers["gpu-eu"]
            r = await client.put(url, json=_worker(region="us"), headers=ok)
            assert r.status == 403 and "region" in (await r.json())["error"]
            r = await client.put(url, data=b"not json", headers=ok)
            assert r.status == 400
            r = await client.get("/v1/pools/gpu-eu/workers", headers=ok)
            assert [w["id"] for w in (await r.json())["workers"]] == ["w1"]
            r = await client.delete(url, headers=ok)
            assert r.status == 200 and not reg.workers["gpu-eu"]
        finally:
            await client.close()

    asyncio.run(go())
