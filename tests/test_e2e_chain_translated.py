"""Failover chains that start with, or hold several, translated targets, through the whole gateway: real
Envoy, extauth, the adapter, the real anthropic SDK; two Bedrock emulators in two regions (each checks
SigV4 for its own region) and Anthropic API emulators.

Models (config `models`):
  claude-sonnet-4-5-20250929  targets [east (Bedrock us-east-1), west (Bedrock us-west-2)]
  claude-opus-4-1-20250805    targets [east, primary (Anthropic API)]
  claude-haiku-4-5-20251001   targets [flaky (Anthropic API, always 529), east, west]

Envoy's attempts share one request header map and a translating attempt rewrites it (`:path`,
content-length, SigV4 headers, no `anthropic-version`); router/chain_restore.lua puts the client's
headers back at the start of every attempt. Without it the second Bedrock attempt is sent with the
first one's path and headers and the Anthropic attempt after Bedrock has no API version.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccr.procs import Child, spawn, wait_ready_file
from ccr.supervisor import Gateway
from emulators import bedrock
from tests.harness import REPO, RecordMark, emulator_mark, log_row, running_gateway
from tests.provider_emulators import AWS_KEY_ID, AWS_SECRET, running_emulators

KEY = "sk-ant-chain-test"
KEY_ENV = "CCR_T_CHAIN_KEY"
HI = [{"role": "user", "content": "hi"}]
SONNET, OPUS, HAIKU = "claude-sonnet-4-5-20250929", "claude-opus-4-1-20250805", "claude-haiku-4-5-20251001"


@dataclass
class Emu:
    child: Child
    url: str

    def mark(self) -> RecordMark:
        return emulator_mark(self.url)


def _emulator(d: Path, name: str, *extra: str) -> Emu:
    child = spawn(name, [sys.executable, "-m", "emulators.anthropic", "--port", "0", "--api-key", KEY,
                         "--ready-file", str(d / f"{name}.ready"), *extra], d, cwd=REPO)
    return Emu(child, f"http://{wait_ready_file(child, d / f'{name}.ready')['address']}")


@dataclass
class World:
    gw: Gateway
    east: bedrock.BedrockEmulator
    west: bedrock.BedrockEmulator
    primary: Emu
    flaky: Emu


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("chain")
    primary, flaky = _emulator(d, "primary"), _emulator(d, "flaky", "--fault-rate", "529=1")
    (d / "clouds").mkdir()
    (d / "gw").mkdir()
    with running_emulators(d / "clouds") as clouds:
        west_runner, west_port, west = asyncio.run_coroutine_threadsafe(bedrock.start(
            access_key_id=AWS_KEY_ID, secret_access_key=AWS_SECRET, region="us-west-2"), clouds.loop).result(30)

        def edit(cfg: dict[str, Any]) -> None:
            east = {**next(p for p in clouds.providers() if p["name"] == "bedrock"), "name": "east"}
            cfg["providers"] += [
                east, {**east, "name": "west", "region": "us-west-2", "endpoint": f"http://127.0.0.1:{west_port}"},
                {"name": "primary", "endpoint": primary.url, "api_key_env": KEY_ENV},
                {"name": "flaky", "endpoint": flaky.url, "api_key_env": KEY_ENV},
            ]
            cfg["models"] = [
                {"match": SONNET, "targets": ["east", "west"]},
                {"match": OPUS, "targets": ["east", "primary"]},
                {"match": HAIKU, "targets": ["flaky", "east", "west"]},
            ]

        saved = {k: os.environ.get(k) for k in [*clouds.env(), KEY_ENV]}
        os.environ.update({**clouds.env(), KEY_ENV: KEY})
        try:
            with running_gateway(d / "gw", edit) as gw:
                yield World(gw, clouds.bedrock, west, primary, flaky)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            asyncio.run_coroutine_threadsafe(west_runner.cleanup(), clouds.loop).result(30)
            primary.child.stop()
            flaky.child.stop()


@pytest.fixture
def east_down(world: World) -> Iterator[None]:
    world.east.fail_status = 500
    try:
        yield
    finally:
        world.east.fail_status = None


def _client(w: World) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=w.gw.url, api_key=w.gw.api_key, max_retries=0)


def _signed_for(rec: dict[str, Any], region: str) -> bool:
    return f"/{region}/bedrock/aws4_request" in rec["headers"].get("Authorization", "")


def _clean(rec: dict[str, Any]) -> bool:
    """No Anthropic credential or version, no gateway header reached Bedrock."""
    names = {k.lower() for k in rec["headers"]}
    return not names & {"x-api-key", "anthropic-version"} and not [h for h in names if h.startswith("x-ccr-")]


def test_bedrock_region_fails_over_to_another_region_unstreamed_and_streamed(world: World, east_down: None) -> None:
    c = _client(world)
    e0, w0 = len(world.east.records), len(world.west.records)
    raw = c.messages.with_raw_response.create(model=SONNET, max_tokens=16, messages=HI)
    assert raw.parse().content[0].text.startswith("Emulated reply to: hi")
    with c.messages.stream(model=SONNET, max_tokens=16, messages=HI) as s:
        assert [e.type for e in s][0] == "message_start"
        assert s.get_final_message().content[0].text.startswith("Emulated reply to: hi")
    east, west = world.east.records[e0:], world.west.records[w0:]
    # Each region was asked once per call, each signed for its own region; east answered 500, west 200.
    assert [r["status"] for r in east] == [500, 500] and [r["status"] for r in west] == [200, 200]
    assert all(_signed_for(r, "us-east-1") for r in east) and all(_signed_for(r, "us-west-2") for r in west)
    assert west[0]["path"] == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert west[1]["path"] == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
    assert west[0]["body"] == east[0]["body"] and json.loads(west[0]["body"])["anthropic_version"]
    assert all(_clean(r) for r in east + west)
    row = log_row(world.gw.runtime.postgres_dsn, raw.headers["x-request-id"])
    assert row["status"] == 200 and row["usage_status"] == "complete" and row["output_tokens"] > 0


def test_a_400_from_the_first_region_is_not_failed_over(world: World) -> None:
    c = _client(world)
    world.east.fail_status = 400
    w0 = len(world.west.records)
    try:
        with pytest.raises(anthropic.BadRequestError):
            c.messages.create(model=SONNET, max_tokens=16, messages=HI)
        with pytest.raises(anthropic.BadRequestError), c.messages.stream(model=SONNET, max_tokens=16, messages=HI) as s:
            list(s)
    finally:
        world.east.fail_status = None
    assert len(world.west.records) == w0


def test_bedrock_fails_over_to_the_anthropic_api(world: World, east_down: None) -> None:
    c = _client(world)
    e0, primary = len(world.east.records), world.primary.mark()
    assert c.messages.create(model=OPUS, max_tokens=16, messages=HI).content[0].text.startswith("Emulated reply")
    with c.messages.stream(model=OPUS, max_tokens=16, messages=HI) as s:
        assert s.get_final_message().content[0].text.startswith("Emulated reply")
    assert [r["status"] for r in world.east.records[e0:]] == [500, 500]
    recs = primary.arrived()
    assert len(recs) == 2
    for r in recs:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        # The client's request as sent: its path and API version, the Anthropic key, no SigV4 or gateway header.
        assert r["path"] == "/v1/messages"
        assert headers["anthropic-version"] and headers["x-api-key"] == KEY
        assert not [h for h in headers if h.startswith(("x-amz-", "x-ccr-"))] and "authorization" not in headers


def test_anthropic_then_two_bedrock_regions(world: World, east_down: None) -> None:
    c = _client(world)
    flaky, e0, w0 = world.flaky.mark(), len(world.east.records), len(world.west.records)
    assert c.messages.create(model=HAIKU, max_tokens=16, messages=HI).content[0].text.startswith("Emulated reply")
    with c.messages.stream(model=HAIKU, max_tokens=16, messages=HI) as s:
        assert s.get_final_message().content
    assert [r["status"] for r in flaky.arrived()] == [529, 529]
    assert [r["status"] for r in world.east.records[e0:]] == [500, 500]
    west = world.west.records[w0:]
    assert [r["status"] for r in west] == [200, 200] and all(_signed_for(r, "us-west-2") and _clean(r) for r in west)


def test_a_region_that_resets_connections_fails_over_streamed_and_not(world: World) -> None:
    c = _client(world)
    e0, w0 = len(world.east.records), len(world.west.records)
    world.east.reset = True
    try:
        assert c.messages.create(model=SONNET, max_tokens=8, messages=HI).content
        with c.messages.stream(model=SONNET, max_tokens=8, messages=HI) as s:
            assert s.get_final_message().content
    finally:
        world.east.reset = False
    assert [r["status"] for r in world.east.records[e0:]] == [0, 0]
    assert [r["status"] for r in world.west.records[w0:]] == [200, 200]


def test_with_every_target_up_the_first_serves(world: World) -> None:
    c = _client(world)
    e0, w0 = len(world.east.records), len(world.west.records)
    assert c.messages.create(model=SONNET, max_tokens=8, messages=HI).content
    assert [r["status"] for r in world.east.records[e0:]] == [200] and len(world.west.records) == w0

