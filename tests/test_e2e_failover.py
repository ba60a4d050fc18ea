"""Failover chains and data residency through the whole gateway: real Envoy, extauth with the
shipped residency policy, Anthropic API emulators as the targets, the anthropic SDK as the client.

Targets:
  primary-us  an emulator this module starts and stops mid-run (us)
  flaky-us    an emulator that answers every call 529 (us)
  backup-us   a healthy emulator (us)
  backup-eu   the gateway's built-in emulator (eu)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from ccr.procs import Child, spawn, wait_ready_file
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import REPO, RecordMark, emulator_mark, running_gateway

KEY = "sk-ant-failover-test"
KEY_ENV = "CCR_T_FAILOVER_KEY"
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Emu:
    child: Child
    url: str

    def mark(self) -> RecordMark:
        return emulator_mark(self.url)


def _emulator(d: Path, name: str, *extra: str) -> Emu:
    child = spawn(name, [sys.executable, "-m", "emulators.anthropic", "--port", "0", "--api-key", KEY,
                         "--ready-file", str(d / f"{name}.ready"), *extra], d, cwd=REPO)
    address = wait_ready_file(child, d / f"{name}.ready")["address"]
    return Emu(child, f"http://{address}")


@dataclass
class World:
    gw: Gateway
    primary: Emu
    flaky: Emu
    backup: Emu
    protocol: str
    slow: Emu


@pytest.fixture(scope="module", params=["sotw", "delta"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The chain clusters' endpoints come by EDS, over either ADS protocol (gateway.xds.protocol)."""
    d = tmp_path_factory.mktemp("failover")
    emus = [_emulator(d, "primary"), _emulator(d, "flaky", "--fault-rate", "529=1"), _emulator(d, "backup"),
            _emulator(d, "slow", "--latency-ms", "4000")]
    primary, flaky, backup, slow = emus
    pol = d / "policies"
    shutil.copytree(REPO / "policies", pol)
    data = json.loads((pol / "data.json").read_text())
    data["residency"]["tenants"] = {"acme-us": "us", "acme-eu": "eu"}
    (pol / "data.json").write_text(json.dumps(data))

    def edit(cfg: dict[str, Any]) -> None:
        cfg["policy"]["dir"] = str(pol)
        cfg["gateway"]["xds"] = {"protocol": request.param}
        # One worker thread: each thread's connection pool may open its first connection past a
        # circuit breaker's limit (the saturation test counts on one).
        cfg["gateway"]["concurrency"] = 1
        builtin = cfg["providers"][0]
        builtin.update(name="backup-eu", region="eu")
        cfg["providers"] += [
            {"name": "primary-us", "endpoint": primary.url, "api_key_env": KEY_ENV, "region": "us"},
            {"name": "flaky-us", "endpoint": flaky.url, "api_key_env": KEY_ENV, "region": "us"},
            {"name": "backup-us", "endpoint": backup.url, "api_key_env": KEY_ENV, "region": "us"},
            {"name": "slow-us", "endpoint": slow.url, "api_key_env": KEY_ENV, "region": "us",
             "max_concurrent_requests": 1, "max_queued_requests": 1},
        ]
        cfg["models"] = [
            {"match": "claude-sonnet-4-5-20250929", "targets": ["backup-us", "backup-eu"]},
            {"match": "claude-sonnet-*", "targets": ["primary-us", "backup-eu"]},
            {"match": "claude-haiku-*", "targets": ["flaky-us", "backup-eu", "backup-us"]},
            # us only: a request bound to eu has nowhere to go
            {"match": "claude-opus-*", "targets": ["flaky-us", "backup-us"]},
            # 529 is not in this model's failover set: the client sees it
            {"match": "claude-3-*", "targets": ["flaky-us", "backup-us"], "failover": {"on_status": [500]}},
            {"match": "claude-slow-*", "provider": "slow-us"},
            {"match": "claude-ab-*", "split": {"backup-us": 50, "backup-eu": 50}},
        ]

    os.environ[KEY_ENV] = KEY
    try:
        with running_gateway(d, edit) as gw:
            yield World(gw, primary, flaky, backup, request.param, slow)
    finally:
        os.environ.pop(KEY_ENV, None)
        for e in emus:
            e.child.stop()


