"""router/meter.lua (the Envoy upstream Lua filter that meters passthrough providers) against
the Python adapter's metering (router/usage.py + router/adapter/server.py), in LuaJIT via lupa.

The same reply (status, headers, body in any chunking, ended or aborted) must leave the same
`ccr.usage` namespace after every step that Envoy resumes the filter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import router.usage
from ccr import contract
from tests.lua_meter import LuaMeter, clean, python_run
from tests.test_usage import STREAM, message_start, sse, text_deltas

LUA = LuaMeter()
M = LUA.M


def same(a: object, b: object) -> bool:
    """Equal with the same JSON types (1 and 1.0 differ to the meter)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)  # type: ignore[attr-defined]
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


def lua_json(raw: bytes) -> tuple[bool, object]:
    ok, v = M.json_decode(raw)
    return bool(ok), (LUA.to_python(v) if ok else None)


def py_json(raw: bytes) -> tuple[bool, object]:
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None


def compare(status: int, headers: dict[str, str], chunks: list[bytes] | None, *, eos_on_last: bool = True,
            stop_after: int | None = None) -> list[dict[str, object]]:
    lua_snaps, _sets, _ = LUA.run(status, headers, chunks, eos_on_last=eos_on_last, stop_after=stop_after)
    py_snaps = python_run(status, headers, chunks, eos_on_last=eos_on_last, stop_after=stop_after)
    assert [clean(s) for s in lua_snaps] == [clean(s) for s in py_snaps]
    return lua_snaps


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [b""]


@contextmanager
def limits(sse_line: int, json_bytes: int) -> Iterator[None]:
    saved = (router.usage.MAX_SSE_LINE_BYTES, router.usage.MAX_JSON_BYTES)
    lua_saved = (M.MAX_SSE_LINE_BYTES, M.MAX_JSON_BYTES)
    router.usage.MAX_SSE_LINE_BYTES, router.usage.MAX_JSON_BYTES = sse_line, json_bytes
    M.MAX_SSE_LINE_BYTES, M.MAX_JSON_BYTES = sse_line, json_bytes
    try:
        yield
    finally:
        router.usage.MAX_SSE_LINE_BYTES, router.usage.MAX_JSON_BYTES = saved
        M.MAX_SSE_LINE_BYTES, M.MAX_JSON_BYTES = lua_saved


SSE = {"content-type": "text/event-stream; charset=utf-8"}
JSON = {"content-type": "application/json"}

# ---------------------------------------------------------------------------- names and limits


def test_names_and_limits_are_the_contracts() -> None:
    assert M.USAGE_NS.decode() == contract.USAGE_NS
    assert tuple(f.decode() for f in M.USAGE_TOKEN_FIELDS.values()) == contract.USAGE_TOKEN_FIELDS
    assert tuple(f.decode() for f in M.USAGE_CACHE_SPLIT.values()) == contract.USAGE_CACHE_SPLIT
    assert tuple(f.decode() for f in M.USAGE_CACHE_SPLIT_SOURCE.values()) == contract.USAGE_CACHE_SPLIT_SOURCE
    assert (M.USAGE_STATUS.decode(), M.USAGE_NOTE.decode()) == (contract.USAGE_STATUS, contract.USAGE_NOTE)
    assert M.CCR_HEADER_PREFIX.decode() == contract.CCR_HEADER_PREFIX
    assert (M.MAX_JSON_BYTES, M.MAX_SSE_LINE_BYTES, M.BYTES_PER_TOKEN) == (
        router.usage.MAX_JSON_BYTES, router.usage.MAX_SSE_LINE_BYTES, router.usage.BYTES_PER_TOKEN)


# ---------------------------------------------------------------------------- the JSON decoder

