"""The ADS server's two protocols on the wire (a gRPC client playing Envoy): incremental (delta) and
state of the world, with ACK/NACK, resync after a router restart, push order and several nodes.
tests/test_e2e_failover.py runs both protocols with the real Envoy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from ccr.config import GatewayConfig
from router import resources
from router.xds import CDS, EDS, LDS, RDS, AdsServer, Snapshot
from tests.test_routing import REPO, _runtime

Msg = Any


def _config(timeout: float = 600.0, us2_port: int = 9001) -> GatewayConfig:
    doc = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    doc["gateway"]["request_timeout_s"] = timeout
    doc["providers"] = [
        {"name": "us1", "endpoint": "http://127.0.0.1:9000", "api_key_env": "A", "region": "us"},
        {"name": "eu1", "endpoint": "https://eu.example.com", "api_key_env": "B", "region": "eu"},
        {"name": "us2", "endpoint": f"http://127.0.0.1:{us2_port}", "api_key_env": "C", "region": "us"},
        {"name": "oss", "kind": "openai", "endpoint": "http://127.0.0.1:9002", "region": "us"},
    ]
    doc["models"] = [{"match": "claude-*", "targets": ["us1", "us2"]}]
    return GatewayConfig.model_validate(doc)


RUNTIME = _runtime()  # one set of credential files: snapshots differ only by their config


def _snapshot(**kw: Any) -> Snapshot:
    return Snapshot.of(resources.build(_config(**kw), RUNTIME, 18080))


class Peer:
    """One Envoy's stream: requests in, responses out."""

    def __init__(self, call: Any, reqs: asyncio.Queue[Msg]) -> None:
        self.call, self.reqs = call, reqs

    async def send(self, **kw: Any) -> None:
        await self.reqs.put(kw)

    async def read(self, timeout: float = 5.0) -> Msg:
        return await asyncio.wait_for(self.call.read(), timeout)

    async def silent(self) -> bool:
        """Nothing was sent before the answer to a probe asked now (one stream: answers are in order)."""
        self.probes = getattr(self, "probes", 0) + 1
        probe = f"type.googleapis.com/ccr.test.Probe{self.probes}"
        await self.send(type_url=probe)
        return bool((await self.read()).type_url == probe)


async def _with_server(ads: AdsServer, body: Callable[[Callable[..., Awaitable[Peer]]], Awaitable[None]]) -> None:
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = []

    async def connect(delta: bool = True) -> Peer:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(ch)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        reqs: asyncio.Queue[Msg] = asyncio.Queue()
        kind = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest

        async def gen() -> AsyncIterator[Msg]:
            while True:
                yield kind(**(await reqs.get()))

        call = (stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources)(gen())
        return Peer(call, reqs)

    try:
        await body(connect)
    finally:
        for ch in channels:
            await ch.close()
        await server.stop(0)


