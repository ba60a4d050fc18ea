"""A regional GPU pool through the whole gateway: OpenAI-compatible workers (emulators) register
with the router, Envoy learns them by EDS and routes to them within a second, health checks see a
failing one, and a worker whose heartbeat stops is removed. Client: the anthropic SDK (translated
to Chat Completions by the adapter per attempt)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from ccr.procs import Child, spawn, wait_ready_file
from ccr.supervisor import Gateway
from tests.harness import REPO, running_gateway

TOKEN = "pool-token-for-tests"
CLUSTER = "provider_gpu-eu_translate"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["providers"].append({"name": "gpu-eu", "kind": "openai", "endpoint": "http://pool", "region": "eu",
                                 "pool": {"max_ttl_s": 10, "health_interval_s": 0.5}})
        cfg["models"] = [{"match": "claude-gpu-*", "provider": "gpu-eu"}, *cfg["models"]]

    os.environ["CCR_POOL_TOKEN"] = TOKEN
    try:
        with running_gateway(tmp_path_factory.mktemp("gw-pools"), edit) as g:
            yield g
    finally:
        os.environ.pop("CCR_POOL_TOKEN", None)


def _worker(d: Path, name: str, *extra: str) -> tuple[Child, str]:
    child = spawn(name, [sys.executable, "-m", "emulators.openai_compat", "--port", "0",
                         "--ready-file", str(d / f"{name}.ready"), *extra], d, cwd=REPO,
                  env={"CCR_POOL_TOKEN": TOKEN})
    return child, str(wait_ready_file(child, d / f"{name}.ready")["address"])


def _hosts(gw: Gateway) -> dict[str, str]:
    """address -> health flags of the pool cluster's hosts, from Envoy's admin."""
    out = {}
    for line in httpx.get(f"{gw.admin_url}/clusters").text.splitlines():
        parts = line.split("::")
        if parts[0] == CLUSTER and len(parts) == 4 and parts[2] == "health_flags":
            out[parts[1]] = parts[3]
    return out


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `cond` held (polled); fails after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)


def test_worker_is_routable_within_a_second_of_registering(gw: Gateway, tmp_path: Path) -> None:
    with pytest.raises(anthropic.InternalServerError):  # no worker yet: nowhere to go
        _client(gw).messages.create(model="claude-gpu-1", max_tokens=8, messages=HI)
    child, address = _worker(tmp_path, "w1")
    try:
        assert gw.pools_url
        headers = {"authorization": f"Bearer {TOKEN}"}
        url = f"{gw.pools_url}/v1/pools/gpu-eu/workers/w1"
        assert httpx.put(url, json={"address": address, "region": "us"}, headers=headers).status_code == 403
        assert httpx.put(url, json={"address": address, "region": "eu"}).status_code == 401
        t0 = time.monotonic()
        r = httpx.put(url, json={"address": address, "region": "eu", "models": ["claude-gpu-1"], "ttl_s": 10},
                      headers=headers)
        assert r.status_code == 200
        # Registered -> in Envoy's cluster and health-checked healthy -> a request is served.
        _until(lambda: _hosts(gw).get(address) == "healthy", 5)
        routable = time.monotonic() - t0
        msg = _client(gw).messages.create(model="claude-gpu-1", max_tokens=8, messages=HI)
        assert msg.content[0].text.startswith("Emulated reply")
        print(f"time to routable: {routable * 1000:.0f} ms")
        assert routable < 1.0

        # A failing health check takes it out of rotation (Envoy's own active check).
        httpx.post(f"http://{address}/_emulator/health/fail")
        _until(lambda: "failed_active_hc" in _hosts(gw).get(address, ""), 5)
        httpx.post(f"http://{address}/_emulator/health/ok")
        _until(lambda: _hosts(gw).get(address) == "healthy", 5)

        # Deregistered: gone from Envoy.
        assert httpx.delete(url, headers=headers).status_code == 200
        _until(lambda: address not in _hosts(gw), 5)
    finally:
        child.stop()


def test_self_registered_worker_is_removed_when_its_heartbeat_stops(gw: Gateway, tmp_path: Path) -> None:
    child, address = _worker(tmp_path, "w2", "--register", str(gw.pools_url), "--pool", "gpu-eu", "--region", "eu",
                             "--worker-id", "w2", "--ttl", "1.5")
    try:
        _until(lambda: _hosts(gw).get(address) == "healthy", 10)
        assert _client(gw).messages.create(model="claude-gpu-1", max_tokens=8, messages=HI).content
        listing = f"{gw.pools_url}/v1/pools/gpu-eu/workers"
        headers = {"authorization": f"Bearer {TOKEN}"}
        child.proc.kill()  # no deregistration, no more heartbeats
        child.proc.wait()
        assert [w["id"] for w in httpx.get(listing, headers=headers).json()["workers"]] == ["w2"]
        _until(lambda: address not in _hosts(gw), 10)  # removed by its TTL
        assert httpx.get(listing, headers=headers).json()["workers"] == []
    finally:
        child.stop()


def test_a_dead_worker_still_registered_is_taken_out_of_rotation(gw: Gateway, tmp_path: Path) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    (a, addr_a), (b, addr_b) = _worker(tmp_path, "wa"), _worker(tmp_path, "wb")
    try:
        for wid, address in (("wa", addr_a), ("wb", addr_b)):
            r = httpx.put(f"{gw.pools_url}/v1/pools/gpu-eu/workers/{wid}",
                          json={"address": address, "region": "eu", "ttl_s": 10}, headers=headers)
            assert r.status_code == 200
        _until(lambda: _hosts(gw).get(addr_a) == "healthy" and _hosts(gw).get(addr_b) == "healthy")
        a.proc.kill()  # gone without a word: still registered (TTL 10 s), still in Envoy's cluster
        a.proc.wait()
        # Envoy's health check (every 0.5 s, two failures) ejects it long before its TTL ...
        took = _until(lambda: "failed_active_hc" in _hosts(gw).get(addr_a, ""), 5)
        print(f"dead worker out of rotation after {took * 1000:.0f} ms")
        assert addr_a in _hosts(gw)  # ... while the registry still lists it
        for _ in range(8):  # and every request goes to the live one
            assert _client(gw).messages.create(model="claude-gpu-1", max_tokens=8, messages=HI).content
    finally:
        for wid in ("wa", "wb"):
            httpx.delete(f"{gw.pools_url}/v1/pools/gpu-eu/workers/{wid}", headers=headers)
        a.stop()
        b.stop()