JSON_EDGES = [
    b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d\\ude00"', b'"\\ud800\\u0041"', b'"\\uD800\\uDC00"', b'"\\U00e9"',
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808", b"-9223372036854775809",
    b"9007199254740993", b"1e400", b"-1e400", b"1" + b"0" * 400, b"1.0", b"-0", b"-0.0", b"01", b"-01", b"1.",
    b".5", b"1e", b"1E+2", b"-", b"\xef\xbb\xbf{}", b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\x80"',
    b'"\xf4\x90\x80\x80"', b'"\xf0\x9f\x98\x80"', b'"\x01"', b'"\x7f"', b'"\x00"', b" {} ", b"{}\x00", b"\x0c{}",
    b"nan", b"NaN", b"Infinity", b"tru", b"nul", b"[1,]", b'{"a":1,}', b'{"a" 1}', b"{1:2}", b"", b" ",
    b'{"a":1}{"a":2}', b'{"a":1,"a":2}', b'"\\/\\b\\f\\n\\r\\t\\"\\\\"', b"[" * 1024 + b"]" * 1024,
    b"[" * 1025 + b"]" * 1025, b'{"a":' * 1024 + b"1" + b"}" * 1024, b'{"a":' * 1025 + b"1" + b"}" * 1025,
    b"123456789012345678901234567890.5", b"5e-324", b"1.7976931348623157e308", b"[true,false,null]",
]


@pytest.mark.parametrize("raw", JSON_EDGES)
def test_json_decoder_accepts_what_orjson_accepts(raw: bytes) -> None:
    want_ok, want = py_json(raw)
    if len(raw) > 2000:  # the nesting limit: too deep for Python to compare values
        assert bool(M.json_decode(raw)[0]) == want_ok
        return
    ok, v = lua_json(raw)
    assert ok == want_ok
    assert same(v, want)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(doc=json_values, ascii_=st.booleans(), indent=st.sampled_from([None, 1, "\t"]))
def test_json_decoder_reads_any_document_like_orjson(doc: object, ascii_: bool, indent: object) -> None:
    raw = json.dumps(doc, ensure_ascii=ascii_, indent=indent).encode("utf-8", "surrogatepass")
    ok, v = lua_json(raw)
    assert (ok, v) == py_json(raw) and same(v, py_json(raw)[1])


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=40) | st.text(alphabet='{}[],:"\\ u0123456789abcdefEe.+-truefalsn\n\t\r\x00\xe9',
                                            max_size=40).map(lambda s: s.encode()))
def test_json_decoder_refuses_what_orjson_refuses(raw: bytes) -> None:
    ok, v = lua_json(raw)
    want_ok, want = py_json(raw)
    assert ok == want_ok and same(v, want)


# ---------------------------------------------------------------------------- fixed replies


def test_the_usage_test_stream_in_any_split() -> None:
    for i in range(len(STREAM) + 1):
        compare(200, SSE, [STREAM[:i], STREAM[i:]])
    snaps = compare(200, SSE, [STREAM[i:i + 1] for i in range(len(STREAM))])
    assert snaps[-1] == {"input_tokens": 2095.0, "output_tokens": 87.0, "cache_creation_input_tokens": 1536.0,
                         "cache_read_input_tokens": 20480.0, "cache_creation_5m_input_tokens": 0.0,
                         "cache_creation_1h_input_tokens": 0.0, "usage_status": "complete", "usage_note": ""}


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_other_line_endings_at_every_split(eol: bytes) -> None:
    body = STREAM.replace(b"\n", eol)
    for i in range(len(body) + 1):
        compare(200, SSE, [body[:i], body[i:]], eos_on_last=bool(i % 2))


def test_abort_at_every_chunk_leaves_what_python_leaves() -> None:
    body = sse(message_start(10, 2, 3, 1), *text_deltas("héllo", "", " wörld", "✓" * 9), ("error", {
        "type": "error", "error": {"type": "overloaded_error", "message": "x"}}))
    chunks = split(body, list(range(0, len(body), 37)))
    for k in range(len(chunks) + 1):
        snaps = compare(200, SSE, chunks, stop_after=k)
    assert snaps[-1]["usage_status"] == "estimated"
    assert "provider error event overloaded_error" in str(snaps[-1]["usage_note"])


