"""router/meter.lua in a LuaJIT runtime (lupa) with a fake Envoy handle, and the Python
adapter's publications for the same reply: what tests/test_lua_meter.py and
bench/lua_meter.py compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lupa import luajit21

from ccr.contract import USAGE_NS
from router.adapter.server import AnthropicHandler, usage_struct
from router.usage import Assessment, UsageMeter, assess, content_codings, unknown

METER_LUA = Path(__file__).resolve().parent.parent / "router" / "meter.lua"

# The fake Envoy handle. bodyChunks() yields to the driver the way Envoy's does (the
# coroutine waits for the next data frame); a chunk that carries end_stream makes the
# next iterator call return nil without yielding. dynamicMetadata():set records every
# set and keeps the namespace as Envoy merges it (nil becomes a null value).
HARNESS = r"""
local M = ...
local NULL = {}
-- Envoy builds LuaJIT with LUAJIT_ENABLE_LUA52COMPAT: pairs() honours __pairs (its header
-- maps are iterated that way); lupa's LuaJIT does not, so do what Envoy's does.
local rawpairs = pairs
pairs = function(t)
  local mt = getmetatable(t)
  if mt and mt.__pairs then return mt.__pairs(t) end
  return rawpairs(t)
end
local H = { NULL = NULL }

