"""A router restart under a running Envoy, over each ADS protocol: Envoy keeps serving its last good
config while the router is gone, reconnects to the new one (same address), and takes the config
changes made after the restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from ccr.procs import spawn, wait_ready_file
from ccr.supervisor import Gateway
from tests.harness import REPO, running_gateway

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["sotw", "delta"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["xds"] = {"protocol": request.param}

    with running_gateway(tmp_path_factory.mktemp(f"xds-restart-{request.param}"), edit) as g:
        yield g


def _route_timeout(gw: Gateway) -> str:
    dump = httpx.get(f"{gw.admin_url}/config_dump?resource=dynamic_route_configs").json()
    routes = dump["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
    return str(next(r for r in routes if r.get("name") == "messages.create")["route"]["timeout"])


def _connected(gw: Gateway) -> bool:
    # The ADS connection itself: control_plane.connected_state also counts Envoy's SDS stream to
    # the SPIRE agent, which stays up while the router is gone.
    stats = httpx.get(f"{gw.admin_url}/stats?filter=^cluster.ccr_xds.upstream_cx_active$").text
    return int(stats.rpartition(":")[2].strip() or 0) > 0


def _until(cond: Any, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)


def test_router_restart_resyncs(gw: Gateway) -> None:
    assert gw.runtime is not None and gw.runtime.xds
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    assert _route_timeout(gw) == "600s"
    (router,) = [c for c in gw.children if c.name == "router"]
    router.proc.kill()  # a crash: no goodbye on the ADS streams
    router.proc.wait()
    _until(lambda: not _connected(gw))
    # The router is gone: Envoy serves on with what it has.
    assert client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI).content

    run_dir = Path(gw.runtime.run_dir)
    port = gw.runtime.xds.rpartition(":")[2]
    ready = run_dir / "router-2.ready"
    # Started as the gateway starts it: through the router's own executable path, which is what
    # SPIRE attests (docs/spiffe.md), so the new router gets the router's SVID.
    new = spawn("router-2", [gw._python("router"), "-m", "router", "--runtime", str(run_dir / "runtime.json"),
                             "--ready-file", str(ready), "--port", port], run_dir / "logs", cwd=REPO)
    gw.children[gw.children.index(router)] = new  # stopped with the gateway, after Envoy
    wait_ready_file(new, ready)
    _until(lambda: _connected(gw))
    assert client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI).content

    # A change after the restart reaches Envoy from the new router.
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["gateway"]["request_timeout_s"] = 321
    gw.config_path.write_text(yaml.safe_dump(cfg))
    _until(lambda: _route_timeout(gw) == "321s")
    assert client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI).content