def test_headers_decide_like_the_adapter() -> None:
    msg = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}'
    for status in (200, 204, 302, 400, 429, 529):
        for ctype in ("application/json", "text/plain", None, "", "application/json\u00a0", "text/événement"):
            for cenc in (None, "identity", "IDENTITY", "gzip", " identity , ", "br, zstd", ",", "x-\udcff"):
                headers = {k: v for k, v in (("content-type", ctype), ("content-encoding", cenc)) if v is not None}
                compare(status, headers, [msg])
                compare(status, headers, None)  # end of stream at the headers: no body


def test_gzip_is_the_one_difference_and_is_unknown() -> None:
    snaps, _, _ = LUA.run(200, {**JSON, "content-encoding": "gzip"}, [b"\x1f\x8b..."], eos_on_last=True)
    assert snaps[-1]["usage_status"] == "unknown"
    assert snaps[-1]["usage_note"] == "provider replied with content-encoding 'gzip', which the meter cannot read"
    assert snaps[-1]["input_tokens"] is None


def test_every_field_is_set_by_the_first_publication_and_counts_go_null() -> None:
    """An earlier attempt's numbers never survive: the first publication sets all eight fields
    (the four counts, the cache-write split, status, note), and a status without counts sets them
    to nil (Envoy: null_value)."""
    body = sse(message_start(10, 0, 0, 1), *text_deltas("abc"))
    _, sets, _ = LUA.run(200, SSE, [body], eos_on_last=True)
    first = sets[:8]
    assert sorted(k for _, k, _ in first) == sorted([*contract.USAGE_METERED_FIELDS, "usage_status", "usage_note"])
    assert all(ns == contract.USAGE_NS for ns, _, _ in sets)
    assert {k: v for _, k, v in first if k in contract.USAGE_METERED_FIELDS} == dict.fromkeys(
        contract.USAGE_METERED_FIELDS)


def test_a_failing_meter_publishes_unknown_and_never_raises() -> None:
    lua = LuaMeter()
    lua.lua.execute(b"""
        local M = ...
        local real = M.sse_meter
        M.sse_meter = function()
          local m = real()
          m.feed = function() error("boom") end
          return m
        end
    """, lua.M)
    snaps, _, status = lua.run(200, SSE, [STREAM[:50], STREAM[50:]], eos_on_last=True)
    assert status == "dead"  # the script ended; Envoy lets the rest of the body flow
    assert snaps[-1]["usage_status"] == "unknown" and "meter failed" in str(snaps[-1]["usage_note"])
    assert snaps[-1]["input_tokens"] is None


def test_a_failure_at_the_headers_publishes_unknown_and_never_raises() -> None:
    ns = LUA.lua.execute(b"""
        local ns = {}
        local md = { set = function(_, n, k, v) ns[k] = v == nil and "null" or v end }
        local handle = {
          headers = function() error("no headers") end,
          streamInfo = function() return { dynamicMetadata = function() return md end } end,
          logWarn = function() end,
        }
        local co = coroutine.create(function() envoy_on_response(handle) end)
        assert(coroutine.resume(co))
        assert(coroutine.status(co) == "dead")
        return ns
    """)
    got = {k.decode(): v.decode() for k, v in ns.items()}
    assert got["usage_status"] == "unknown" and "meter failed" in got["usage_note"]
    assert all(got[f] == "null" for f in contract.USAGE_TOKEN_FIELDS)


