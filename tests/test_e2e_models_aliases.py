"""Model aliases, GET /v1/models and failover across provider kinds, through the whole gateway: real
Envoy, extauth with the shipped policy, the real anthropic SDK; the Anthropic, Bedrock and Vertex
emulators as the providers.

Models (config `models`, `aliases`):
  claude-sonnet-4-5-20250929  targets [primary (Anthropic API, stoppable), bedrock]   alias claude-sonnet
  claude-opus-4-1-20250805    targets [flaky (Anthropic API, always 529, region eu), vertex]
  claude-haiku-*              the built-in emulator, listing claude-haiku-4-5-20251001   alias fast
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from ccr.procs import Child, spawn, wait_ready_file
from ccr.supervisor import Gateway
from extauth.keys import create_key
from tests.harness import REPO, RecordMark, emulator_mark, log_row, running_gateway
from tests.provider_emulators import Emulators, running_emulators

KEY = "sk-ant-models-test"
KEY_ENV = "CCR_T_MODELS_KEY"
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
    primary: Emu
    flaky: Emu
    clouds: Emulators


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("models")
    primary, flaky = _emulator(d, "primary"), _emulator(d, "flaky", "--fault-rate", "529=1")
    pol = d / "policies"
    shutil.copytree(REPO / "policies", pol)
    data = json.loads((pol / "data.json").read_text())
    data["residency"]["tenants"] = {"acme-eu": "eu"}
    (pol / "data.json").write_text(json.dumps(data))
    (d / "clouds").mkdir()
    (d / "gw").mkdir()
    with running_emulators(d / "clouds") as clouds:
        def edit(cfg: dict[str, Any]) -> None:
            cfg["policy"]["dir"] = str(pol)
            bedrock, vertex = [p for p in clouds.providers() if p["name"] in ("bedrock", "vertex")]
            cfg["providers"] += [
                {"name": "primary", "endpoint": primary.url, "api_key_env": KEY_ENV},
                {"name": "flaky", "endpoint": flaky.url, "api_key_env": KEY_ENV, "region": "eu"},
                bedrock, vertex,
            ]
            cfg["models"] = [
                {"match": SONNET, "targets": ["primary", "bedrock"]},
                {"match": OPUS, "targets": ["flaky", "vertex"]},
                {"match": "claude-haiku-*", "provider": "anthropic", "listed": [HAIKU]},
            ]
            cfg["aliases"] = {"claude-sonnet": SONNET, "fast": HAIKU}

        saved = {k: os.environ.get(k) for k in [*clouds.env(), KEY_ENV]}
        os.environ.update({**clouds.env(), KEY_ENV: KEY})
        try:
            with running_gateway(d / "gw", edit) as gw:
                yield World(gw, primary, flaky, clouds)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            primary.child.stop()
            flaky.child.stop()


def _client(w: World, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=w.gw.url, api_key=key or w.gw.api_key, max_retries=0)


def _key(w: World, groups: list[str], tenant: str | None = None) -> str:
    _, key = create_key(w.gw.runtime.postgres_dsn, f"m-{os.urandom(3).hex()}", groups, tenant=tenant)
    return key


# -- aliases ----------------------------------------------------------------------------------------


def test_an_alias_reaches_the_provider_as_its_model_and_the_row_has_both(world: World) -> None:
    # Odd spacing, a non-ASCII prompt and the model after the messages: only the model's bytes change.
    body = '{"max_tokens": 8,\n "messages":[{"role":"user","content":"h\u00e9 \\"model\\": x"}] , "model" :  "fast" }'
    sent = body.encode()
    mark = emulator_mark(world.gw)
    r = httpx.post(f"{world.gw.url}/v1/messages", content=sent, headers={
        "x-api-key": world.gw.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json",
        # A client can never route by header: these are stripped before anyone reads them.
        "x-ccr-cluster": "provider_bedrock_translate", "x-ccr-provider": "bedrock", "x-ccr-model": SONNET,
        "x-ccr-model-span": "0,1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == HAIKU  # the provider answered for the concrete model
    [rec] = mark.arrived()
    expected = sent.replace(b'"fast"', f'"{HAIKU}"'.encode())
    assert rec["body_sha256"] == hashlib.sha256(expected).hexdigest() and rec["body_length"] == len(expected)
    row = log_row(world.gw.runtime.postgres_dsn, r.headers["x-request-id"])
    assert (row["model"], row["model_requested"]) == (HAIKU, "fast")
    assert row["upstream_cluster"] == "provider_anthropic"


def test_a_large_aliased_body_is_rewritten_whole(world: World) -> None:
    """Above the listener's per-connection buffer (1 MiB): the alias step buffers up to max_request_bytes."""
    sent = json.dumps({"model": "fast", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}).encode()
    mark = emulator_mark(world.gw)
    r = httpx.post(f"{world.gw.url}/v1/messages", content=sent, timeout=60, headers={
        "x-api-key": world.gw.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    expected = sent.replace(b'"fast"', f'"{HAIKU}"'.encode(), 1)
    [rec] = mark.arrived()
    assert rec["body_sha256"] == hashlib.sha256(expected).hexdigest()


def test_an_alias_streams_and_fails_over_as_its_model(world: World) -> None:
    c = _client(world)
    with c.messages.stream(model="fast", max_tokens=8, messages=HI) as s:
        assert s.get_final_message().model == HAIKU
    primary = world.primary.mark()
    msg = c.messages.create(model="claude-sonnet", max_tokens=8, messages=HI)
    assert msg.model == SONNET and len(primary.arrived()) == 1
    # A model that is no alias and matches no model: refused before anything is forwarded.
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="claude-sonnet-9", max_tokens=8, messages=HI)
    err = e.value.body["error"]  # type: ignore[index]
    assert err["type"] == "not_found_error" and err["message"].startswith("model: claude-sonnet-9 is not a model")


def test_an_alias_from_openai_and_bedrock_clients_is_translated_as_its_model(world: World) -> None:
    mark = emulator_mark(world.gw)
    oa = openai.OpenAI(base_url=f"{world.gw.url}/v1", api_key=world.gw.api_key, max_retries=0)
    done = oa.chat.completions.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content and done.model == HAIKU  # the provider was asked for HAIKU
    # A Bedrock client names the alias in the path.
    r = httpx.post(f"{world.gw.url}/model/fast/invoke", headers={"x-api-key": world.gw.api_key}, timeout=30,
                   json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": HI})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == HAIKU
    recs = mark.arrived()
    assert [(x["path"], x["status"]) for x in recs] == [("/v1/messages", 200)] * 2
    row = log_row(world.gw.runtime.postgres_dsn, r.headers["x-request-id"])
    assert (row["model"], row["model_requested"]) == (HAIKU, "fast")


def test_policy_decides_on_the_model_an_alias_resolves_to(world: World) -> None:
    haiku = _client(world, _key(world, ["haiku-only"]))
    assert haiku.messages.create(model="fast", max_tokens=8, messages=HI).model == HAIKU
    with pytest.raises(anthropic.PermissionDeniedError) as e:  # an alias never widens access
        haiku.messages.create(model="claude-sonnet", max_tokens=8, messages=HI)
    assert SONNET in e.value.body["error"]["message"]  # type: ignore[index]


# -- GET /v1/models ---------------------------------------------------------------------------------


ALL = [HAIKU, "fast", "claude-sonnet", SONNET, OPUS]


def test_models_list_shows_what_each_callers_policy_allows(world: World) -> None:
    full, haiku = _client(world), _client(world, _key(world, ["haiku-only"]))
    marks = emulator_mark(world.gw), world.primary.mark()
    assert [m.id for m in full.models.list()] == ALL
    assert [m.id for m in haiku.models.list()] == [HAIKU, "fast"]
    # Auto-pagination over pages of two (after_id = the previous page's last_id).
    assert [m.id for m in full.models.list(limit=2)] == ALL
    first = full.models.list(limit=2)
    assert (first.has_more, first.first_id, first.last_id) == (True, HAIKU, "fast")
    back = full.models.list(limit=2, before_id=SONNET)
    assert [m.id for m in back.data] == ["fast", "claude-sonnet"] and back.has_more
    last = full.models.list(limit=2, after_id="claude-sonnet")
    assert [m.id for m in last.data] == [SONNET, OPUS] and not last.has_more
    one = full.models.retrieve(SONNET)
    assert (one.id, one.display_name, one.type) == (SONNET, "Claude Sonnet 4.5", "model")
    assert one.created_at.isoformat().startswith("2025-09-29")
    assert haiku.models.retrieve("fast").display_name == "Claude Haiku 4.5 (fast)"
    with pytest.raises(anthropic.NotFoundError):  # not allowed reads as absent
        haiku.models.retrieve(SONNET)
    with pytest.raises(anthropic.BadRequestError):
        full.models.list(limit=0)
    # Answered by the gateway: no provider was asked.
    assert [m.arrived() for m in marks] == [[], []]


def test_models_list_leaves_out_models_a_region_binding_cannot_reach(world: World) -> None:
    eu = _client(world, _key(world, ["default"], tenant="acme-eu"))
    # Bound to eu: only opus has a target there (flaky); the haiku and sonnet providers have no region.
    assert [m.id for m in eu.models.list()] == [OPUS]


# -- failover across provider kinds -----------------------------------------------------------------


def test_cross_provider_chain_is_one_cluster_with_the_adapter_on_its_last_level(world: World) -> None:
    dump = httpx.get(f"{world.gw.admin_url}/config_dump").json()["configs"]
    clusters = next(c for c in dump if c["@type"].endswith("ClustersConfigDump"))["dynamic_active_clusters"]
    chain = next(c["cluster"] for c in clusters if c["cluster"]["name"] == "chain_0_any")
    opts = chain["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    names = [f["name"] for f in opts["http_filters"]]
    assert "ccr.chain.bedrock.adapter" in names and "ccr.chain.meter" in names


def test_a_request_caused_error_is_not_failed_over_to_another_kind(world: World) -> None:
    before = len(world.clouds.bedrock.records)
    with pytest.raises(anthropic.BadRequestError) as e:
        _client(world).messages.create(model=SONNET, max_tokens=100_000, messages=HI, stream=True)
    assert "64000" in e.value.body["error"]["message"]  # type: ignore[index]
    assert len(world.clouds.bedrock.records) == before


def test_529_fails_over_to_vertex_streamed_and_not(world: World) -> None:
    c = _client(world)
    flaky, before_vertex = world.flaky.mark(), len(world.clouds.vertex.records)
    raw = c.messages.with_raw_response.create(model=OPUS, max_tokens=16, messages=HI)
    msg = raw.parse()
    assert msg.content[0].text.startswith("Emulated reply to: hi")
    with c.messages.stream(model=OPUS, max_tokens=16, messages=HI) as s:
        assert [e.type for e in s][0] == "message_start"
        assert s.get_final_message().content[0].text.startswith("Emulated reply to: hi")
    assert [r["status"] for r in flaky.arrived()] == [529, 529]  # tried first each time, answered 529
    recs = world.clouds.vertex.records[before_vertex:]
    assert len(recs) == 2
    assert recs[0]["path"].endswith("/claude-opus-4-1@20250805:rawPredict")
    assert recs[1]["path"].endswith("/claude-opus-4-1@20250805:streamRawPredict")
    # The Anthropic key of the first attempt never reaches the second provider; no gateway header either.
    headers = {k.lower(): v for k, v in recs[0]["headers"].items()}
    assert "x-api-key" not in headers and not [h for h in headers if h.startswith("x-ccr-")]
    assert headers["authorization"].startswith("Bearer ya29.emulated-")
    row = log_row(world.gw.runtime.postgres_dsn, raw.headers["x-request-id"])
    assert row["status"] == 200 and row["usage_status"] == "complete" and row["output_tokens"] > 0


def test_a_residency_binding_holds_on_a_cross_provider_chain(world: World) -> None:
    eu = _client(world, _key(world, ["default"], tenant="acme-eu"))
    before = len(world.clouds.vertex.records)
    with pytest.raises(anthropic.APIStatusError) as e:  # its only eu target is overloaded; vertex is not in eu
        eu.messages.create(model=OPUS, max_tokens=8, messages=HI)
    assert e.value.status_code == 529
    assert len(world.clouds.vertex.records) == before


def test_count_tokens_of_a_cross_provider_chain_goes_to_its_first_target(world: World) -> None:
    """The adapter translates Messages calls only: count_tokens never takes the chain to Bedrock."""
    raw = _client(world).messages.with_raw_response.count_tokens(model="claude-sonnet", messages=HI)
    assert raw.parse().input_tokens > 0
    assert log_row(world.gw.runtime.postgres_dsn, raw.headers["x-request-id"])["upstream_cluster"] == "provider_primary"


def test_a_5xx_fails_over_but_a_stream_broken_after_its_first_byte_does_not(world: World) -> None:
    c = _client(world)
    before = len(world.clouds.bedrock.records)
    # The emulator honours x-emulator-fault (sent on by the gateway like any client header): the primary
    # answers 500, Bedrock answers the retry.
    msg = c.messages.create(model=SONNET, max_tokens=8, messages=HI, extra_headers={"x-emulator-fault": "500"})
    assert msg.content and len(world.clouds.bedrock.records) == before + 1
    # Cut after the first content: the client has its first bytes, so it sees the failure, no failover.
    events: list[str] = []
    with (pytest.raises(Exception, match="peer closed connection without sending complete message body"),
          c.messages.stream(model=SONNET, max_tokens=64, messages=HI,
                            extra_headers={"x-emulator-fault": "midstream-reset"}) as s):
        for e in s:
            events.append(e.type)
    assert events[:1] == ["message_start"]
    assert len(world.clouds.bedrock.records) == before + 1


def test_primary_stopped_mid_run_fails_over_to_bedrock_without_client_errors(world: World) -> None:
    c = _client(world)
    before = len(world.clouds.bedrock.records)
    for _ in range(3):
        assert c.messages.create(model=SONNET, max_tokens=8, messages=HI).content
    assert len(world.clouds.bedrock.records) == before  # the primary serves while it is up
    world.primary.child.stop()
    for _ in range(5):  # refused connections fail over to Bedrock: no client-visible error
        assert c.messages.create(model="claude-sonnet", max_tokens=8, messages=HI).content
    with c.messages.stream(model=SONNET, max_tokens=8, messages=HI) as s:
        assert s.get_final_message().content
    recs = world.clouds.bedrock.records[before:]
    assert len(recs) == 6 and all(r.get("status", 200) == 200 for r in recs)
    # The alias reached Bedrock as the concrete model, in Bedrock's spelling.
    assert recs[0]["path"] == "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke"
    assert recs[-1]["path"].endswith("/invoke-with-response-stream")
    assert json.loads(recs[0]["body"])["anthropic_version"] == "bedrock-2023-05-31"
