"""Usage is never silently zero, and request ids are the gateway's: the whole gateway end to end
(real Envoy, the adapter, the access log into PostgreSQL, the emulator as a provider that
compresses when asked), driven by the anthropic SDK and httpx.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from ccr.supervisor import Gateway
from tests.harness import log_row, log_rows

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello"}]
# What a modern client offers; the meter reads neither br nor zstd.
GREEDY = "br, zstd, gzip"


def headers(gw: Gateway, **extra: str) -> dict[str, str]:
    return {"x-api-key": gw.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json",
            **extra}


def last_upstream(gw: Gateway) -> dict[str, Any]:
    recs = httpx.get(f"{gw.emulator_url}/_emulator/requests").json()
    assert recs, "the emulator saw no request"
    return recs[-1]  # type: ignore[no-any-return]


def sdk(gw: Gateway, **headers_: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0, default_headers=headers_)


# ---------------------------------------------------------------------------- identity upstream


def test_the_emulator_compresses_like_a_real_provider(gw: Gateway) -> None:
    """Without identity upstream the meter would face br: the tests below would then fail."""
    up_key = str(last_upstream_key(gw))
    r = httpx.post(f"{gw.emulator_url}/v1/messages", timeout=30,
                   json={"model": MODEL, "max_tokens": 16, "messages": HELLO},
                   headers={"x-api-key": up_key, "anthropic-version": "2023-06-01", "accept-encoding": GREEDY})
    assert r.status_code == 200 and r.headers["content-encoding"] == "br"
    assert r.json()["type"] == "message"


def last_upstream_key(gw: Gateway) -> str:
    sdk(gw).messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    return str(last_upstream(gw)["headers"]["x-api-key"])


def test_greedy_accept_encoding_json_httpx(gw: Gateway, dsn: str) -> None:
    r = httpx.post(f"{gw.url}/v1/messages", timeout=30, headers=headers(gw, **{"accept-encoding": GREEDY}),
                   json={"model": MODEL, "max_tokens": 64, "messages": HELLO})
    assert r.status_code == 200, r.text
    # The gateway compressed for the client (gzip), after reading usage from an identity reply.
    assert r.headers["content-encoding"] == "gzip" and "accept-encoding" in r.headers.get("vary", "").lower()
    msg = r.json()  # httpx decoded it: the body is intact
    assert msg["type"] == "message" and msg["content"][0]["text"]
    assert last_upstream(gw)["headers"]["accept-encoding"] == "identity"
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["usage_status"] == "complete" and row["usage_note"] is None
    assert row["input_tokens"] == msg["usage"]["input_tokens"] > 0
    assert row["output_tokens"] == msg["usage"]["output_tokens"] > 0


def test_greedy_accept_encoding_sse_httpx(gw: Gateway, dsn: str) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, timeout=30,
                      headers=headers(gw, **{"accept-encoding": GREEDY})) as r:
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"  # compressed by the gateway, decoded by httpx
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert data[0]["type"] == "message_start" and data[-1]["type"] == "message_stop"
    final = next(d for d in data if d["type"] == "message_delta")["usage"]
    assert last_upstream(gw)["headers"]["accept-encoding"] == "identity"
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["usage_status"] == "complete"
    assert row["input_tokens"] == final["input_tokens"] > 0 and row["output_tokens"] == final["output_tokens"] > 0


def test_a_compressed_stream_is_not_held_back(gw: Gateway, dsn: str) -> None:
    """The provider stops mid-block until released: the deltas so far must already reach the client."""
    hold = f"ttfb-{time.monotonic_ns()}"
    body = {"model": MODEL, "max_tokens": 500, "messages": HELLO, "stream": True}
    h = headers(gw, **{"accept-encoding": GREEDY, "x-emulator-fault": "midstream-error",
                       "x-emulator-output-tokens": "200", "x-emulator-hold": hold})
    kinds = []
    # A compressor that buffered would leave this read waiting until the hold times out (30 s).
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, headers=h,
                      timeout=httpx.Timeout(30, read=10)) as r:
        assert r.headers["content-encoding"] == "gzip"
        for line in r.iter_lines():
            if line.startswith("data: "):
                kinds.append(json.loads(line[6:])["type"])
                if kinds.count("content_block_delta") == 1:
                    httpx.post(f"{gw.emulator_url}/_emulator/release/{hold}")
    assert kinds[0] == "message_start" and kinds[-1] == "error"
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["usage_status"] == "estimated" and row["output_tokens"] > 0


def test_greedy_accept_encoding_through_the_sdk(gw: Gateway, dsn: str) -> None:
    c = sdk(gw, **{"Accept-Encoding": GREEDY})
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=HELLO)
    msg = raw.parse()
    assert raw.headers["content-encoding"] == "gzip" and msg.content[0].text  # type: ignore[union-attr]
    row = log_row(dsn, raw.headers["x-request-id"])
    assert (row["usage_status"], row["input_tokens"], row["output_tokens"]) == (
        "complete", msg.usage.input_tokens, msg.usage.output_tokens)

    with c.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text and final.usage.output_tokens > 0
    row = log_row(dsn, rid)
    assert (row["usage_status"], row["input_tokens"], row["output_tokens"]) == (
        "complete", final.usage.input_tokens, final.usage.output_tokens)


# ---------------------------------------------------------------------------- aborted streams


def test_client_abort_mid_stream_records_the_output_so_far(gw: Gateway, dsn: str) -> None:
    # A slow stream (paced by the emulator); the client leaves after a few deltas.
    body = {"model": MODEL, "max_tokens": 4000, "messages": HELLO, "stream": True}
    h = headers(gw, **{"x-emulator-tokens-per-second": "60", "x-emulator-output-tokens": "3000"})
    deltas = 0
    start_usage: dict[str, int] = {}
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                d = json.loads(line[6:])
                if d["type"] == "message_start":
                    start_usage = d["message"]["usage"]
                deltas += d["type"] == "content_block_delta"
                if deltas == 4:
                    break  # closing the response resets the stream mid-way
    row = log_row(dsn, rid)
    assert row["usage_status"] == "estimated", row
    assert row["output_tokens"] >= 4  # at least one token per delta seen
    assert row["output_tokens"] < 3000  # not the full reply that was never produced
    assert row["input_tokens"] == start_usage["input_tokens"] > 0
    assert "estimated from" in row["usage_note"]


def test_upstream_reset_mid_stream_records_the_output_so_far(gw: Gateway, dsn: str) -> None:
    hold = f"reset-{time.monotonic_ns()}"
    body = {"model": MODEL, "max_tokens": 500, "messages": HELLO, "stream": True}
    h = headers(gw, **{"x-emulator-fault": "midstream-reset", "x-emulator-output-tokens": "200",
                       "x-emulator-hold": hold})
    deltas = 0
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(  # noqa: PT012
            "POST", f"{gw.url}/v1/messages", json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "content_block_delta":
                deltas += 1
                if deltas == 1:  # output reached the client: now the provider resets the connection
                    httpx.post(f"{gw.emulator_url}/_emulator/release/{hold}")
    assert deltas >= 1
    row = log_row(dsn, rid)
    assert row["usage_status"] == "estimated" and row["output_tokens"] >= deltas, row
    assert row["input_tokens"] > 0 and "cut off" in row["usage_note"]


def test_provider_error_event_mid_stream_is_estimated_with_the_reason(gw: Gateway, dsn: str) -> None:
    c = sdk(gw, **{"x-emulator-fault": "midstream-error", "x-emulator-output-tokens": "200"})
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"), c.messages.stream(  # noqa: PT012
            model=MODEL, max_tokens=500, messages=HELLO) as stream:
        rid = stream.response.headers["x-request-id"]
        for _ in stream:
            pass
    row = log_row(dsn, rid)
    assert row["usage_status"] == "estimated" and row["output_tokens"] > 0
    assert "overloaded_error" in row["usage_note"]


# ---------------------------------------------------------------------------- request ids


def test_request_id_is_the_gateways_and_the_clients_is_kept_aside(gw: Gateway, dsn: str) -> None:
    mine = f"client-chosen-{time.monotonic_ns()}"
    c = sdk(gw, **{"x-request-id": mine})
    ids = []
    for _ in range(2):
        raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=HELLO)
        rid = raw.headers["x-request-id"]
        # The provider saw the gateway's id too.
        assert last_upstream(gw)["headers"]["x-request-id"] == rid
        ids.append(rid)
    assert mine not in ids and ids[0] != ids[1]
    rows = log_rows(dsn, "client_request_id", mine, n=2)
    # Reusing an id erases nothing: both requests have their own row and usage.
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert all(r["usage_status"] == "complete" and r["output_tokens"] > 0 for r in rows)


def test_a_refused_request_is_not_forwarded_and_keeps_the_client_id(gw: Gateway, dsn: str) -> None:
    mine = f"refused-{time.monotonic_ns()}"
    r = httpx.post(f"{gw.url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HELLO},
                   headers={"x-api-key": "ccr_wrong", "anthropic-version": "2023-06-01", "x-request-id": mine,
                            "x-client-request-id": "spoofed"})
    assert r.status_code == 401 and r.headers["x-request-id"] != mine
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["client_request_id"] == mine  # what the client sent as x-request-id, not the spoof
    assert row["usage_status"] == "not_forwarded" and row["input_tokens"] is None
    assert row["usage_note"] == "refused by the gateway's authorization"
    # With no x-request-id, a client-set x-client-request-id does not reach the log.
    r = httpx.get(f"{gw.url}/nowhere", headers={"x-client-request-id": "spoofed"})
    assert r.status_code in (401, 404)  # refused by authorization or by the route table, never forwarded
    row = log_row(dsn, r.headers["x-request-id"])
    assert row["client_request_id"] is None and row["usage_status"] == "not_forwarded"