def test_a_failing_finish_assesses_what_was_read() -> None:
    lua = LuaMeter()
    lua.lua.execute(b"""
        local M = ...
        local real = M.sse_meter
        M.sse_meter = function()
          local m = real()
          m.finish = function() error("boom") end
          return m
        end
    """, lua.M)
    body = sse(message_start(10, 0, 0, 1), *text_deltas("abcdefgh"))
    snaps, _, status = lua.run(200, SSE, [body], eos_on_last=False)
    assert status == "dead"
    assert snaps[-1]["usage_status"] == "estimated" and snaps[-1]["output_tokens"] == 2.0
    assert str(snaps[-1]["usage_note"]).startswith("the reply ended before its final usage")


# ---------------------------------------------------------------------------- generated replies

ints = st.one_of(st.integers(0, 10**6), st.integers(-5, 2**53 - 1), st.just(2**63), st.just(2**64 + 1))
count_values = st.one_of(ints, st.none(), st.booleans(), st.floats(0, 1e6, allow_nan=False), st.text(max_size=3))
usage_dicts = st.dictionaries(st.sampled_from([*contract.USAGE_TOKEN_FIELDS, "service_tier"]), count_values,
                              max_size=5)
usage_objs = st.one_of(usage_dicts, usage_dicts, usage_dicts, st.none(), st.integers(),
                       st.lists(st.integers(), max_size=2))
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", "é", "✓", "😀", "\x00", "a\nb", "\\u", '"']))
error_types = st.one_of(st.sampled_from(["overloaded_error", "api_error", "", "é\x00x"]), st.none(), st.booleans(),
                        st.integers(-3, 2**64 + 2), st.floats(allow_nan=False, allow_infinity=False),
                        st.lists(st.one_of(st.integers(0, 9), st.text(alphabet="ab'\"\\\n", max_size=3)), max_size=3),
                        st.dictionaries(st.text(alphabet="ab'", max_size=2), st.integers(0, 9) | st.none(),
                                        max_size=2))


@st.composite
def sse_event(draw: st.DrawFn) -> tuple[str | None, object]:
    kind = draw(st.sampled_from(["message_start", "delta", "delta", "delta", "message_delta", "message_stop", "ping",
                                 "error", "block", "other", "nomsg"]))
    if kind == "message_start":
        msg: object = {"type": "message", "usage": draw(usage_objs)} if draw(st.booleans()) else draw(
            st.sampled_from([None, [], {"usage": None}, {}]))
        return "message_start", {"type": "message_start", "message": msg}
    if kind == "delta":
        dtype = draw(st.sampled_from(["text_delta", "thinking_delta", "input_json_delta", "signature_delta",
                                      "citations_delta", None, 5]))
        field = draw(st.sampled_from(["text", "thinking", "partial_json", "signature", ""]))
        value: object = draw(texts) if draw(st.integers(0, 9)) else draw(st.sampled_from([None, 3, ["x"]]))
        return "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": dtype,
                                                                                              field: value}}
    if kind == "message_delta":
        return "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": draw(usage_objs)}
    if kind == "message_stop":
        return "message_stop", {"type": "message_stop"}
    if kind == "ping":
        return "ping", {"type": "ping"}
    if kind == "error":
        err: object = {"type": draw(error_types), "message": "m"} if draw(st.integers(0, 5)) else draw(
            st.sampled_from([None, "x", {}]))
        return "error", {"type": "error", "error": err}
    if kind == "block":
        return "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    if kind == "other":
        name = draw(st.sampled_from(["", "weird", "message_start", "error"]))
        typ = draw(st.sampled_from(["message_stop", "", None, 1, "content_block_delta", "message_delta"]))
        return name, {"type": typ, "delta": {"type": "text_delta", "text": "zz"}, "usage": {"output_tokens": 3}}
    return None, None