def _names(resp: Msg) -> set[str]:
    return {r.name for r in resp.resources}


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_delta_subscribe_ack_update_and_remove() -> None:
    ads = AdsServer(_snapshot())

    async def body(connect: Callable[..., Awaitable[Peer]]) -> None:
        p = await connect()
        await p.send(type_url=CDS, node={"id": "n1"})
        cds = await p.read()
        assert "chain_0_any" in _names(cds) and "chain_0_us" in _names(cds) and not cds.removed_resources
        await p.send(type_url=CDS, response_nonce=cds.nonce)  # ACK
        await p.send(type_url=EDS, resource_names_subscribe=["chain_0_any"])
        eds = await p.read()
        assert eds.type_url == EDS and _names(eds) == {"chain_0_any"}
        await p.send(type_url=EDS, response_nonce=eds.nonce)
        await p.send(type_url=LDS)
        lds = await p.read()
        await p.send(type_url=LDS, response_nonce=lds.nonce)
        await p.send(type_url=RDS, resource_names_subscribe=["ccr_routes"])
        rds = await p.read()
        await p.send(type_url=RDS, response_nonce=rds.nonce)
        assert await p.silent()
        assert ads.acked["n1"][CDS] == cds.system_version_info

        # A worker's address changes: only the endpoints move (one EDS resource), nothing else.
        await ads.update(_snapshot(us2_port=9555))
        cds2 = await p.read()  # the provider's own (static) clusters hold the address: they change ...
        assert cds2.type_url == CDS and _names(cds2) == {"provider_us2", "provider_us2_objects",
                                                         "provider_us2_translate"}
        resp = await p.read()  # ... and of the chains only the endpoints move, not the chain clusters
        assert resp.type_url == EDS and _names(resp) == {"chain_0_any"}  # chain_0_us: not subscribed
        await p.send(type_url=CDS, response_nonce=cds2.nonce)
        await p.send(type_url=EDS, response_nonce=resp.nonce)
        assert await p.silent()  # listeners and routes did not change: not sent

        # The chains go and the timeouts change: removals are named, clusters before what uses them.
        cfg = _config(timeout=30.0)
        cfg = cfg.model_copy(update={"models": [cfg.models[0].model_copy(update={"targets": []})]})
        await ads.update(Snapshot.of(resources.build(cfg, RUNTIME, 18080)))
        order = []
        for _ in range(3):
            r = await p.read()
            order.append(r.type_url)
            if r.type_url == CDS:
                assert {"chain_0_any", "chain_0_us"} <= set(r.removed_resources)
            if r.type_url == EDS:
                assert list(r.removed_resources) == ["chain_0_any"]
        assert order == [CDS, EDS, LDS]
        assert (await p.read()).type_url == RDS

    run(_with_server(ads, body))


def test_delta_nack_is_logged_once_and_never_resent(caplog: pytest.LogCaptureFixture) -> None:
    ads = AdsServer(_snapshot())

    async def body(connect: Callable[..., Awaitable[Peer]]) -> None:
        p = await connect()
        await p.send(type_url=LDS, node={"id": "n1"})
        lds = await p.read()
        bad = status_pb2.Status(code=3, message="listener refused")
        for _ in range(3):  # Envoy repeats its NACK on later requests
            await p.send(type_url=LDS, response_nonce=lds.nonce, error_detail=bad)
        assert await p.silent()  # no retry loop: the refused version is not pushed again
        assert ads.nacked["n1"][LDS] == lds.system_version_info
        assert LDS not in ads.acked.get("n1", {})
        # The next version goes out as usual, and its ACK clears the NACK.
        await ads.update(_snapshot(timeout=30.0))
        nxt = await p.read()
        assert nxt.type_url == LDS and nxt.system_version_info != lds.system_version_info
        await p.send(type_url=LDS, response_nonce=nxt.nonce)
        assert await p.silent()
        assert ads.acked["n1"][LDS] == nxt.system_version_info and LDS not in ads.nacked["n1"]

    with caplog.at_level(logging.ERROR, logger="ccr.xds"):
        run(_with_server(ads, body))
    assert len([r for r in caplog.records if "listener refused" in r.getMessage()]) == 1


def test_delta_resync_after_router_restart_sends_only_what_differs() -> None:
    old, new = _snapshot(), _snapshot(timeout=30.0)
    held = {n: v for n, (v, _) in old.versions[CDS].items()}
    # Envoy held the old config; a router restarted with the new one: CDS is unchanged by the
    # timeout, so the reconnecting node is sent nothing for CDS beyond an empty first answer.
    ads = AdsServer(new)

    async def body(connect: Callable[..., Awaitable[Peer]]) -> None:
        p = await connect()
        await p.send(type_url=CDS, node={"id": "n1"}, initial_resource_versions=held)
        cds = await p.read()
        assert not cds.resources and not cds.removed_resources
        await p.send(type_url=LDS, initial_resource_versions={n: v for n, (v, _) in old.versions[LDS].items()})
        lds = await p.read()
        assert _names(lds) == {"ccr_http"}  # the listener changed (its timeouts)

    run(_with_server(ads, body))
    # A cluster it holds that this config no longer has is removed.
    held["gone_cluster"] = "abc"
    ads2 = AdsServer(new)

    async def body2(connect: Callable[..., Awaitable[Peer]]) -> None:
        p = await connect()
        await p.send(type_url=CDS, node={"id": "n1"}, initial_resource_versions=held)
        cds = await p.read()
        assert list(cds.removed_resources) == ["gone_cluster"] and not cds.resources

    run(_with_server(ads2, body2))


