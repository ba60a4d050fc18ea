"""The Anthropic emulator, driven over real HTTP by the real `anthropic` SDK and httpx."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from emulators.anthropic import parse_fault_rates, start
from tests.harness import RecordMark, RecordsLost, emulator_mark

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-emulator-test-key"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


def _launch(tmp: Path, *args: str, env_key: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / f"ready-{uuid.uuid4().hex[:6]}.json"
    env = {k: v for k, v in os.environ.items() if k != "CCR_EMULATOR_API_KEY"}
    if env_key is not None:
        env["CCR_EMULATOR_API_KEY"] = env_key
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulators.anthropic", "--host", "127.0.0.1", "--port", "0",
         "--ready-file", str(ready), *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"emulator exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("emulator did not become ready")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    assert not Path(f"{ready}.tmp").exists()
    return proc, f"http://{info['address']}"


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
    return proc.returncode


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The key comes from the environment here; another test covers --api-key.
    proc, url = _launch(tmp_path_factory.mktemp("emu"), env_key=KEY)
    try:
        yield url
    finally:
        assert _stop(proc) == 0, "emulator must exit cleanly on SIGTERM"


@pytest.fixture()
def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def _records(base_url: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base_url}/_emulator/requests")
    assert r.status_code == 200
    return r.json()


def _parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------- messages


def test_non_streaming_message(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=200, messages=_user("Say hello to the gateway"))
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["content-type"] == "application/json"
    msg = raw.parse()
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-sonnet-4-6"
    assert [b.type for b in msg.content] == ["text"]
    assert "Say hello to the gateway" in msg.content[0].text
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    u = msg.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 200
    assert u.cache_creation_input_tokens == 0 and u.cache_read_input_tokens == 0
    assert u.service_tier == "standard"
    # Deterministic: the same request yields the same text.
    again = client.messages.create(model="claude-sonnet-4-6", max_tokens=200,
                                   messages=_user("Say hello to the gateway"))
    assert again.content[0].text == msg.content[0].text and again.id != msg.id


def test_max_tokens_truncates(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=3, messages=_user("hi there"))
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="m", max_tokens=100, messages=_user("alpha beta gamma"),
                                 stop_sequences=["gamma"])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "gamma"
    assert msg.content[0].text.endswith("beta ") and "gamma" not in msg.content[0].text


def test_streaming_with_sdk(client: anthropic.Anthropic) -> None:
    seen: list[str] = []
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=500,
                                messages=_user("stream me something")) as stream:
        for event in stream:
            seen.append(event.type)
        final = stream.get_final_message()
    raw_types = [t for t in seen if t in ("message_start", "content_block_start", "content_block_delta",
                                          "content_block_stop", "message_delta", "message_stop")]
    assert raw_types[:2] == ["message_start", "content_block_start"]
    assert raw_types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw_types.count("content_block_delta") >= 3
    assert final.stop_reason == "end_turn"
    assert "stream me something" in final.content[0].text
    assert final.usage.output_tokens > 1 and final.usage.input_tokens > 0


def test_streaming_wire_sequence(base_url: str) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 300, "stream": True, "messages": _user("wire format")}
    r = httpx.post(f"{base_url}/v1/messages", headers=HEADERS, content=orjson.dumps(body))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["request-id"].startswith("req_")
    events = _parse_sse(r.content)
    types = [t for t, _ in events]
    n = types.count("content_block_delta")
    assert types == ["message_start", "content_block_start", "ping", *["content_block_delta"] * n,
                     "content_block_stop", "message_delta", "message_stop"]
    start_msg = events[0][1]["message"]
    assert start_msg["content"] == [] and start_msg["stop_reason"] is None
    assert start_msg["usage"]["output_tokens"] == 1
    cache_fields = {"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}
    assert cache_fields <= start_msg["usage"].keys()
    text = "".join(d["delta"]["text"] for t, d in events if t == "content_block_delta")
    assert "wire format" in text
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 1


def test_thinking_block_streamed_first(client: anthropic.Anthropic) -> None:
    deltas: list[str] = []
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=4000,
                                thinking={"type": "enabled", "budget_tokens": 2000},
                                messages=_user("think first")) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.type)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking and final.content[0].signature
    assert deltas.index("signature_delta") < deltas.index("text_delta")
    assert deltas[0] == "thinking_delta"


def test_thinking_budget_must_be_below_max_tokens(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="m", max_tokens=1500, messages=_user("x"),
                               thinking={"type": "enabled", "budget_tokens": 2000})


def test_forced_tool_use(client: anthropic.Anthropic) -> None:
    tools: list[Any] = [{
        "name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                          "days": {"type": "integer"}},
                         "required": ["city", "days"]},
    }]
    msg = client.messages.create(model="m", max_tokens=300, messages=_user("weather?"), tools=tools,
                                 tool_choice={"type": "tool", "name": "get_weather"})
    assert msg.stop_reason == "tool_use"
    assert msg.content[0].type == "tool_use" and msg.content[0].name == "get_weather"
    assert msg.content[0].id.startswith("toolu_")
    assert set(msg.content[0].input) == {"city", "days"}
    with client.messages.stream(model="m", max_tokens=300, messages=_user("weather?"), tools=tools,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == msg.content[0].input
    # Tools offered but not forced: a plain text answer.
    auto = client.messages.create(model="m", max_tokens=300, messages=_user("weather?"), tools=tools)
    assert auto.stop_reason == "end_turn" and auto.content[0].type == "text"


def test_prompt_cache_usage_and_count_tokens(client: anthropic.Anthropic) -> None:
    system: Any = [{"type": "text", "text": f"policy {uuid.uuid4()} " + "rules " * 3000,
                    "cache_control": {"type": "ephemeral"}}]
    kwargs: dict[str, Any] = {"model": "claude-sonnet-4-6", "system": system,
                              "messages": _user("first question")}
    total = client.messages.count_tokens(**kwargs).input_tokens
    first = client.messages.create(max_tokens=50, **kwargs).usage
    second = client.messages.create(max_tokens=50, **kwargs).usage
    assert first.cache_creation_input_tokens > 4000 and first.cache_read_input_tokens == 0
    assert first.cache_creation and first.cache_creation.ephemeral_5m_input_tokens == (
        first.cache_creation_input_tokens)
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    for u in (first, second):
        assert u.input_tokens + u.cache_creation_input_tokens + (u.cache_read_input_tokens or 0) == total
    # The next turn moves the breakpoint to the newest message: the system prefix is read
    # from cache, the new tail is written.
    turn2: Any = [{"role": "user", "content": "first question"},
                  {"role": "assistant", "content": "an answer"},
                  {"role": "user", "content": [{"type": "text", "text": "follow up " * 50,
                                                "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    system_plain = [{"type": "text", "text": system[0]["text"]}]
    third = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, system=system_plain,
                                   messages=turn2).usage
    assert third.cache_read_input_tokens == first.cache_creation_input_tokens
    assert third.cache_creation_input_tokens and third.cache_creation_input_tokens > 0
    assert third.cache_creation and third.cache_creation.ephemeral_1h_input_tokens == (
        third.cache_creation_input_tokens)


def test_count_tokens_matches_message_usage(client: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": [
        {"type": "text", "text": "describe this " * 40},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD" * 5000}},
    ]}]
    counted = client.messages.count_tokens(model="m", messages=messages, system="be brief").input_tokens
    used = client.messages.create(model="m", max_tokens=10, messages=messages, system="be brief").usage
    assert counted == used.input_tokens > 100
    bigger = client.messages.count_tokens(model="m", messages=messages, system="be brief " * 100)
    assert bigger.input_tokens > counted


# ---------------------------------------------------------------------------- models


def test_models(client: anthropic.Anthropic, base_url: str) -> None:
    page = client.models.list(limit=3)
    assert len(page.data) == 3 and all(m.type == "model" for m in page.data)
    assert page.has_more and page.first_id == page.data[0].id and page.last_id == page.data[-1].id
    all_ids = [m.id for m in client.models.list()]  # auto-paginates through after_id
    assert len(all_ids) == len(set(all_ids)) >= 5
    m = client.models.retrieve(all_ids[0])
    assert m.id == all_ids[0] and m.display_name and m.created_at
    alias = client.models.retrieve("claude-sonnet-4-5")
    assert alias.id.startswith("claude-sonnet-4-5-")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.get(f"{base_url}/v1/models", headers=HEADERS)
    assert set(r.json()) == {"data", "has_more", "first_id", "last_id"}
    assert {"type", "id", "display_name", "created_at"} <= set(r.json()["data"][0])


# ---------------------------------------------------------------------------- auth and validation


def test_auth_and_version(base_url: str) -> None:
    bad = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as ei:
        bad.messages.create(model="m", max_tokens=5, messages=_user("x"))
    assert ei.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                        "message": "invalid x-api-key"}}
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": _user("x")})
    r = httpx.post(f"{base_url}/v1/messages", content=body,
                   headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{base_url}/v1/messages", content=body, headers={"x-api-key": KEY})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in r.json()["error"]["message"]
    assert r.headers["request-id"].startswith("req_")
    r = httpx.get(f"{base_url}/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 401
    # Both credential styles the SDKs use are accepted: x-api-key and Authorization: Bearer.
    for creds in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
        r = httpx.get(f"{base_url}/v1/models", headers={"anthropic-version": "2023-06-01", **creds})
        assert r.status_code == 200
    r = httpx.get(f"{base_url}/v1/models", headers={"anthropic-version": "2023-06-01",
                                                    "authorization": "Bearer nope"})
    assert r.status_code == 401


@pytest.mark.parametrize(("body", "field"), [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0.type"),
    ({"model": "m", "max_tokens": 5, "temperature": 3, "messages": [{"role": "user", "content": "x"}]},
     "temperature"),
])
def test_validation_errors(base_url: str, body: dict[str, Any], field: str) -> None:
    r = httpx.post(f"{base_url}/v1/messages", headers=HEADERS, content=orjson.dumps(body))
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith(field + ":")


def test_invalid_json_and_unknown_path(base_url: str) -> None:
    r = httpx.post(f"{base_url}/v1/messages", headers=HEADERS, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{base_url}/v1/nothing-here", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "exc"), [
    ("429", anthropic.RateLimitError),
    ("529", anthropic.OverloadedError),
    ("500", anthropic.InternalServerError),
    ("reset", anthropic.APIConnectionError),
])
def test_fault_header(base_url: str, fault: str, exc: type[Exception]) -> None:
    c = anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0,
                            default_headers={"x-emulator-fault": fault})
    with pytest.raises(exc) as ei:
        c.messages.create(model="m", max_tokens=5, messages=_user("x"))
    if isinstance(ei.value, anthropic.APIStatusError):
        assert ei.value.body["type"] == "error"  # type: ignore[index]
        expected = {"429": "rate_limit_error", "529": "overloaded_error", "500": "api_error"}[fault]
        assert ei.value.body["error"]["type"] == expected  # type: ignore[index]
        if fault == "429":
            assert ei.value.response.headers["retry-after"] == "1"
    assert _records(base_url)[-1]["status"] == (int(fault) if fault != "reset" else "reset")


def test_midstream_faults(base_url: str) -> None:
    c = anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0,
                            default_headers={"x-emulator-fault": "midstream-error"})
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"), c.messages.stream(
            model="m", max_tokens=50, messages=_user("x")) as stream:
        for _ in stream:
            pass
    body = orjson.dumps({"model": "m", "max_tokens": 50, "stream": True, "messages": _user("x")})
    got = b""
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", f"{base_url}/v1/messages", content=body,
            headers={**HEADERS, "x-emulator-fault": "midstream-reset"}) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            got += chunk
    assert got.startswith(b"event: message_start\n") and b"message_stop" not in got


def test_latency_and_pacing_headers(client: anthropic.Anthropic) -> None:
    t0 = time.monotonic()
    client.messages.create(model="m", max_tokens=50, messages=_user("x"),
                           extra_headers={"x-emulator-latency-ms": "300"})
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    with client.messages.stream(model="m", max_tokens=50, messages=_user("x"),
                                extra_headers={"x-emulator-tokens-per-second": "100",
                                               "x-emulator-output-tokens": "30"}) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 30
    assert time.monotonic() - t0 >= 0.25  # 30 tokens at 100/s


def test_cli_defaults_faults_and_sigint(tmp_path: Path) -> None:
    assert parse_fault_rates("429=0.5, reset=0.1") == {"429": 0.5, "reset": 0.1}
    with pytest.raises(ValueError):
        parse_fault_rates("418=1")
    proc, url = _launch(tmp_path, "--api-key", "cli-key", "--fault-rate", "529=1", "--latency-ms", "100")
    try:
        c = anthropic.Anthropic(base_url=url, api_key="cli-key", max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(anthropic.OverloadedError):
            c.messages.create(model="m", max_tokens=5, messages=_user("x"))
        assert time.monotonic() - t0 >= 0.1
        assert httpx.get(f"{url}/_emulator/health").status_code == 200
    finally:
        assert _stop(proc, signal.SIGINT) == 0


def test_cli_requires_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CCR_EMULATOR_API_KEY"}
    res = subprocess.run([sys.executable, "-m", "emulators.anthropic", "--port", "0"], cwd=REPO, env=env,
                         capture_output=True, timeout=30)
    assert res.returncode == 2 and b"CCR_EMULATOR_API_KEY" in res.stderr


# ---------------------------------------------------------------------------- inspection and bodies


def test_recorded_request_matches_sent_bytes(base_url: str) -> None:
    assert httpx.delete(f"{base_url}/_emulator/requests").status_code == 200
    assert _records(base_url) == []
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": _user("record me ✓")})
    r = httpx.post(f"{base_url}/v1/messages?beta=true", content=body,
                   headers={**HEADERS, "anthropic-beta": "prompt-caching-2024-07-31", "x-trace": "t1"})
    assert r.status_code == 200
    recs = _records(base_url)
    assert len(recs) == 1
    rec = recs[0]
    assert rec["method"] == "POST" and rec["path"] == "/v1/messages" and rec["query_string"] == "beta=true"
    assert rec["body_length"] == len(body)
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert rec["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert rec["headers"]["x-trace"] == "t1" and rec["headers"]["x-api-key"] == KEY
    assert rec["status"] == 200 and rec["request_id"] == r.headers["request-id"]


def test_a_mark_reads_exactly_what_came_after_it_past_the_ring(tmp_path: Path) -> None:
    """The emulator keeps its last 200 records (the default --record-limit). Once that ring is full,
    counting records before an action and slicing after sees nothing; a mark still sees exactly
    the new records, and a mark whose records fell out of the ring (or were cleared) fails loudly."""
    proc, url = _launch(tmp_path, env_key=KEY)
    try:
        with httpx.Client(base_url=url, headers=HEADERS) as h:
            def send(n: int, tag: str) -> None:
                for i in range(n):
                    assert h.get("/v1/models", headers={"x-n": f"{tag}{i}"}).status_code == 200

            first = emulator_mark(url)
            assert first.seq == 0 and first.arrived() == []
            send(200, "fill")
            assert len(h.get("/_emulator/requests").json()) == 200  # the ring is full
            mark = emulator_mark(url)
            assert mark.seq == 200  # reading the records or a mark is not itself recorded
            before = len(h.get("/_emulator/requests").json())
            send(3, "new")
            assert h.get("/_emulator/requests").json()[before:] == []  # counting and slicing is blind here
            got = mark.arrived()
            assert [(r["seq"], r["headers"]["x-n"]) for r in got] == [(201, "new0"), (202, "new1"), (203, "new2")]
            assert mark.arrived() == got  # a mark can be read again
            assert emulator_mark(url).arrived() == []  # nothing since a fresh mark

            # Records 1..3 fell out of the ring: a mark before them cannot be answered in full.
            with pytest.raises(RecordsLost, match="410"):
                first.arrived()
            with pytest.raises(RecordsLost, match="410"):
                RecordMark(url, mark.instance, 2).arrived()
            assert [r["seq"] for r in RecordMark(url, mark.instance, 3).arrived()] == list(range(4, 204))

            # DELETE empties the ring but never resets the sequence: reads across it fail, later marks work.
            assert h.delete("/_emulator/requests").status_code == 200
            with pytest.raises(RecordsLost, match="410"):
                mark.arrived()
            after_clear = emulator_mark(url)
            assert after_clear.seq == 203 and after_clear.arrived() == []
            send(1, "late")
            assert [(r["seq"], r["headers"]["x-n"]) for r in after_clear.arrived()] == [(204, "late0")]

            # A mark of another emulator process (a restart) or from the future is refused, not empty.
            with pytest.raises(RecordsLost, match="409"):
                RecordMark(url, "0123456789abcdef", 204).arrived()
            with pytest.raises(RecordsLost, match="409"):
                RecordMark(url, mark.instance, 205).arrived()
            r = h.get("/_emulator/requests", params={"after": "-1"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    finally:
        assert _stop(proc) == 0


def test_agent_fixture_streams(base_url: str, agent_request_bytes: bytes) -> None:
    request = json.loads(agent_request_bytes)
    usages = []
    for _ in range(2):
        r = httpx.post(f"{base_url}/v1/messages", headers=HEADERS, content=agent_request_bytes, timeout=60)
        assert r.status_code == 200, r.text
        events = _parse_sse(r.content)
        types = [t for t, _ in events]
        assert types[0] == "message_start" and types[-1] == "message_stop"
        starts = [d["content_block"]["type"] for t, d in events if t == "content_block_start"]
        assert starts == ["thinking", "text"]  # the fixture enables thinking
        assert events[0][1]["message"]["model"] == request["model"]
        usages.append(events[0][1]["message"]["usage"])
        assert events[-2][1]["usage"]["output_tokens"] > 1
    # The system prompt carries cache_control: written once, then read.
    assert usages[0]["cache_creation_input_tokens"] > 1000 and usages[0]["cache_read_input_tokens"] == 0
    assert usages[1]["cache_read_input_tokens"] == usages[0]["cache_creation_input_tokens"]
    assert _records(base_url)[-1]["body_sha256"] == hashlib.sha256(agent_request_bytes).hexdigest()


def test_20mb_request(client: anthropic.Anthropic, base_url: str) -> None:
    big = "abcd efgh " * (2 * 1024 * 1024)  # 20 MiB of text
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=20,
                                 messages=[{"role": "user", "content": [{"type": "text", "text": big}]}])
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens >= len(big) // 4
    rec = _records(base_url)[-1]
    assert rec["body_length"] > 20 * 1024 * 1024 and rec["status"] == 200


def test_in_process_start() -> None:
    async def run() -> None:
        runner, port = await start("127.0.0.1", 0, api_key="inproc", max_body_bytes=4096)
        hdrs = {"x-api-key": "inproc", "anthropic-version": "2023-06-01"}
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.post("/v1/messages/count_tokens", content=b'{"model":"m","messages":'
                                 b'[{"role":"user","content":"12345678"}]}', headers=hdrs)
                assert r.status_code == 200 and r.json()["input_tokens"] > 0
                # Over the configured body limit: the real API's 413 shape.
                big = orjson.dumps({"model": "m", "max_tokens": 5, "messages": _user("x" * 10_000)})
                r = await c.post("/v1/messages", content=big, headers=hdrs)
                assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
                r = await c.post("/v1/messages", content=b"{}",
                                 headers={**hdrs, "x-emulator-fault": "teapot"})
                assert r.status_code == 400 and "x-emulator-fault" in r.json()["error"]["message"]
        finally:
            await runner.cleanup()

    asyncio.run(run())


@pytest.mark.parametrize(("accept", "coding"), [
    ("br, zstd, gzip", "br"), ("gzip", "gzip"), ("gzip;q=1, br;q=0.5", "gzip"), ("identity", None),
    ("zstd", None), ("*", "br"), ("br;q=0, gzip;q=0", None),
])
def test_replies_are_encoded_as_the_client_accepts(base_url: str, accept: str, coding: str | None) -> None:
    body = orjson.dumps({"model": "m", "max_tokens": 20, "messages": _user("x")})
    raw = httpx.post(f"{base_url}/v1/messages", content=body,
                     headers={**HEADERS, "accept-encoding": accept}).raise_for_status()
    assert raw.headers.get("content-encoding") == coding
    assert raw.json()["type"] == "message"  # decoded by httpx: the encoding is real
    if coding:
        assert raw.headers["vary"] == "accept-encoding"
    # Errors too, as a real API does.
    err = httpx.post(f"{base_url}/v1/messages", content=b"{", headers={**HEADERS, "accept-encoding": accept})
    assert err.status_code == 400 and err.headers.get("content-encoding") == coding
    assert err.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_streams_are_encoded_and_decodable_event_by_event(base_url: str, coding: str) -> None:
    import zlib

    import brotli

    body = orjson.dumps({"model": "m", "max_tokens": 60, "stream": True, "messages": _user("x")})
    with httpx.stream("POST", f"{base_url}/v1/messages", content=body,
                      headers={**HEADERS, "accept-encoding": coding,
                               "x-emulator-tokens-per-second": "2000"}) as r:
        assert r.headers["content-encoding"] == coding
        pieces = list(r.iter_raw())
    # Every piece is flushed by itself: decoding what arrived so far always yields whole events.
    dec = brotli.Decompressor() if coding == "br" else zlib.decompressobj(wbits=31)
    out = b""
    for p in pieces:
        out += dec.process(p) if coding == "br" else dec.decompress(p)
        assert out.endswith(b"\n\n"), "a flushed piece must not leave an event half-encoded"
    events = _parse_sse(out)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"


@pytest.mark.parametrize("model,limit,full", [("claude-sonnet-4-5", 64_000, "claude-sonnet-4-5-20250929"),
                                              ("claude-opus-4-6", 128_000, "claude-opus-4-6")])
def test_max_tokens_above_the_models_output_limit(client: anthropic.Anthropic, model: str, limit: int,
                                                  full: str) -> None:
    """As the real API: one token over the model's output limit is a 400 naming the limit; at it is fine."""
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=model, max_tokens=limit + 1, messages=_user("hi"))
    assert e.value.body["error"]["message"] == (  # type: ignore[index]
        f"max_tokens: {limit + 1} > {limit}, which is the maximum allowed number of output tokens for {full}")
    assert client.messages.create(model=model, max_tokens=limit, messages=_user("hi")).type == "message"
