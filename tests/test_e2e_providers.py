"""Every provider path end to end: the real anthropic and openai SDKs through real Envoy, the
adapter translating per attempt, to the Bedrock, Vertex and OpenAI-compatible emulators (and the
Anthropic emulator for OpenAI and Bedrock clients), streamed and not, with usage in request_log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from botocore.eventstream import EventStreamBuffer

from ccr.supervisor import Gateway
from tests.harness import log_row, running_gateway
from tests.provider_emulators import Emulators, running_emulators

HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def emus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulators]:
    with running_emulators(tmp_path_factory.mktemp("emus")) as e:
        yield e


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, emus: Emulators) -> Iterator[Gateway]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["providers"] += emus.providers()
        cfg["models"] = emus.models() + cfg["models"]

    saved = {k: os.environ.get(k) for k in emus.env()}
    os.environ.update(emus.env())  # `ccr up` reads them and hands them to the adapter (or Envoy) only
    try:
        with running_gateway(tmp_path_factory.mktemp("gw"), edit) as g:
            yield g
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)


def oa(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.api_key, max_retries=0)


def _complete_row(dsn: str, request_id: str, inp: int, out: int) -> dict[str, Any]:
    row = log_row(dsn, request_id)
    assert row["usage_status"] == "complete", row
    assert (row["input_tokens"], row["output_tokens"]) == (inp, out), row
    return row


@pytest.mark.parametrize("model", ["claude-bedrock-sonnet-4-5", "claude-vertex-sonnet-4-5", "claude-oss-1"])
def test_anthropic_sdk_unstreamed(gw: Gateway, dsn: str, model: str) -> None:
    raw = client(gw).messages.with_raw_response.create(model=model, max_tokens=64, messages=HELLO)
    msg = raw.parse()
    assert msg.type == "message" and msg.model == model
    assert msg.content[0].type == "text" and msg.content[0].text.startswith("Emulated reply to: hello there")
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    _complete_row(dsn, raw.headers["x-request-id"], msg.usage.input_tokens, msg.usage.output_tokens)


@pytest.mark.parametrize("model", ["claude-bedrock-sonnet-4-5", "claude-vertex-sonnet-4-5", "claude-oss-1"])
def test_anthropic_sdk_streamed(gw: Gateway, dsn: str, model: str) -> None:
    with client(gw).messages.stream(model=model, max_tokens=64, messages=HELLO) as s:
        types = [e.type for e in s]
        final = s.get_final_message()
        rid = s.response.headers["x-request-id"]
    assert types[0] == "message_start"
    assert final.content[0].text.startswith("Emulated reply to: hello there")
    assert final.stop_reason == "end_turn"
    row = log_row(dsn, rid)
    assert row["usage_status"] == "complete", row
    assert row["output_tokens"] == final.usage.output_tokens > 0
    assert row["input_tokens"] == final.usage.input_tokens > 0


@pytest.mark.parametrize("model", ["claude-bedrock-sonnet-4-5", "claude-vertex-sonnet-4-5", "claude-oss-1"])
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_tool_use(gw: Gateway, model: str, stream: bool) -> None:
    kw: dict[str, Any] = {"model": model, "max_tokens": 200, "messages": [
        {"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"}}
    if stream:
        with client(gw).messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client(gw).messages.create(**kw)
    tool = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and tool and tool[0].name == "get_weather"
    assert tool[0].input == {"city": "example"}


def test_bedrock_upstream_is_signed_and_shaped(gw: Gateway, emus: Emulators) -> None:
    client(gw).messages.create(model="claude-bedrock-sonnet-4-5", max_tokens=16, messages=HELLO)
    rec = emus.bedrock.records[-1]
    assert rec["status"] == 200 and rec["path"] == "/model/anthropic.claude-bedrock-sonnet-4-5-v1%3A0/invoke"
    assert rec["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
    body = json.loads(rec["body"])
    assert body["anthropic_version"] == "bedrock-2023-05-31" and "model" not in body
    # The client's gateway key never reaches the provider.
    assert gw.api_key not in json.dumps(rec["headers"])


def test_vertex_upstream_token_and_naming(gw: Gateway, emus: Emulators) -> None:
    client(gw).messages.create(model="claude-vertex-sonnet-4-5", max_tokens=16, messages=HELLO)
    rec = emus.vertex.records[-1]
    assert rec["status"] == 200
    assert rec["path"].endswith("/publishers/anthropic/models/claude-vertex-sonnet-4-5:rawPredict")
    assert rec["headers"]["Authorization"].startswith("Bearer ya29.emulated-")
    assert emus.vertex.token_requests >= 1


def test_openai_sdk_to_openai_provider(gw: Gateway, dsn: str, emus: Emulators) -> None:
    raw = oa(gw).chat.completions.with_raw_response.create(
        model="claude-oss-1", max_tokens=64, messages=[{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hello there"}])
    r = raw.parse()
    assert r.choices[0].message.content.startswith("Emulated reply to: hello there")
    assert r.choices[0].finish_reason == "stop"
    _complete_row(dsn, raw.headers["x-request-id"], r.usage.prompt_tokens, r.usage.completion_tokens)
    up = json.loads(emus.openai.records[-1]["body"])
    assert up["model"] == "qwen/Qwen3-8B" and up["messages"][0] == {"role": "system", "content": "be brief"}
    assert emus.openai.records[-1]["headers"]["Authorization"] == "Bearer sk-oss-test-key"


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "claude-oss-1", "claude-bedrock-sonnet-4-5"])
def test_openai_sdk_streamed_with_usage(gw: Gateway, dsn: str, model: str) -> None:
    with oa(gw).chat.completions.with_streaming_response.create(
            model=model, max_tokens=64, messages=[{"role": "user", "content": "hello there"}], stream=True,
            stream_options={"include_usage": True}) as raw:
        rid = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Emulated reply to: hello there")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    row = log_row(dsn, rid)
    assert row["usage_status"] == "complete"
    assert row["output_tokens"] == usage.completion_tokens > 0


def test_openai_sdk_tool_calls(gw: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}]
    for model in ("claude-sonnet-4-6", "claude-oss-1"):
        r = oa(gw).chat.completions.create(model=model, max_tokens=100, tools=tools, tool_choice="required",
                                           messages=[{"role": "user", "content": "weather in Paris?"}])
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "example"}


def test_openai_error_shape(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oa(gw).chat.completions.create(model="claude-oss-1", n=2, messages=[{"role": "user", "content": "x"}])
    assert "n: only 1 choice" in e.value.message


def _bedrock_events(data: bytes) -> list[dict[str, Any]]:
    import base64

    buf = EventStreamBuffer()
    buf.add_data(data)
    return [json.loads(base64.b64decode(json.loads(m.payload)["bytes"])) for m in buf]


@pytest.mark.parametrize("model_id,provider", [
    ("us.anthropic.claude-sonnet-4-6-v1:0", "anthropic"),
    ("anthropic.claude-bedrock-sonnet-4-5-v1:0", "bedrock"),
    ("anthropic.claude-oss-1-v1:0", "oss"),
])
def test_bedrock_client(gw: Gateway, dsn: str, model_id: str, provider: str) -> None:
    """Claude Code in Bedrock mode (CLAUDE_CODE_SKIP_BEDROCK_AUTH, base URL at the gateway)."""
    h = {"x-api-key": gw.api_key, "content-type": "application/json"}
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": HELLO}
    r = httpx.post(f"{gw.url}/model/{model_id}/invoke", json=body, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"].startswith("Emulated reply to: hello there")
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["usage_status"] == "complete" and row["upstream_cluster"] == f"provider_{provider}_translate"
    assert row["model"] == model_id.split("anthropic.", 1)[1].removesuffix("-v1:0")  # the Anthropic API's id
    r = httpx.post(f"{gw.url}/model/{model_id}/invoke-with-response-stream", json=body, headers=h, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.amazon.eventstream"
    events = _bedrock_events(r.content)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text.startswith("Emulated reply to: hello there")
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["usage_status"] == "complete" and row["output_tokens"] > 0


def test_bedrock_client_error_shape(gw: Gateway) -> None:
    h = {"x-api-key": gw.api_key, "content-type": "application/json"}
    r = httpx.post(f"{gw.url}/model/anthropic.claude-oss-1-v1:0/invoke", headers=h, timeout=30,
                   json={"anthropic_version": "bedrock-2023-05-31", "model": "x", "max_tokens": 8, "messages": HELLO})
    assert r.status_code == 400 and r.headers["x-amzn-errortype"] == "ValidationException"
    assert "model" in r.json()["message"]


def test_provider_error_translated(gw: Gateway) -> None:
    """A Bedrock validation error comes back in the Anthropic shape, typed."""
    with pytest.raises(anthropic.BadRequestError) as e:
        client(gw).messages.create(model="claude-bedrock-sonnet-4-5", max_tokens=8, messages=HELLO,
                                   extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.mark.parametrize("model,pings", [("claude-bedrock-sonnet-4-5", 1), ("claude-oss-1", 1),
                                         ("claude-vertex-sonnet-4-5", 1)])
def test_streams_carry_pings(gw: Gateway, model: str, pings: int) -> None:
    """Bedrock and OpenAI-compatible servers send no keep-alives: the gateway adds the Anthropic
    API's ping after message_start; Vertex's own ping is passed on (not doubled)."""
    body = {"model": model, "max_tokens": 32, "messages": HELLO, "stream": True}
    h = {"x-api-key": gw.api_key, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, headers=h, timeout=30) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names.count("ping") == pings, names


@pytest.mark.parametrize("client_schema", ["anthropic", "openai"])
def test_pings_while_the_provider_is_silent(gw: Gateway, emus: Emulators, client_schema: str) -> None:
    """The OpenAI-compatible server stops after its first delta and sends nothing (held until the
    test releases it): the gateway keeps the client's stream alive with pings meanwhile (every
    0.05 s for this provider), then the rest of the reply arrives intact."""
    hold = f"silence-{client_schema}"
    h = {"x-api-key": gw.api_key, "anthropic-version": "2023-06-01", "x-emulator-hold": hold}
    url, body, ping = (f"{gw.url}/v1/messages", {"model": "claude-ping-1", "max_tokens": 64, "messages": HELLO,
                                                   "stream": True}, "event: ping") \
        if client_schema == "anthropic" else \
        (f"{gw.url}/v1/chat/completions", {"model": "claude-ping-1", "max_tokens": 64, "messages": HELLO,
                                           "stream": True}, ": ping")
    lines: list[str] = []
    with httpx.stream("POST", url, json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        pings_after_text = 0
        seen_text = False
        for line in it:
            lines.append(line)
            seen_text = seen_text or "Emulated" in line
            if seen_text and line == ping:
                pings_after_text += 1
                if pings_after_text == 3:  # three keep-alives during the silence: let the server go on
                    httpx.post(f"{emus.openai_url}/_emulator/release/{hold}", timeout=10)
                    break
        lines += list(it)
    done = "event: message_stop" if client_schema == "anthropic" else "data: [DONE]"
    assert pings_after_text == 3 and lines[-1] in (done, "") and done in lines


def test_count_tokens_on_a_translated_provider_is_a_clear_404(gw: Gateway, emus: Emulators) -> None:
    seen = len(emus.bedrock.records)
    with pytest.raises(anthropic.NotFoundError) as e:
        client(gw).messages.count_tokens(model="claude-bedrock-sonnet-4-5", messages=HELLO)
    assert "serves Messages calls only" in e.value.message
    assert len(emus.bedrock.records) == seen  # nothing reached the provider


def test_a_large_request_is_translated_whole(gw: Gateway, dsn: str, emus: Emulators) -> None:
    """3 MB of prompt (above the 1 MB per-connection buffer) reaches the OpenAI-compatible server whole."""
    big = "lorem ipsum " * 250_000
    raw = client(gw).messages.with_raw_response.create(model="claude-oss-1", max_tokens=16,
                                                       messages=[{"role": "user", "content": big + " end"}])
    assert raw.parse().content[0].text.startswith("Emulated reply to:")
    up = json.loads(emus.openai.records[-1]["body"])
    assert up["messages"][-1]["content"] == big + " end"
    assert log_row(dsn, raw.headers["x-request-id"])["usage_status"] == "complete"


@pytest.mark.parametrize("model_id,provider", [
    ("us.anthropic.claude-sonnet-4-6-v1:0", "anthropic"),
    ("anthropic.claude-bedrock-sonnet-4-5-v1:0", "bedrock"),
    ("anthropic.claude-vertex-sonnet-4-5-v1:0", "vertex"),
    ("anthropic.claude-oss-1-v1:0", "oss"),
])
def test_anthropic_bedrock_sdk(gw: Gateway, dsn: str, model_id: str, provider: str) -> None:
    """The SDK's Bedrock client (what Claude Code's Bedrock mode uses) with the gateway key as a
    Bedrock API key (AWS_BEARER_TOKEN_BEDROCK): sent as Authorization: Bearer, event-stream decoded
    by the SDK."""
    br = anthropic.AnthropicBedrock(api_key=gw.api_key, aws_region="us-east-1", base_url=gw.url, max_retries=0)
    raw = br.messages.with_raw_response.create(model=model_id, max_tokens=64, messages=HELLO)
    msg = raw.parse()
    assert msg.content[0].text.startswith("Emulated reply to: hello there")
    row = log_row(dsn, raw.headers["x-request-id"])
    assert row["usage_status"] == "complete" and row["upstream_cluster"] == f"provider_{provider}_translate"
    assert row["output_tokens"] == msg.usage.output_tokens
    with br.messages.stream(model=model_id, max_tokens=64, messages=HELLO) as s:
        final = s.get_final_message()
        rid = s.response.headers["x-request-id"]
    assert final.content[0].text.startswith("Emulated reply to: hello there") and final.stop_reason == "end_turn"
    row = log_row(dsn, rid)
    assert row["usage_status"] == "complete" and row["output_tokens"] == final.usage.output_tokens