def test_several_nodes_at_once_over_both_protocols() -> None:
    ads = AdsServer(_snapshot())

    async def body(connect: Callable[..., Awaitable[Peer]]) -> None:
        a, b = await connect(delta=True), await connect(delta=False)
        await a.send(type_url=CDS, node={"id": "envoy-a"})
        await b.send(type_url=CDS, node={"id": "envoy-b"})
        ra, rb = await a.read(), await b.read()
        assert _names(ra) and len(rb.resources) == len(ra.resources)
        await a.send(type_url=CDS, response_nonce=ra.nonce)
        await b.send(type_url=CDS, version_info=rb.version_info, response_nonce=rb.nonce)
        assert await a.silent() and await b.silent()
        assert ads.acked["envoy-a"][CDS] == ra.system_version_info
        assert ads.acked["envoy-b"][CDS] == rb.version_info
        # SotW resync: a node that reconnects with the current version gets nothing new... with an old one, all.
        c = await connect(delta=False)
        await c.send(type_url=CDS, node={"id": "envoy-c"}, version_info="stale-version")
        assert len((await c.read()).resources) == len(rb.resources)

    run(_with_server(ads, body))


def test_wait_applied_counts_every_answer_of_every_stream() -> None:
    """The config distributor's wait (router/config_push.py): a version is applied when every stream has
    answered every response of it; a NACK is reported with Envoy's reason."""
    ads = AdsServer(_snapshot())

    async def body(connect: Callable[..., Awaitable[Peer]]) -> None:
        p = await connect(delta=False)
        await p.send(type_url=CDS, node={"id": "n1"})
        cds = await p.read()
        await p.send(type_url=LDS)
        lds = await p.read()
        assert ads.streams() == [("n1", cds.version_info, False)]
        for r in (cds, lds):
            await p.send(type_url=r.type_url, version_info=r.version_info, response_nonce=r.nonce)
        assert await ads.wait_applied(cds.version_info, 5) == {}
        new = _snapshot(timeout=30.0)
        await ads.update(new)
        cds2, lds2 = await p.read(), await p.read()
        assert (cds2.type_url, lds2.type_url) == (CDS, LDS)  # clusters first
        waiter = asyncio.create_task(ads.wait_applied(new.version, 5))
        await p.send(type_url=CDS, version_info=new.version, response_nonce=cds2.nonce)
        await p.send(type_url=LDS, version_info=cds.version_info, response_nonce=lds2.nonce,
                     error_detail=status_pb2.Status(code=3, message="bad listener"))
        assert await waiter == {"n1": "Listener: bad listener"}
        with pytest.raises(TimeoutError, match="n1"):
            await ads.wait_applied("never-sent", 0.1)

        d = await connect(delta=True)
        await d.send(type_url=CDS, node={"id": "n2"})
        dcds = await d.read()
        await d.send(type_url=CDS, response_nonce=dcds.nonce)
        newer = _snapshot(timeout=30.0, us2_port=9777)
        await ads.update(newer)
        cds3, lds3 = await p.read(), await p.read()  # the state-of-the-world stream gets it too
        assert (cds3.type_url, lds3.type_url) == (CDS, LDS)
        changed = await d.read()
        assert changed.type_url == CDS and "provider_us2" in _names(changed)
        await d.send(type_url=CDS, response_nonce=changed.nonce)
        with pytest.raises(TimeoutError, match="n1"):  # n2 answered; n1 has not
            await ads.wait_applied(newer.version, 0.2)
        await p.send(type_url=CDS, version_info=newer.version, response_nonce=cds3.nonce)
        await p.send(type_url=LDS, version_info=newer.version, response_nonce=lds3.nonce)
        assert await ads.wait_applied(newer.version, 5) == {}

    run(_with_server(ads, body))