def _client(url: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def _tenant_key(w: World, tenant: str) -> str:
    _, key = create_key(w.gw.runtime.postgres_dsn, f"{tenant}-{os.urandom(3).hex()}", ["default"], tenant=tenant)
    return key


def _audit_row(w: World, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with psycopg.connect(w.gw.runtime.postgres_dsn, row_factory=dict_row) as conn:
        q = "SELECT * FROM request_log WHERE request_id = %s"
        while (row := conn.execute(q, (request_id,)).fetchone()) is None:
            assert time.monotonic() < deadline, f"no audit row for {request_id}"
            time.sleep(0.05)
    return row


def test_primary_stopped_mid_run_no_client_visible_error(world: World) -> None:
    c = _client(world.gw.url, world.gw.api_key)
    eu, primary = emulator_mark(world.gw), world.primary.mark()
    for _ in range(5):
        assert c.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HI).content
    assert len(primary.arrived()) == 5  # the primary takes all while it is up
    assert eu.arrived() == []
    world.primary.child.stop()
    for _ in range(10):  # every request still succeeds: refused connections fail over to the next target
        assert c.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HI).content
    assert len(eu.arrived()) == 10
    # Streams fail over too (before their first byte).
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=8, messages=HI) as s:
        assert s.get_final_message().content
    assert len(eu.arrived()) == 11


def test_529_fails_over_and_the_next_target_gets_its_own_credential(world: World) -> None:
    c = _client(world.gw.url, world.gw.api_key)
    flaky, eu = world.flaky.mark(), emulator_mark(world.gw)
    raw = c.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=8, messages=HI)
    assert raw.parse().content
    assert [r["status"] for r in flaky.arrived()] == [529]  # tried first, answered 529
    [rec] = eu.arrived()
    headers = {k.lower(): v for k, v in rec["headers"].items()}
    # The built-in emulator's own key (the flaky target's key would be refused with 401), and no
    # gateway-internal header on the wire.
    assert headers["x-api-key"] != KEY
    assert not [h for h in headers if h.startswith("x-ccr-")]
    # The audit row names the provider that served (Envoy's host metadata, not the chain's first), its
    # region, and both attempts.
    row = _audit_row(world, raw.headers["x-request-id"])
    assert (row["provider"], row["region"], row["attempts"], row["status"]) == ("backup-eu", "eu", 2, 200), row
    assert row["upstream_cluster"] and row["upstream_cluster"] not in ("provider_flaky-us", "provider_backup-eu")


def test_a_request_caused_error_is_not_failed_over(world: World) -> None:
    c = _client(world.gw.url, world.gw.api_key)
    backup, eu = world.backup.mark(), emulator_mark(world.gw)
    with pytest.raises(anthropic.BadRequestError) as e:  # max_tokens above the model's limit: the request's fault
        c.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100_000, messages=HI, stream=True)
    assert "64000" in e.value.body["error"]["message"]  # type: ignore[index]
    assert ([r["status"] for r in backup.arrived()], eu.arrived()) == ([400], [])


def test_failover_statuses_are_per_model(world: World) -> None:
    c = _client(world.gw.url, world.gw.api_key)
    backup = world.backup.mark()
    with pytest.raises(anthropic.InternalServerError) as e:
        c.messages.create(model="claude-3-5-haiku", max_tokens=8, messages=HI)
    assert e.value.status_code == 529
    assert backup.arrived() == []


def test_a_region_bound_request_never_leaves_its_region_on_failover(world: World) -> None:
    c = _client(world.gw.url, _tenant_key(world, "acme-us"))
    eu, backup = emulator_mark(world.gw), world.backup.mark()
    for _ in range(4):  # flaky-us answers 529; the next target (backup-eu) is outside us: skipped
        assert c.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI).content
    with c.messages.stream(model="claude-haiku-4-5", max_tokens=8, messages=HI) as s:
        assert s.get_final_message().content
    assert len(backup.arrived()) == 5
    assert eu.arrived() == []  # nothing reached the eu backend
    # The same model unbound goes to backup-eu next, as its chain says: the binding made the difference.
    assert _client(world.gw.url, world.gw.api_key).messages.create(
        model="claude-haiku-4-5", max_tokens=8, messages=HI).content
    assert len(eu.arrived()) == 1


