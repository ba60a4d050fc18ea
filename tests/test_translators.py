"""The adapter's translators, in process: signing, event-stream framing, schema mapping, pings,
token refresh, model naming and the one registry of pairs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from google.oauth2 import service_account

from ccr.config import ConfigError, ProviderKind, parse_config
from ccr.provider_models import from_bedrock, to_bedrock, to_vertex
from extauth.endpoints import match, non_canonical
from router.adapter.translators import PAIRS, client_schema, translation_for
from router.adapter.translators.anthropic_api import AnthropicApi
from router.adapter.translators.base import TranslationError
from router.adapter.translators.bedrock import AwsKeys, Bedrock, BedrockStreamDecoder, sign
from router.adapter.translators.eventstream import chunk_event, exception_event, frame
from router.adapter.translators.openai_client import to_anthropic
from router.adapter.translators.openai_provider import ChatStreamDecoder, OpenAICompatible, to_chat_request
from router.adapter.translators.vertex import TokenSource
from router.usage import assess

KEYS = AwsKeys("AKIDEXAMPLETESTKEY01", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


# ---------------------------------------------------------------------------- model ids, endpoints


def test_model_ids_across_providers() -> None:
    assert from_bedrock("us.anthropic.claude-sonnet-4-5-20250929-v1:0") == "claude-sonnet-4-5-20250929"
    assert from_bedrock("anthropic.claude-haiku-4-5-20251001-v1:0") == "claude-haiku-4-5-20251001"
    assert from_bedrock("global.anthropic.claude-opus-4-6-v1") == "claude-opus-4-6"
    assert from_bedrock("meta.llama3-70b-instruct-v1:0") == "meta.llama3-70b-instruct-v1:0"  # kept, not guessed
    assert to_bedrock("claude-sonnet-4-6") == "anthropic.claude-sonnet-4-6-v1:0"
    assert to_bedrock("claude-sonnet-4-6", {"claude-sonnet-4-6": "us.anthropic.x-v1:0"}) == "us.anthropic.x-v1:0"
    assert to_vertex("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5@20250929"
    assert to_vertex("claude-sonnet-4-6") == "claude-sonnet-4-6"


def test_client_schema_endpoints() -> None:
    m = match("POST", "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke")
    assert m is not None and m.name == "messages.bedrock_invoke" and m.endpoint.schema == "bedrock"
    assert non_canonical("/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke") is None
    assert match("POST", "/model/x/invoke-with-response-stream").name == "messages.bedrock_invoke_stream"  # type: ignore[union-attr]
    assert match("POST", "/v1/chat/completions").endpoint.schema == "openai"  # type: ignore[union-attr]
    # The colon is allowed only on the Bedrock paths; everywhere else it is still refused.
    assert non_canonical("/v1/messages:x") is not None
    assert match("POST", "/model/a:b/other") is None and match("GET", "/model/x/invoke") is None
    assert client_schema("/v1/messages") == "anthropic" and client_schema("/v1/messages/batches") is None


def test_every_client_schema_reaches_every_kind() -> None:
    """The registry holds every pair except the passthrough one, which never reaches the adapter."""
    want = {(s, k) for s in ("anthropic", "openai", "bedrock") for k in ProviderKind} - {
        ("anthropic", ProviderKind.anthropic)}
    assert set(PAIRS) == want


def test_config_kind_fields() -> None:
    base = {"models": [{"match": "*", "provider": "b"}]}
    with pytest.raises(ConfigError, match="kind bedrock needs region"):
        parse_config({**base, "providers": [{"name": "b", "kind": "bedrock"}]})
    with pytest.raises(ConfigError, match="kind vertex needs"):
        parse_config({**base, "providers": [{"name": "b", "kind": "vertex", "region": "r"}]})
    with pytest.raises(ConfigError, match="api_key_env does not apply"):
        parse_config({**base, "providers": [{"name": "b", "kind": "bedrock", "region": "r", "api_key_env": "X",
                                             "aws_access_key_id_env": "A", "aws_secret_access_key_env": "S"}]})
    cfg = parse_config({**base, "providers": [{"name": "b", "kind": "openai", "endpoint": "http://127.0.0.1:1"}]})
    assert cfg.providers[0].cluster_for("anthropic") == "provider_b_translate"


# ---------------------------------------------------------------------------- Bedrock


def _verify(host: str, path: str, body: bytes, headers: dict[str, str]) -> str | None:
    from aiohttp.test_utils import make_mocked_request

    from emulators.bedrock import BedrockEmulator

    emu = BedrockEmulator(KEYS.access_key_id, KEYS.secret_access_key, "us-east-1")
    req = make_mocked_request("POST", path, headers={"host": host, **headers})
    return emu.verify(req, body)


def test_sigv4_signature_verifies_and_tampering_fails() -> None:
    up = run(Bedrock("us-east-1", "127.0.0.1:9", KEYS).build(
        {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
         "stream": True, "_betas": ["b1"]}, streaming=True))
    assert up.path == "/model/anthropic.claude-sonnet-4-6-v1%3A0/invoke-with-response-stream"
    body = json.loads(up.body)
    assert body["anthropic_version"] == "bedrock-2023-05-31" and body["anthropic_beta"] == ["b1"]
    assert "model" not in body and "stream" not in body
    assert _verify("127.0.0.1:9", up.path, up.body, up.headers) is None
    assert "does not match" in str(_verify("127.0.0.1:9", up.path, up.body.replace(b"hi", b"ho"), up.headers))
    assert "does not match" in str(_verify("127.0.0.1:9", up.path.replace("stream", "strea"), up.body, up.headers))
    wrong = sign(AwsKeys(KEYS.access_key_id, "not-the-secret"), "us-east-1", "127.0.0.1:9", up.path, up.body,
                 {"content-type": "application/json", "accept": "application/vnd.amazon.eventstream"})
    assert "does not match" in str(_verify("127.0.0.1:9", up.path, up.body, {**up.headers, **wrong}))


def test_event_stream_round_trip_through_botocore() -> None:
    events = [{"type": "message_start", "message": {"usage": {"input_tokens": 5}}}, {"type": "message_stop",
              "amazon-bedrock-invocationMetrics": {"inputTokenCount": 5}}]
    data = b"".join(chunk_event(e) for e in events) + exception_event("throttlingException", "slow down")
    buf = EventStreamBuffer()
    buf.add_data(data)
    msgs = list(buf)
    assert [m.headers[":message-type"] for m in msgs] == ["event", "event", "exception"]
    assert json.loads(base64.b64decode(json.loads(msgs[0].payload)["bytes"])) == events[0]
    # Decoded byte by byte: any chunking gives the same events; metrics are not passed on.
    d = BedrockStreamDecoder()
    got = [e for i in range(len(data)) for e in d.feed(data[i:i + 1])]
    assert got == [events[0], {"type": "message_stop"},
                   {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}]
    bad = bytearray(frame({":event-type": "chunk"}, b"{}"))
    bad[-1] ^= 1  # the message CRC no longer matches: botocore refuses our framing then
    buf = EventStreamBuffer()
    buf.add_data(bytes(bad))
    with pytest.raises(ChecksumMismatch):
        list(buf)


# ---------------------------------------------------------------------------- OpenAI-compatible


def test_anthropic_to_chat_request() -> None:
    req = {"model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "sys"}], "stop_sequences": ["X"],
           "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
           "tool_choice": {"type": "any"},
           "messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": [{"type": "thinking", "thinking": "…", "signature": "s"},
                                                          {"type": "text", "text": "calling"},
                                                          {"type": "tool_use", "id": "tu1", "name": "t",
                                                           "input": {"a": 1}}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1", "content": "42"},
                                                     {"type": "text", "text": "thanks"}]}]}
    body = to_chat_request(req, "served", streaming=True)
    assert body["model"] == "served" and body["stop"] == ["X"] and body["tool_choice"] == "required"
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "tu1", "type": "function", "function": {"name": "t", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "tu1", "content": "42"}, {"role": "user", "content": "thanks"}]
    assert body["tools"][0]["function"] == {"name": "t", "description": "d", "parameters": {"type": "object"}}


def _chunks(*docs: Any) -> bytes:
    return b"".join(b"data: " + (d if isinstance(d, bytes) else orjson.dumps(d)) + b"\n\n" for d in docs)


def test_chat_stream_to_anthropic_events_any_chunking() -> None:
    stream = _chunks(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                            "function": {"name": "f", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}},
        b"[DONE]")
    for step in (1, 7, len(stream)):
        d = ChatStreamDecoder("m")
        events = [e for i in range(0, len(stream), step) for e in d.feed(stream[i:i + step])] + d.finish()
        types = [e["type"] for e in events]
        assert types == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                         "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                         "content_block_stop", "message_delta", "message_stop"]
        assert events[5]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
        assert events[-2]["delta"]["stop_reason"] == "tool_use"
        assert events[-2]["usage"]["input_tokens"] == 11 and events[-2]["usage"]["output_tokens"] == 7


def test_chat_stream_cut_off_is_an_error_event_and_estimated() -> None:
    t = translation_for("anthropic", ProviderKind.openai, OpenAICompatible(), ping_interval_s=10)
    assert t is not None
    run(t.request("/v1/messages", orjson.dumps({"model": "m", "max_tokens": 9, "stream": True,
                                                "messages": [{"role": "user", "content": "x"}]}), None))
    t.start_stream()
    out, _ = t.stream_chunk(_chunks({"choices": [{"index": 0, "delta": {"content": "partial answer"}}]}), end=False)
    out2, _ = t.stream_chunk(b"", end=True)  # the server hung up: no finish reason, no [DONE]
    assert b"event: error" in out2 and b"message_stop" not in out + out2
    a = assess(t.meter.finish(), True, ended=True)  # type: ignore[union-attr]
    assert a.status.value == "estimated" and a.usage is not None and a.usage["output_tokens"] >= 1


def test_openai_client_request_mapping_and_refusals() -> None:
    req, streaming, usage = to_anthropic({
        "model": "m", "stream": True, "stream_options": {"include_usage": True}, "stop": "END",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "look"},
                                                  {"type": "image_url",
                                                   "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"q\": 1}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "done"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert streaming and usage and req["system"] == "be brief" and req["max_tokens"] == 4096
    assert req["stop_sequences"] == ["END"] and req["tool_choice"] == {"type": "tool", "name": "f"}
    assert req["messages"][0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}
    assert req["messages"][1]["content"] == [{"type": "tool_use", "id": "c1", "name": "f", "input": {"q": 1}}]
    assert req["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "c1", "content": "done"}]
    for bad, why in [({"n": 3}, "n: only 1"), ({"messages": []}, "non-empty"),
                     ({"messages": [{"role": "wizard", "content": "x"}]}, "role")]:
        with pytest.raises(TranslationError, match=why):
            to_anthropic({"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})


# ---------------------------------------------------------------------------- pings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


def test_pings_after_silence_from_a_provider_without_keepalives() -> None:
    clock = FakeClock()
    t = translation_for("anthropic", ProviderKind.openai, OpenAICompatible(), ping_interval_s=5, clock=clock)
    assert t is not None
    run(t.request("/v1/messages", orjson.dumps({"model": "m", "max_tokens": 9, "stream": True,
                                                "messages": [{"role": "user", "content": "x"}]}), None))
    t.start_stream()
    first, _ = t.stream_chunk(_chunks({"choices": [{"index": 0, "delta": {"content": "a"}}]}), end=False)
    # The Anthropic API's ping right after message_start.
    assert first.count(b"event: ping") == 1 and first.index(b"message_start") < first.index(b"event: ping")
    clock.now += 4.9
    soon, _ = t.stream_chunk(_chunks({"choices": [{"index": 0, "delta": {"content": "b"}}]}), end=False)
    assert b"ping" not in soon
    clock.now += 5.0
    late, _ = t.stream_chunk(_chunks({"choices": [{"index": 0, "delta": {"content": "c"}}]}), end=False)
    assert late.startswith(b"event: ping\n")


def test_no_added_pings_for_providers_that_send_their_own() -> None:
    clock = FakeClock()
    t = translation_for("openai", ProviderKind.anthropic, AnthropicApi(), ping_interval_s=1, clock=clock)
    assert t is not None
    run(t.request("/v1/chat/completions", orjson.dumps({"model": "m", "stream": True,
                                                        "messages": [{"role": "user", "content": "x"}]}), None))
    t.start_stream()
    clock.now += 100
    out, _ = t.stream_chunk(b"event: message_start\n" + _sse({"type": "message_start", "message": {
        "model": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}), end=False)
    assert b": ping" not in out and out.startswith(b"data: ")  # nothing added on the gateway's own timer
    out, _ = t.stream_chunk(b"event: ping\n" + _sse({"type": "ping"}), end=False)
    assert out == b": ping\n\n"  # the provider's own keep-alive reaches the OpenAI client as a comment


# ---------------------------------------------------------------------------- Vertex tokens


def test_token_refreshed_before_expiry(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    creds = service_account.Credentials.from_service_account_info({
        "type": "service_account", "project_id": "p", "private_key_id": "k", "private_key": pem,
        "client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1", "token_uri": "http://127.0.0.1:1/token"})
    minted: list[int] = []

    def refresh(_request: object) -> None:  # stands in for the token endpoint round trip
        minted.append(1)
        creds.token = f"tok{len(minted)}"
        creds.expiry = dt.datetime(2030, 1, 1, 1, 0, 0)  # naive UTC, as google-auth keeps it

    creds.refresh = refresh  # type: ignore[method-assign]
    clock = FakeClock()
    start = dt.datetime(2030, 1, 1, 0, 0, 0, tzinfo=dt.UTC).timestamp()
    clock.now = start
    ts = TokenSource(creds, margin_s=300, clock=clock)
    assert run(ts.token()) == "tok1" and run(ts.token()) == "tok1" and ts.refreshes == 1
    clock.now = start + 3600 - 301  # still outside the margin
    assert run(ts.token()) == "tok1"
    clock.now = start + 3600 - 299  # inside the margin: refreshed before it expires
    assert run(ts.token()) == "tok2" and ts.refreshes == 2