@st.composite
def sse_body(draw: st.DrawFn) -> bytes:
    out: list[bytes] = []
    eols = st.sampled_from([b"\n", b"\r\n", b"\r"])
    if draw(st.integers(0, 3)):  # most streams start like a real one
        name, doc = "message_start", message_start(draw(st.integers(0, 5000)), 0, draw(st.integers(0, 9)), 1)[1]
        out.append(b"event: message_start\n" + b"data: " + json.dumps(doc).encode() + b"\n\n")
    for _ in range(draw(st.integers(0, 12))):
        name, doc = draw(sse_event())
        extra = draw(st.sampled_from(["", "", "", "comment", "id", "nospace", "nocolon", "multiline", "broken",
                                      "noevent", "noblank", "bare"]))
        eol = draw(eols)
        lines: list[bytes] = []
        if extra == "comment":
            lines.append(b": keep-alive " + draw(st.binary(max_size=5)).replace(b"\n", b"").replace(b"\r", b""))
        if extra == "id":
            lines += [b"id: 7", b"retry: 100"]
        if extra == "bare":
            lines.append(draw(st.sampled_from([b"data", b"event", b"data:", b"event:"])))
        payload = json.dumps(doc, ensure_ascii=draw(st.booleans()),
                             separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))).encode("utf-8",
                                                                                                 "surrogatepass")
        if extra == "broken":
            payload = payload[:draw(st.integers(0, max(0, len(payload) - 1)))]
        if name is not None and extra != "noevent":
            lines.append(b"event:" + name.encode() if extra == "nospace" else b"event: " + name.encode())
        if extra == "multiline" and len(payload) > 2:
            cut = draw(st.integers(1, len(payload) - 1))
            lines += [b"data: " + payload[:cut], b"data: " + payload[cut:]]
        elif extra == "nocolon":
            lines.append(b"data")
        else:
            lines.append((b"data:" if extra == "nospace" else b"data: ") + payload)
        out.append(eol.join(lines) + eol + (b"" if extra == "noblank" else eol))
    if draw(st.booleans()):  # and end like one
        out.append(sse(("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                          "usage": {"output_tokens": draw(st.integers(0, 10**6))}}),
                       ("message_stop", {"type": "message_stop"})))
    body = b"".join(out)
    if draw(st.integers(0, 3)) == 0:  # cut off anywhere
        body = body[:draw(st.integers(0, len(body)))]
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=sse_body(), cuts=st.lists(st.integers(0, 100_000), max_size=12), eos=st.booleans(),
       abort=st.none() | st.integers(0, 12))
@example(body=STREAM, cuts=[], eos=True, abort=None)
def test_generated_streams_meter_alike_in_any_chunking(body: bytes, cuts: list[int], eos: bool,
                                                        abort: int | None) -> None:
    compare(200, SSE, split(body, cuts), eos_on_last=eos, stop_after=abort)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=sse_body(), cuts=st.lists(st.integers(0, 100_000), max_size=12), limit=st.integers(1, 120))
def test_huge_lines_are_skipped_alike(body: bytes, cuts: list[int], limit: int) -> None:
    with limits(limit, 64 * 1024 * 1024):
        compare(200, SSE, split(body, cuts))


def test_a_huge_line_arriving_in_many_pieces() -> None:
    big = b"data: " + b"x" * 5000
    body = sse(message_start(9, 0, 0, 1)) + big + b"\n\n" + sse(*text_deltas("after"))
    for size in (1, 7, 100, 4999, 6000):
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        with limits(1000, 1000):
            compare(200, SSE, chunks)
        compare(200, SSE, chunks)


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["message", "message", "count", "error", "other", "garbage", "cut"]))
    if kind == "message":
        doc: object = {"id": "m", "type": "message", "content": [{"type": "text", "text": draw(texts)}],
                       "usage": draw(usage_objs)}
    elif kind == "count":
        doc = {"input_tokens": draw(ints)}
    elif kind == "error":
        doc = {"type": "error", "error": {"type": draw(error_types), "message": "x"} if draw(st.integers(0, 4))
               else draw(st.sampled_from([None, "x", []]))}
    elif kind == "other":
        doc = draw(json_values)
    else:
        doc = None
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "garbage":
        raw = draw(st.binary(max_size=30))
    if kind == "cut":
        full = json.dumps({"type": "message", "usage": {"input_tokens": 3, "output_tokens": 4}}).encode()
        raw = full[:draw(st.integers(0, len(full) - 1))]
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_body(), cuts=st.lists(st.integers(0, 10_000), max_size=6), eos=st.booleans(),
       abort=st.none() | st.integers(0, 6), limit=st.none() | st.integers(1, 80))
