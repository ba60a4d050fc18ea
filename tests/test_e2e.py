"""The whole gateway, end to end: real Envoy fed by the router's ADS, extauth, ratelimit,
the adapter, the access-log receiver, embedded PostgreSQL and Redis, the emulator as the
upstream, and the official anthropic SDK as the client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from ccr.supervisor import Gateway
from extauth.keys import create_key, revoke_key
from tests.harness import emulator_records, log_row

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]


def client(gw: Gateway, key: str | None = None, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key or gw.api_key, max_retries=0, **kw)


def last_upstream(gw: Gateway) -> dict[str, Any]:
    recs = emulator_records(gw)
    assert recs, "the emulator saw no request"
    return recs[-1]


def envoy_request_id(gw: Gateway) -> str:
    """Envoy's x-request-id for the last upstream request (it is what the access log keys on)."""
    return str(last_upstream(gw)["headers"]["x-request-id"])


def test_normal_reply_and_access_log(gw: Gateway, dsn: str) -> None:
    msg = client(gw).messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert msg.type == "message" and msg.content[0].type == "text" and msg.content[0].text
    row = log_row(dsn, envoy_request_id(gw))
    assert row["status"] == 200 and row["model"] == MODEL and row["principal"] == "ccr-up-local"
    assert row["input_tokens"] == msg.usage.input_tokens > 0
    assert row["output_tokens"] == msg.usage.output_tokens > 0
    assert (row["usage_status"], row["usage_note"]) == ("complete", None)
    assert row["upstream_cluster"] == "provider_anthropic"
    assert row["method"] == "POST" and row["path"] == "/v1/messages"
    assert row["latency_ms"] is not None and row["latency_ms"] > 0


