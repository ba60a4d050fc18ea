"""The usage meter's body capture (router/meter.lua, audit.bodies) in LuaJIT with a fake Envoy handle
that, like Envoy, lets bodyChunks() be called once per reply: the capture sees every byte whether
or not the meter reads the body, the meter's usage is unchanged, a long reply is cut with a flag,
and with the capture switched off (no audit.bodies) nothing is captured even when asked."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.lua_meter import LuaMeter

HARNESS = r"""
local M = ...
local H = {}
-- One reply. cap: the ccr.capture namespace as on_request left it (nil: not a captured request).
function H.run(status, headers, chunks, cap, b64)
  local ns = {}
  if cap ~= nil then ns["ccr.capture"] = cap end
  local md = {
    set = function(_, namespace, key, value)
      ns[namespace] = ns[namespace] or {}
      ns[namespace][key] = value
    end,
    get = function(_, namespace) return ns[namespace] end,
  }
  local t = { [":status"] = status }
  for k, v in pairs(headers) do t[k] = v end
  local i, calls, began = 0, 0, false
  local handle = {
    headers = function() return { get = function(_, k) return t[k] end } end,
    streamInfo = function() return { dynamicMetadata = function() return md end } end,
    logWarn = function() end,
    base64Escape = function(_, s) return b64(s) end,
    bodyChunks = function()
      calls = calls + 1
      if began then error("cannot call bodyChunks after body processing has begun") end
      return function()
        i = i + 1
        local s = chunks[i]
        if s == nil then return nil end
        began = true
        return { length = function() return #s end,
                 getBytes = function(_, start, len) assert(start == 0 and len == #s); return s end }
      end
    end,
  }
  envoy_on_response(handle)
  return ns, calls
end
return H
"""


class Capture:
    def __init__(self, enabled: bool = True) -> None:
        self.meter = LuaMeter()
        self.meter.M.CAPTURE_ENABLED = enabled
        self.H = self.meter.lua.execute(HARNESS.encode(), self.meter.M)

    def run(self, status: int, headers: dict[str, str], chunks: list[bytes], max_bytes: int | None
            ) -> tuple[dict[str, Any] | None, dict[str, Any], int]:
        lua = self.meter.lua
        cap = None
        if max_bytes is not None:
            cap = lua.table_from({b"max": max_bytes, b"response": b"", b"response_bytes": 0,
                                  b"response_truncated": False})
        ns, calls = self.H.run(str(status).encode(), self.meter.headers(headers), lua.table_from(chunks), cap,
                               lambda s: base64.b64encode(s))

        def plain(t: Any) -> dict[str, Any]:
            return {k.decode(): v for k, v in t.items()} if t is not None else {}

        got = plain(ns[b"ccr.capture"]) if ns[b"ccr.capture"] is not None else None
        return got, plain(ns[b"ccr.usage"]), calls


REPLY = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                    "usage": {"input_tokens": 11, "output_tokens": 7}}).encode()
JSON = {"content-type": "application/json"}


def _body(c: dict[str, Any]) -> bytes:
    return base64.b64decode(c["response"])


def test_captures_the_metered_reply_and_leaves_usage_alone() -> None:
    chunks = [REPLY[:20], REPLY[20:50], REPLY[50:]]
    got, usage, calls = Capture().run(200, JSON, chunks, 1 << 20)
    assert got is not None and _body(got) == REPLY
    assert got["response_bytes"] == len(REPLY) and got["response_truncated"] is False
    _, plain_usage, _ = Capture().run(200, JSON, chunks, None)  # not captured: the same usage
    assert usage == plain_usage and usage["input_tokens"] == 11
    assert calls == 1


@pytest.mark.parametrize("headers", [{"content-type": "application/json", "content-encoding": "gzip"},
                                     {"content-type": "application/octet-stream"}])
def test_reads_on_when_the_meter_has_no_use_for_the_body(headers: dict[str, str]) -> None:
    """The meter stops reading an unreadable reply at its first chunk; the capture still gets it all
    (one bodyChunks() call: a second one would raise in Envoy)."""
    chunks = [b"\x1f\x8b first", b" second", b" third"]
    got, _, calls = Capture().run(200, headers, chunks, 1 << 20)
    assert got is not None and _body(got) == b"".join(chunks) and calls == 1


def test_a_long_reply_is_cut_with_a_flag() -> None:
    got, usage, _ = Capture().run(200, JSON, [REPLY[:30], REPLY[30:]], 25)
    assert got is not None and _body(got) == REPLY[:25]
    assert got["response_bytes"] == len(REPLY) and got["response_truncated"] is True
    assert usage["output_tokens"] == 7  # the meter still read all of it


def test_nothing_without_the_switch_or_the_request_mark() -> None:
    got, _, _ = Capture(enabled=False).run(200, JSON, [REPLY], 1 << 20)
    assert got is not None and got["response"] == b""  # as on_request left it: nothing copied
    got, _, _ = Capture().run(200, JSON, [REPLY], None)
    assert got is None