def test_generated_json_replies_meter_alike(body: bytes, cuts: list[int], eos: bool, abort: int | None,
                                            limit: int | None) -> None:
    with limits(router.usage.MAX_SSE_LINE_BYTES, limit or router.usage.MAX_JSON_BYTES):
        compare(200, {"content-type": "application/json; charset=utf-8"}, split(body, cuts), eos_on_last=eos,
                stop_after=abort)


@settings(max_examples=200, deadline=None)
@given(status=st.sampled_from([200, 201, 204, 299, 302, 400, 404, 429, 500, 529]),
       ctype=st.none() | st.sampled_from(["application/json", "text/event-stream", "Application/JSON ; q=1",
                                          " text/event-stream;charset=utf-8", "text/plain", "", ";",
                                          "application/json\u2003", "\x1ctext/event-stream", "application/jsonx",
                                          "é/\udcff"]),
       cenc=st.none() | st.sampled_from(["", "identity", "Identity", "gzip", "deflate", "br", " , identity,",
                                         "gzip,br", "x-'q'", "x-'\"", "é"]),
       body=st.none() | st.sampled_from([STREAM, b'{"type":"message","usage":{"input_tokens":1}}', b"", b"{"]))
def test_generated_headers_decide_alike(status: int, ctype: str | None, cenc: str | None, body: bytes | None) -> None:
    headers = {k: v for k, v in (("content-type", ctype), ("content-encoding", cenc)) if v is not None}
    compare(status, headers, None if body is None else [body])


# ---------------------------------------------------------------------------- the request side


def request(headers: dict[str, str]) -> tuple[dict[str, str], list[str], Any]:
    t, log, responded = LUA.H.request(LUA.headers(headers))
    return ({k.decode(): v.decode() for k, v in t.items()}, [x.decode() for x in log.values()], responded)


def test_request_hygiene_removes_credentials_and_gateway_headers() -> None:
    got, log, responded = request({
        ":path": "/v1/messages", ":method": "POST", "authorization": "Bearer client", "x-api-key": "ccr_client",
        "x-ccr-principal-id": "p1", "x-ccr-model": "m", "x-ccr-anything": "z", "accept-encoding": "br, zstd",
        "anthropic-version": "2023-06-01", "x-request-id": "rid", "x-ccrnot": "kept",
        "content-type": "application/json",
    })
    assert responded is None
    assert got == {":path": "/v1/messages", ":method": "POST", "accept-encoding": "identity",
                   "anthropic-version": "2023-06-01", "x-request-id": "rid", "x-ccrnot": "kept",
                   "content-type": "application/json"}
    assert sorted(x for x in log if x.startswith("remove")) == sorted(
        f"remove {h}" for h in ("authorization", "x-api-key", "x-ccr-principal-id", "x-ccr-model", "x-ccr-anything"))
    # accept-encoding is replaced, also when the client sent none.
    got, _, _ = request({":path": "/v1/messages"})
    assert got == {":path": "/v1/messages", "accept-encoding": "identity"}


def test_request_hygiene_failure_refuses_the_attempt() -> None:
    lua = LuaMeter()
    lua.lua.execute(b"local M = ...; M.clean_request_headers = function() error('boom') end", lua.M)
    _, _, responded = lua.H.request(lua.headers({"x-api-key": "client"}))
    assert responded is not None
    assert responded[1][b":status"] == b"500"
    body = json.loads(responded[2])
    assert body["type"] == "error" and body["error"]["type"] == "api_error"