def test_a_bound_request_with_no_target_in_its_region_is_refused(world: World) -> None:
    c = _client(world.gw.url, _tenant_key(world, "acme-eu"))
    marks = world.flaky.mark(), world.backup.mark(), emulator_mark(world.gw)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model="claude-opus-4-1", max_tokens=8, messages=HI)
    err = e.value.body["error"]  # type: ignore[index]
    assert err["type"] == "permission_error"
    assert "bound to region 'eu'" in err["message"] and "no provider in that region" in err["message"]
    assert [m.arrived() for m in marks] == [[], [], []]
    # In its region it is served (the eu target of the haiku chain, directly).
    assert c.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HI).content
    assert len(marks[2].arrived()) == 1


def test_chain_endpoints_come_by_eds_over_the_configured_protocol(world: World) -> None:
    dump = httpx.get(f"{world.gw.admin_url}/config_dump?include_eds").json()["configs"]
    boot = next(c for c in dump if c["@type"].endswith("BootstrapConfigDump"))["bootstrap"]
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == {"sotw": "GRPC", "delta": "DELTA_GRPC"}[
        world.protocol]
    eds = next(c for c in dump if c["@type"].endswith("EndpointsConfigDump"))
    by_name = {e["endpoint_config"]["cluster_name"]: e for e in eds.get("dynamic_endpoint_configs", [])}
    assert {"chain_1_any", "chain_2_any", "chain_2_us"} <= set(by_name)
    levels = by_name["chain_2_us"]["endpoint_config"]["endpoints"]
    assert [lv.get("priority", 0) for lv in levels] == [0, 1]
    ports = [lv["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] for lv in levels]
    assert ports == [int(world.flaky.url.rsplit(":", 1)[1]), int(world.backup.url.rsplit(":", 1)[1])]


def test_a_saturated_provider_answers_529_at_once(world: World) -> None:
    """max_concurrent_requests 1, max_queued_requests 1: one call at the provider (it takes 4 s), one
    waiting; the next is refused at once with 529 overloaded_error in the Anthropic shape."""
    c = _client(world.gw.url, world.gw.api_key)
    slow = world.slow.mark()

    def pending() -> int:
        stats = httpx.get(f"{world.gw.admin_url}/stats?filter=provider_slow-us.upstream_rq_pending_active").text
        return int(stats.strip().rsplit(" ", 1)[-1] or 0)

    def until(cond: Any) -> None:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.messages.create, model="claude-slow-1", max_tokens=8, messages=HI)
        until(lambda: len(slow.arrived()) == 1)  # at the provider
        second = pool.submit(c.messages.create, model="claude-slow-1", max_tokens=8, messages=HI)
        until(lambda: pending() == 1)  # waiting for the one connection
        with pytest.raises(anthropic.APIStatusError) as e:
            c.messages.create(model="claude-slow-1", max_tokens=8, messages=HI)
        assert e.value.status_code == 529
        assert e.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert not first.done()  # refused while the others were still in flight
        assert first.result(timeout=20).content and second.result(timeout=20).content
    assert len(slow.arrived()) == 2  # the refused one never reached the provider


def test_a_split_keeps_each_principal_on_one_variant(world: World) -> None:
    for n in range(6):
        c = _client(world.gw.url, _tenant_key(world, f"ab-{n}"))
        us, eu = world.backup.mark(), emulator_mark(world.gw)
        for _ in range(3):
            assert c.messages.create(model="claude-ab-1", max_tokens=8, messages=HI).content
        got = (len(us.arrived()), len(eu.arrived()))
        assert got in ((3, 0), (0, 3)), got  # all three on the same variant