local function header_map(t, log)
  local h = { t = t }
  function h:get(k)
    local v = self.t[k]
    if v == nil then return nil end
    return v
  end
  function h:remove(k) log[#log + 1] = "remove " .. k; self.t[k] = nil end
  function h:replace(k, v) log[#log + 1] = "replace " .. k; self.t[k] = v end
  return setmetatable(h, { __pairs = function(self)
    local names = {}
    for k in next, self.t do names[#names + 1] = k end
    local i = 0
    return function() i = i + 1; local k = names[i]; if k then return k, self.t[k] end end
  end })
end
H.header_map = header_map

-- Envoy's Lua wrappers (headers, stream info, metadata, body chunks) die when the script
-- yields: using one after a resume raises "object used outside of proper scope".
local generation = 0
local function scoped(obj)
  local born = generation
  local proxy = {}
  for k, v in next, obj do
    if type(v) == "function" then
      proxy[k] = function(self, ...)
        if generation ~= born then error("object used outside of proper scope") end
        return v(obj, ...)
      end
    else
      proxy[k] = v
    end
  end
  return setmetatable(proxy, getmetatable(obj))
end
H.scoped = scoped

-- One response: run envoy_on_response as Envoy would, resuming it per data frame.
-- chunks: a Lua array of strings; eos_on_last: the last chunk carries end_stream
-- (else the body ends by a separate nil resume, as after trailers); nil chunks: end
-- of stream at the headers. stop_after: abort (no more resumes) after that many chunks.
-- Returns the namespace snapshots after each step, the list of sets and the coroutine's status.
function H.run(status, headers, chunks, eos_on_last, stop_after)
  local ns, sets, snaps = {}, {}, {}
  local md = { set = function(_, namespace, key, value)
    sets[#sets + 1] = { namespace, key, value }
    if value == nil then value = NULL end
    ns[key] = value
  end }
  local t = { [":status"] = status }
  for k, v in pairs(headers) do t[k] = v end
  local ended = chunks == nil
  local handle = { -- the stream handle itself lives as long as the script
    headers = function() return scoped(header_map(t, {})) end,
    streamInfo = function() return scoped({ dynamicMetadata = function() return scoped(md) end }) end,
    logWarn = function(_, msg) H.warnings[#H.warnings + 1] = msg end,
    bodyChunks = function()
      return function()
        if ended then return nil end
        return coroutine.yield()
      end
    end,
  }
  H.warnings = {}
  local function snap()
    local c = {}
    for k, v in pairs(ns) do c[k] = v end
    snaps[#snaps + 1] = c
  end
  local function resume(co, chunk)
    generation = generation + 1
    if chunk then -- a wrapper made for this resume
      local s = chunk
      chunk = scoped({ length = function() return #s end,
        getBytes = function(_, start, len) assert(start == 0 and len == #s); return s end })
    end
    local ok, err = coroutine.resume(co, chunk)
    assert(ok, err)
    snap()
  end
  local co = coroutine.create(function() envoy_on_response(handle) end)
  resume(co)
  local n = chunks and #chunks or 0
  for i = 1, n do
    if coroutine.status(co) == "dead" or (stop_after and i > stop_after) then break end
    local s = chunks[i]
    if eos_on_last and i == n then ended = true end
    resume(co, s)
  end
  if not eos_on_last and chunks and coroutine.status(co) ~= "dead" and not stop_after then
    ended = true
    resume(co, nil)
  end
  return snaps, sets, coroutine.status(co)
end

-- The request side: the header operations envoy_on_request makes.
function H.request(headers)
  local log = {}
  local t = {}
  for k, v in pairs(headers) do t[k] = v end
  local responded = nil
  local handle = { headers = function() return header_map(t, log) end, logWarn = function() end,
    respond = function(_, h, body) responded = { h, body } end }
  envoy_on_request(handle)
  return t, log, responded
end

-- Feed a whole list of chunks to a pure meter, for benchmarks.
function H.meter_reply(streaming, chunks)
  local m = streaming and M.sse_meter() or M.json_meter()
  local last = M.assess(m.result, streaming, false)
  for i = 1, #chunks do
    if m:feed(chunks[i]) then
      local a = M.assess(m.result, streaming, false)
      if not M.same_assessment(a, last) then last = a end
    end
  end
  return M.assess(m:finish(), streaming, true)
end

return H
"""


class LuaMeter:
    """router/meter.lua loaded once into a LuaJIT runtime, with the fake Envoy harness."""

    def __init__(self) -> None:
        self.lua = luajit21.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        self.M = self.lua.execute(METER_LUA.read_bytes())
        self.H = self.lua.execute(HARNESS.encode(), self.M)
        self._getmt = self.lua.eval("getmetatable")
        self._type = self.lua.eval("type")
        self._is = self.lua.eval("rawequal")

    def table(self, items: Sequence[Any]) -> Any:
        return self.lua.table_from(list(items))

    def headers(self, h: dict[str, str]) -> Any:
        return self.lua.table_from({k.encode(): v.encode("utf-8", "surrogateescape") for k, v in h.items()})

    def run(self, status: int, headers: dict[str, str], chunks: Sequence[bytes] | None, *, eos_on_last: bool,
            stop_after: int | None = None) -> tuple[list[dict[str, object]], list[tuple[str, str, object]], str]:
        snaps, sets, co_status = self.H.run(str(status).encode(), self.headers(headers),
                                           None if chunks is None else self.table(chunks), eos_on_last, stop_after)
        return ([self.namespace(s) for s in snaps.values()],
                [(s[1].decode(), s[2].decode(), self.value(s[3])) for s in sets.values()], co_status.decode())

    def value(self, v: object) -> object:
        if v is None:
            return None
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        if self._is(v, self.H.NULL):
            return None
        raise AssertionError(f"unexpected metadata value {v!r}")

    def namespace(self, t: Any) -> dict[str, object]:
        return {k.decode(): self.value(v) for k, v in t.items()}

    def to_python(self, v: Any) -> object:
        """A decoded JSON value as orjson would give it."""
        if self._type(v) != b"table":
            if isinstance(v, bytes):
                return v.decode("utf-8")
            return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else v  # plain numbers are ints
        mt = self._getmt(v)
        tags = self.M.JSON_TAGS
        if mt is None:
            return {k.decode("utf-8"): self.to_python(x) for k, x in v.items()}
        if self._is(mt, tags.array):
            return [self.to_python(v[i]) for i in range(1, (v.n or 0) + 1)]
        if self._is(mt, tags.null):
            return None
        if self._is(mt, tags.float):
            return float(v.v)
        if self._is(mt, tags.bigint):
            return int(v.lit)
        raise AssertionError("unknown tag")


def clean(ns: dict[str, object]) -> dict[str, object]:
    """What the audit receiver makes of a note (audit/entry.py _clean: NUL is U+FFFD)."""
    out = dict(ns)
    if isinstance(out.get("usage_note"), str):
        out["usage_note"] = str(out["usage_note"]).replace("\x00", "\ufffd")
    return out


def struct_fields(a: Assessment) -> dict[str, object]:
    s = usage_struct(a)
    return dict(s[USAGE_NS].items())


def python_run(status: int, headers: dict[str, str], chunks: Sequence[bytes] | None, *, eos_on_last: bool,
               stop_after: int | None = None) -> list[dict[str, object]]:
    """The adapter's namespace after each step (headers, each chunk, end), as Envoy merges its publications.

    The same steps as LuaMeter.run: the adapter's _on_response_headers / _on_body / _finish
    logic, with the end of stream on the last chunk or on a separate empty one.
    """
    handler = AnthropicHandler("p")
    ns: dict[str, object] = {}
    last: list[Assessment | None] = [None]
    snaps: list[dict[str, object]] = []

    def publish(a: Assessment, always: bool = False) -> None:
        if always or a != last[0]:
            last[0] = a
            ns.update(struct_fields(a))

    # The adapter reads header values as UTF-8 with errors="replace" (header_map).
    lowered = {k.lower(): v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in headers.items()}
    got = handler.meter(status, lowered, has_body=chunks is not None)
    codings = content_codings(lowered.get("content-encoding", ""))
    if not isinstance(got, Assessment) and codings:
        # The one documented difference: Lua cannot inflate, so gzip/deflate are what the
        # adapter says of any coding it cannot read.
        got = unknown(f"provider replied with content-encoding {','.join(codings)!r}, which the meter cannot read")
    streaming = lowered.get("content-type", "").split(";", 1)[0].strip().lower() == "text/event-stream"
    meter: UsageMeter | None = None
    if isinstance(got, Assessment):
        publish(got)
    else:
        meter = got
        publish(assess(meter.result, streaming, ended=False))
    snaps.append(dict(ns))
    if chunks is None or (meter is None and status >= 400):
        return snaps
    if meter is None:
        # The Lua filter waits for the first chunk (to know there is a body), then stops.
        if chunks and (stop_after is None or stop_after >= 1):
            snaps.append(dict(ns))
        return snaps
    n = len(chunks)
    for i, c in enumerate(chunks, 1):
        if stop_after is not None and i > stop_after:
            return snaps
        changed = meter.feed(c)
        if eos_on_last and i == n:
            publish(assess(meter.finish(), streaming, ended=True), always=True)
        elif changed:
            publish(assess(meter.result, streaming, ended=False))
        snaps.append(dict(ns))
    if not eos_on_last and stop_after is None:
        publish(assess(meter.finish(), streaming, ended=True), always=True)
        snaps.append(dict(ns))
    return snaps