@settings(max_examples=100, deadline=None)
@given(names=st.lists(st.sampled_from(["authorization", "x-api-key", "x-ccr-a", "x-ccr-", "x-cc", "x-api-keys",
                                       "accept", "x-ccr-principal", "host"]), unique=True))
def test_request_hygiene_matches_the_adapter(names: list[str]) -> None:
    headers = {n: "v" for n in names}
    got, _, _ = request(headers)
    removed = {h for h in headers if h in ("authorization", "x-api-key") or h.startswith(contract.CCR_HEADER_PREFIX)}
    assert got == {**{h: "v" for h in headers if h not in removed}, "accept-encoding": "identity"}


FAST_PATH_EDGES = [
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"plain"}}',
    b'{"type":"content_block_delta","index":01,"delta":{"type":"text_delta","text":"leading zero"}}',
    b'{"type":"content_block_delta","index":' + b"9" * 19 + b',"delta":{"type":"text_delta","text":"big index"}}',
    b'{"type":"content_block_delta","index":' + b"9" * 400 + b',"delta":{"type":"text_delta","text":"inf index"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","type":"abc"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"say \\"hi\\""}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"tab\there"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"bad \xff utf8"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"caf\xc3\xa9"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"other_delta","text":"x"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","thinking":"x"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}} ',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a\\"}}',
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"},"x":"y"}}',
]


@pytest.mark.parametrize("payload", FAST_PATH_EDGES)
@pytest.mark.parametrize("event", [b"content_block_delta", b"message_start", b""])
def test_the_compact_delta_fast_path_counts_what_decoding_counts(payload: bytes, event: bytes) -> None:
    start = sse(message_start(5, 0, 0, 1))
    line = (b"event: " + event + b"\n" if event else b"") + b"data: " + payload + b"\n\n"
    snaps = compare(200, SSE, [start + line])
    assert snaps[-1]["usage_status"] == "estimated"


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=40), pad=st.integers(0, 20))
def test_printable_ascii_is_every_byte_from_space_to_tilde(raw: bytes, pad: int) -> None:
    s = b"a" * pad + raw
    assert bool(M.printable_ascii(s)) == all(32 <= b <= 126 for b in s)
    for bad in (0, 9, 31, 127, 128, 255):  # one bad byte at every position of an 8-byte block
        for pos in range(17):
            t = b"x" * pos + bytes([bad]) + b"y" * 3
            assert not M.printable_ascii(t)


# ---------------------------------------------------------------------------- cache writes by lifetime

SPLITS: list[object] = [
    {"ephemeral_5m_input_tokens": 120, "ephemeral_1h_input_tokens": 30},
    {"ephemeral_1h_input_tokens": 7},
    {"ephemeral_5m_input_tokens": True, "ephemeral_1h_input_tokens": -1},
    {"ephemeral_5m_input_tokens": 1.0, "ephemeral_1h_input_tokens": None},
    {"ephemeral_5m_input_tokens": 2**53 + 1},
    [], "x", None,
]


@pytest.mark.parametrize("split", SPLITS)
def test_the_cache_write_split_is_read_alike_in_json_and_streams(split: object) -> None:
    usage = {"input_tokens": 5, "output_tokens": 9, "cache_creation_input_tokens": 150,
             "cache_read_input_tokens": 0, "cache_creation": split}
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": usage}
    snaps = compare(200, JSON, [orjson.dumps(msg)])
    if split == SPLITS[0]:
        assert (snaps[-1][contract.USAGE_CACHE_5M], snaps[-1][contract.USAGE_CACHE_1H]) == (120, 30)
    start = ("message_start", {"type": "message_start", "message": {**msg, "usage": usage}})
    compare(200, SSE, [sse(start, *text_deltas("ab"))])
    delta = ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 3, "cache_creation": split}})
    compare(200, SSE, [sse(message_start(10, 0, 0, 1), delta, ("message_stop", {"type": "message_stop"}))])
