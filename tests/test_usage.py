"""Usage metering of Anthropic Messages replies (router/usage.py)."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccr.contract import UsageStatus
from router.usage import (
    BYTES_PER_TOKEN,
    Assessment,
    JsonUsageMeter,
    SseUsageMeter,
    assess,
    make_meter,
    meter_bytes,
)


def sse(*events: tuple[str, dict]) -> bytes:
    out = b""
    for name, data in events:
        out += f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    return out


def message_start(inp: int, cw: int, cr: int, out: int) -> tuple[str, dict]:
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01TEST",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": inp,
                    "cache_creation_input_tokens": cw,
                    "cache_read_input_tokens": cr,
                    "output_tokens": out,
                    "service_tier": "standard",
                },
            },
        },
    )


def text_deltas(*texts: str) -> list[tuple[str, dict]]:
    return [
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": t}})
        for t in texts
    ]


# A stream shaped like a real one: ping, a text block with multi-byte text, a
# final message_delta whose output count is cumulative.
STREAM = sse(
    message_start(2095, 1536, 20480, 1),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    *text_deltas("Hello", " wörld — ", "données ✓", "\n\nmore: {\"usage\": 5}"),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 87}}),
    ("message_stop", {"type": "message_stop"}),
)
EXPECTED = {"input_tokens": 2095, "output_tokens": 87, "cache_creation_input_tokens": 1536,
            "cache_read_input_tokens": 20480}


def run_sse(chunks: list[bytes]) -> tuple[dict[str, int], bool]:
    m = SseUsageMeter()
    for c in chunks:
        m.feed(c)
    r = m.finish()
    return r.usage.as_dict(), r.complete


def test_json_message_reply() -> None:
    body = json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 12, "output_tokens": 34, "cache_creation_input_tokens": 5,
                  "cache_read_input_tokens": 6, "server_tool_use": {"web_search_requests": 0}},
    }).encode()
    m = JsonUsageMeter()
    # Split mid-token: JSON is only parsed at the end.
    for i in range(0, len(body), 7):
        assert m.feed(body[i:i + 7]) is False
    r = m.finish()
    assert r.complete and r.billable
    assert r.usage.as_dict() == {"input_tokens": 12, "output_tokens": 34, "cache_creation_input_tokens": 5,
                                 "cache_read_input_tokens": 6}


def test_json_null_cache_fields_count_as_zero() -> None:
    body = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":4,' \
           b'"cache_creation_input_tokens":null,"cache_read_input_tokens":null}}'
    r = meter_bytes("application/json; charset=utf-8", body)
    assert r.billable
    assert r.usage.as_dict() == {"input_tokens": 3, "output_tokens": 4,
                                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def test_count_tokens_reply_is_not_billable() -> None:
    r = meter_bytes("application/json", b'{"input_tokens": 4242}')
    assert r.complete and not r.billable
    assert r.usage.as_dict() == dict.fromkeys(EXPECTED, 0)


def test_json_error_body_and_garbage() -> None:
    r = meter_bytes("application/json", b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}')
    assert r.error == "overloaded_error" and not r.billable
    r = meter_bytes("application/json", b'{"type":"message","usage":{"input_tokens":')
    assert not r.complete and not r.billable and r.usage.input_tokens == 0
    r = meter_bytes("application/json", b"[1,2,3]")
    assert r.complete and not r.billable


def test_sse_in_one_chunk() -> None:
    usage, complete = run_sse([STREAM])
    assert usage == EXPECTED and complete


def test_sse_split_at_every_byte_boundary() -> None:
    for i in range(len(STREAM) + 1):
        usage, complete = run_sse([STREAM[:i], STREAM[i:]])
        assert usage == EXPECTED and complete, f"split at byte {i}"


def test_sse_byte_by_byte() -> None:
    usage, complete = run_sse([STREAM[i:i + 1] for i in range(len(STREAM))])
    assert usage == EXPECTED and complete


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_sse_other_line_endings_at_every_split(eol: bytes) -> None:
    stream = STREAM.replace(b"\n", eol)
    for i in range(len(stream) + 1):
        usage, complete = run_sse([stream[:i], stream[i:]])
        assert usage == EXPECTED and complete, f"split at byte {i}"


def test_sse_feed_reports_changes() -> None:
    m = SseUsageMeter()
    start = sse(message_start(10, 0, 0, 1))
    assert m.feed(start[:-1]) is False  # event not complete until the blank line
    assert m.feed(start[-1:]) is True
    assert m.feed(sse(*text_deltas("a", "b"))) is True  # the output estimate moved
    assert m.feed(sse(("ping", {"type": "ping"}))) is False
    delta = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9}}
    assert m.feed(sse(("message_delta", delta))) is True
    assert m.result.usage.output_tokens == 9


def test_sse_message_delta_overrides_input_and_cache() -> None:
    stream = sse(
        message_start(0, 0, 0, 1),
        *text_deltas("x"),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"input_tokens": 50, "cache_creation_input_tokens": 7,
                                     "cache_read_input_tokens": None, "output_tokens": 21}}),
        ("message_stop", {"type": "message_stop"}),
    )
    usage, complete = run_sse([stream])
    assert usage == {"input_tokens": 50, "output_tokens": 21, "cache_creation_input_tokens": 7,
                     "cache_read_input_tokens": 0}
    assert complete


def test_sse_error_event_keeps_what_was_known() -> None:
    stream = sse(
        message_start(300, 0, 100, 1),
        *text_deltas("partial"),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    m = SseUsageMeter()
    m.feed(stream)
    r = m.finish()
    assert r.error == "overloaded_error" and not r.complete and r.billable
    assert r.usage.as_dict() == {"input_tokens": 300, "output_tokens": 1, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 100}


def test_sse_missing_usage() -> None:
    stream = sse(
        ("message_start", {"type": "message_start",
                           "message": {"id": "m", "type": "message", "content": []}}),
        *text_deltas("x"),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ("message_stop", {"type": "message_stop"}),
    )
    m = SseUsageMeter()
    m.feed(stream)
    r = m.finish()
    assert r.complete and not r.billable
    assert r.usage.as_dict() == dict.fromkeys(EXPECTED, 0)


def test_sse_malformed_data_and_comments_do_not_break_metering() -> None:
    stream = (
        b": keep-alive comment\n\n"
        b"event: message_start\ndata: {not json\n\n"
        b"data\n\n"  # a field line with no colon
        + sse(*text_deltas("x"))
        # No space after the colon is valid SSE.
        + b'event: message_delta\ndata:{"type":"message_delta","usage":{"output_tokens":4}}\n\n'
        + sse(("message_stop", {"type": "message_stop"}))
    )
    usage, complete = run_sse([stream])
    assert usage["output_tokens"] == 4 and complete


def test_sse_without_event_lines_and_unterminated_tail() -> None:
    # Some proxies drop `event:` lines; the type inside data still counts. The
    # last event has no blank line (connection closed) and is still read.
    stream = (
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":8,"output_tokens":1}}}\n\n'
        b'data: {"type":"message_delta","usage":{"output_tokens":3}}'
    )
    usage, complete = run_sse([stream])
    assert usage["input_tokens"] == 8 and usage["output_tokens"] == 3 and not complete


def test_gzip_encoded_reply_is_metered_from_any_chunking() -> None:
    z = gzip.compress(STREAM)
    for step in (1, 5, 64, len(z)):
        m = make_meter("text/event-stream", "gzip")
        assert m is not None
        for i in range(0, len(z), step):
            m.feed(z[i:i + step])
        r = m.finish()
        assert r.usage.as_dict() == EXPECTED and r.complete


def test_corrupt_gzip_fails_soft() -> None:
    m = make_meter("application/json", "gzip")
    assert m is not None
    m.feed(b"this is not gzip")
    r = m.finish()
    assert not r.complete and r.usage.as_dict() == dict.fromkeys(EXPECTED, 0)


def test_make_meter_selection() -> None:
    assert isinstance(make_meter("text/event-stream; charset=utf-8"), SseUsageMeter)
    assert isinstance(make_meter("Application/JSON"), JsonUsageMeter)
    assert make_meter("text/plain") is None
    assert make_meter("application/octet-stream") is None
    assert make_meter("application/json", "br") is None
    assert make_meter("application/json", "identity") is not None


def test_sse_crlf_split_never_detaches_event_name_from_its_data() -> None:
    # Data without a "type" field: only the `event:` line says what it is, so a
    # CRLF split across chunks must not be read as a blank line (event end).
    stream = (
        b'event: message_start\r\ndata: {"message":{"usage":{"input_tokens":11,"output_tokens":1}}}\r\n\r\n'
        b'event: message_delta\r\ndata: {"usage":{"output_tokens":6}}\r\n\r\n'
        b"event: message_stop\r\ndata: {}\r\n\r\n"
    )
    for i in range(len(stream) + 1):
        usage, complete = run_sse([stream[:i], stream[i:]])
        assert (usage["input_tokens"], usage["output_tokens"], complete) == (11, 6, True), f"split at {i}"


# ---------------------------------------------------------------------------- assess: status and reason


def _assess_sse(stream: bytes, ended: bool = True) -> Assessment:
    m = SseUsageMeter()
    m.feed(stream)
    return assess(m.finish() if ended else m.result, streaming=True, ended=ended)


def test_complete_stream_is_complete() -> None:
    a = _assess_sse(STREAM)
    assert a.status == UsageStatus.COMPLETE and a.usage == EXPECTED and a.note == ""


def test_cut_off_stream_estimates_output_from_the_deltas() -> None:
    # message_start, then text deltas, then nothing: a client abort or an upstream reset.
    texts = ("Hello", " wörld — ", "données ✓", " and so on")
    cut = sse(message_start(2095, 1536, 20480, 1), *text_deltas(*texts))
    a = _assess_sse(cut)
    assert a.status == UsageStatus.ESTIMATED
    assert a.usage is not None
    nbytes = sum(len(t.encode()) for t in texts)
    assert a.usage["output_tokens"] == max(-(-nbytes // BYTES_PER_TOKEN), len(texts)) > 1
    # Input and cache counts are the provider's own, from message_start.
    assert (a.usage["input_tokens"], a.usage["cache_creation_input_tokens"],
            a.usage["cache_read_input_tokens"]) == (2095, 1536, 20480)
    assert "estimated" in a.note and f"{nbytes} UTF-8 bytes" in a.note


def test_estimate_counts_thinking_and_tool_input_but_not_signatures() -> None:
    def delta(i: int, d: dict) -> tuple[str, dict]:
        return ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})

    stream = sse(
        message_start(10, 0, 0, 1),
        delta(0, {"type": "thinking_delta", "thinking": "a" * 40}),
        delta(0, {"type": "signature_delta", "signature": "s" * 400}),
        delta(1, {"type": "input_json_delta", "partial_json": ""}),  # empty: no token
        delta(1, {"type": "input_json_delta", "partial_json": '{"path": "/tmp/x"}'}),
    )
    a = _assess_sse(stream)
    assert a.status == UsageStatus.ESTIMATED and a.usage is not None
    assert a.usage["output_tokens"] == -(-(40 + len('{"path": "/tmp/x"}')) // BYTES_PER_TOKEN)


def test_estimate_is_at_least_one_token_per_delta() -> None:
    a = _assess_sse(sse(message_start(10, 0, 0, 1), *text_deltas(*"abcdefgh")))
    assert a.usage is not None and a.usage["output_tokens"] == 8


def test_error_event_after_output_is_estimated_with_the_reason() -> None:
    stream = sse(message_start(300, 0, 0, 1), *text_deltas("partial output here"),
                 ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    a = _assess_sse(stream)
    assert a.status == UsageStatus.ESTIMATED and "overloaded_error" in a.note
    assert a.usage is not None and a.usage["output_tokens"] == 5 and a.usage["input_tokens"] == 300


def test_provider_count_without_message_stop_is_partial() -> None:
    stream = sse(message_start(40, 0, 0, 1), *text_deltas("x" * 400),
                 ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 77}}))
    a = _assess_sse(stream)
    # The provider's own cumulative count beats the estimate (400 bytes would say 100).
    assert a.status == UsageStatus.PARTIAL and a.usage is not None and a.usage["output_tokens"] == 77


def test_mid_stream_assessment_is_what_an_abort_leaves() -> None:
    m = SseUsageMeter()
    assert assess(m.result, streaming=True, ended=False).status == UsageStatus.UNKNOWN
    assert m.feed(sse(message_start(12, 0, 0, 1))) is True
    assert m.feed(sse(*text_deltas("some output"))) is True  # the estimate moved
    a = assess(m.result, streaming=True, ended=False)
    assert a.status == UsageStatus.ESTIMATED and a.usage is not None and a.usage["output_tokens"] == 3
    assert "did not finish" in a.note


def test_unreadable_replies_are_unknown_never_zero() -> None:
    cases = {
        "no message_start": sse(*text_deltas("x")),
        "garbage": b"\xff\xfe not an event stream",
        "empty": b"",
    }
    for name, body in cases.items():
        a = _assess_sse(body)
        assert a.status == UsageStatus.UNKNOWN and a.usage is None and a.note, name
    m = make_meter("application/json", "gzip")
    assert m is not None
    m.feed(b"not gzip")
    a = assess(m.finish(), streaming=False, ended=True)
    assert a.status == UsageStatus.UNKNOWN and a.usage is None and "decoded" in a.note
    a = assess(meter_bytes("application/json", b'{"type":"message","usage":{"input_'), streaming=False, ended=True)
    assert a.status == UsageStatus.UNKNOWN and a.usage is None


def test_json_replies_complete_or_not_billable() -> None:
    body = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}'
    a = assess(meter_bytes("application/json", body), streaming=False, ended=True)
    assert a.status == UsageStatus.COMPLETE and a.usage is not None and a.usage["output_tokens"] == 4
    a = assess(meter_bytes("application/json", b'{"input_tokens": 4242}'), streaming=False, ended=True)
    assert a.status == UsageStatus.NOT_BILLABLE and a.usage == dict.fromkeys(EXPECTED, 0) and a.note


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=12), cuts=st.lists(st.integers(0, 10_000)),
       eol=st.sampled_from(["\n", "\r\n", "\r"]))
def test_estimate_is_the_same_for_any_chunking(texts: list[str], cuts: list[int], eol: str) -> None:
    stream = sse(message_start(7, 0, 0, 1), *text_deltas(*texts)).replace(b"\n", eol.encode())
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    m = SseUsageMeter()
    for a, b in zip(bounds, bounds[1:], strict=False):
        m.feed(stream[a:b])
    got = assess(m.finish(), streaming=True, ended=True)
    nonempty = [t for t in texts if t]
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in nonempty)
    assert got.status == UsageStatus.ESTIMATED and got.usage is not None
    assert got.usage["input_tokens"] == 7
    assert got.usage["output_tokens"] == max(1, -(-nbytes // BYTES_PER_TOKEN), len(nonempty))