def test_streamed_reply_and_access_log(gw: Gateway, dsn: str) -> None:
    with client(gw).messages.stream(model=MODEL, max_tokens=200, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason in ("end_turn", "max_tokens")
    row = log_row(dsn, envoy_request_id(gw))
    assert row["status"] == 200
    assert row["input_tokens"] == final.usage.input_tokens > 0
    assert row["output_tokens"] == final.usage.output_tokens > 0


def test_cache_tokens_reach_the_access_log(gw: Gateway, dsn: str) -> None:
    system = [{"type": "text", "text": "You are a careful assistant. " * 400, "cache_control": {"type": "ephemeral"}}]
    c = client(gw)
    first = c.messages.create(model=MODEL, max_tokens=32, system=system, messages=HELLO)  # type: ignore[arg-type]
    row1 = log_row(dsn, envoy_request_id(gw))
    second = c.messages.create(model=MODEL, max_tokens=32, system=system, messages=HELLO)  # type: ignore[arg-type]
    row2 = log_row(dsn, envoy_request_id(gw))
    assert row1["cache_creation_input_tokens"] == first.usage.cache_creation_input_tokens
    assert row2["cache_read_input_tokens"] == second.usage.cache_read_input_tokens
    assert (row1["cache_creation_input_tokens"] or 0) + (row2["cache_read_input_tokens"] or 0) > 0


def test_bearer_token_like_claude_code(gw: Gateway) -> None:
    c = anthropic.Anthropic(base_url=gw.url, auth_token=gw.api_key, api_key=None, max_retries=0)
    msg = c.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert msg.content[0].text
    up = last_upstream(gw)["headers"]
    # The ccr key never reaches the provider; the provider's credential does.
    assert "authorization" not in up
    assert up["x-api-key"].startswith("sk-ant-emulator-")


def test_count_tokens_and_models(gw: Gateway) -> None:
    c = client(gw)
    n = c.messages.count_tokens(model=MODEL, messages=HELLO)
    assert n.input_tokens > 0
    models = c.models.list()
    assert any(m.id.startswith("claude-") for m in models.data)


def test_agent_fixture_passes_byte_for_byte_with_beta(gw: Gateway, agent_request_bytes: bytes) -> None:
    headers = {
        "x-api-key": gw.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json",
        "anthropic-beta": "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
        "anthropic-custom-future-header": "kept as is",
    }
    with httpx.stream("POST", f"{gw.url}/v1/messages?beta=true", content=agent_request_bytes,
                      headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "message_delta" in events
    up = last_upstream(gw)
    assert up["query_string"] == "beta=true"
    assert up["body_sha256"] == hashlib.sha256(agent_request_bytes).hexdigest()
    assert up["body_length"] == len(agent_request_bytes)
    assert up["headers"]["anthropic-beta"] == headers["anthropic-beta"]
    assert up["headers"]["anthropic-custom-future-header"] == "kept as is"
    # The provider sees its own host name and none of Envoy's internal headers.
    assert up["headers"]["host"] == str(gw.emulator_url).removeprefix("http://")
    assert not [h for h in up["headers"] if h.startswith("x-envoy-")]


def test_agent_fixture_through_the_sdk(gw: Gateway, agent_request_bytes: bytes) -> None:
    req = json.loads(agent_request_bytes)
    req.pop("stream", None)
    c = client(gw)
    # Claude Code sends ?beta=true on the beta endpoints; the Python SDK takes it as an extra query.
    with c.beta.messages.stream(**req, betas=["interleaved-thinking-2025-05-14"],
                                extra_query={"beta": "true"}) as stream:
        final = stream.get_final_message()
    u = final.usage
    # The fixture marks its system prompt for caching, so most input is cache creation or read.
    assert u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0) > 10_000
    up = last_upstream(gw)
    assert up["query_string"] == "beta=true"
    assert "interleaved-thinking-2025-05-14" in up["headers"]["anthropic-beta"]


def test_twenty_megabyte_request(gw: Gateway, dsn: str) -> None:
    big = "x" * (20 * 1024 * 1024)
    body = json.dumps({"model": MODEL, "max_tokens": 16,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": big}]}]}).encode()
    r = httpx.post(f"{gw.url}/v1/messages", content=body, timeout=120,
                   headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01",
                            "content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    up = last_upstream(gw)
    assert up["body_length"] == len(body) and up["body_sha256"] == hashlib.sha256(body).hexdigest()
    row = log_row(dsn, up["headers"]["x-request-id"])
    assert row["input_tokens"] == r.json()["usage"]["input_tokens"] > 1_000_000
    # And through the SDK, streamed.
    with client(gw, timeout=120).messages.stream(
            model=MODEL, max_tokens=16, messages=[{"role": "user", "content": big}]) as s:
        assert s.get_final_message().usage.input_tokens > 1_000_000


def test_twenty_megabyte_image_request_streamed(gw: Gateway, dsn: str) -> None:
    """A base64 image block: extauth reads the body in place (extauth/wire.py, extauth/lean_json.py);
    the provider still gets it byte for byte and the request its audit row."""
    data = base64.b64encode(hashlib.shake_256(b"image").digest(15 * 1024 * 1024)).decode()
    body = json.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is in this image?"}]}]}).encode()
    assert len(body) > 20 * 1024 * 1024
    r = httpx.post(f"{gw.url}/v1/messages", content=body, timeout=120,
                   headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01",
                            "content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    assert r.text.rstrip().endswith("data: {\"type\":\"message_stop\"}"), r.text[-300:]
    up = last_upstream(gw)
    assert up["body_length"] == len(body) and up["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert log_row(dsn, up["headers"]["x-request-id"])["model"] == MODEL


@pytest.mark.parametrize("fault,exc", [("529", anthropic.InternalServerError),
                                       ("429", anthropic.RateLimitError),
                                       ("500", anthropic.InternalServerError)])
def test_upstream_errors_come_back_unmodified(gw: Gateway, fault: str, exc: type[Exception]) -> None:
    direct = httpx.post(f"{gw.emulator_url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
                        headers={"x-api-key": str(last_upstream(gw)["headers"]["x-api-key"]),
                                 "anthropic-version": "2023-06-01", "x-emulator-fault": fault})
    via = httpx.post(f"{gw.url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
                     headers={"x-api-key": gw.api_key, "anthropic-version": "2023-06-01",
                              "x-emulator-fault": fault})
    assert via.status_code == direct.status_code == int(fault)
    assert via.json() == direct.json()
    with pytest.raises(exc):
        client(gw, default_headers={"x-emulator-fault": fault}).messages.create(
            model=MODEL, max_tokens=8, messages=HELLO)


def test_bad_and_missing_key_get_401(gw: Gateway, dsn: str) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gw, key="ccr_not-a-real-key").messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert e.value.status_code == 401
    assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "invalid API key" in e.value.body["error"]["message"]  # type: ignore[index]
    r = httpx.post(f"{gw.url}/v1/messages", json={"model": MODEL})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert "x-api-key" in r.json()["error"]["message"]
    # Refused requests are on the record too, with no principal and no usage (NULL, with the reason).
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["status"] == 401 and row["key_id"] is None
    assert row["input_tokens"] is None and row["output_tokens"] is None
    assert row["usage_status"] == "not_forwarded" and row["usage_note"] == "refused by the gateway's authorization"
    assert row["upstream_cluster"] is None


def test_policy_denied_model_gets_403(gw: Gateway, dsn: str) -> None:
    _, key = create_key(dsn, "haiku-user", ["haiku-only"])
    c = client(gw, key=key)
    assert c.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HELLO).content
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert e.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert MODEL in e.value.body["error"]["message"]  # type: ignore[index]


def test_unknown_model_and_bad_json(gw: Gateway) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client(gw).messages.create(model="gpt-4o", max_tokens=8, messages=HELLO)
    r = httpx.post(f"{gw.url}/v1/messages", content=b"{not json", headers={"x-api-key": gw.api_key})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_gets_429_with_retry_after(gw: Gateway, dsn: str) -> None:
    _, key = create_key(dsn, "slow-user", ["default"], rpm=2)
    c = client(gw, key=key)
    for _ in range(2):
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert e.value.status_code == 429
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "2 requests per minute" in e.value.body["error"]["message"]  # type: ignore[index]
    row = log_row(dsn, e.value.response.headers["x-request-id"])
    assert row["status"] == 429 and row["principal"] == "slow-user" and row["response_flags"] == "RL"
    assert (row["usage_status"], row["input_tokens"]) == ("not_forwarded", None)
    # Another key is not affected.
    assert client(gw).messages.create(model=MODEL, max_tokens=8, messages=HELLO).content


def test_client_ccr_headers_are_stripped(gw: Gateway, dsn: str) -> None:
    c = client(gw, default_headers={"x-ccr-principal": "admin", "x-ccr-cluster": "ccr_extauth",
                                    "x-ccr-anything": "spoof"})
    assert c.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
    up = last_upstream(gw)
    assert not [h for h in up["headers"] if h.startswith("x-ccr-")]
    assert log_row(dsn, up["headers"]["x-request-id"])["principal"] == "ccr-up-local"


def test_revoked_key_stops_working(gw: Gateway, dsn: str) -> None:
    rec, key = create_key(dsn, "short-lived")
    c = client(gw, key=key)
    assert c.messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
    assert revoke_key(dsn, rec.id)
    deadline = time.monotonic() + 3
    while True:
        try:
            c.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
        except anthropic.AuthenticationError:
            break
        assert time.monotonic() < deadline, "revoked key still accepted after 3s"
        time.sleep(0.1)


def test_not_found_outside_the_api(gw: Gateway) -> None:
    r = httpx.get(f"{gw.url}/admin", headers={"x-api-key": gw.api_key})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
