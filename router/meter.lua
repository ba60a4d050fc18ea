-- Usage metering for passthrough providers, run by Envoy's Lua filter as an UPSTREAM
-- HTTP filter of the provider cluster (one coroutine per upstream attempt).
--
-- It does what the provider adapter (router/adapter/server.py + router/usage.py) does
-- for the Anthropic API, without a blocking round trip per body chunk:
--   * envoy_on_request: the client's credentials and every x-ccr-* header never reach the
--     provider; `accept-encoding: identity` so the reply stays readable (the provider's
--     key is added by a credential_injector filter after this one);
--   * envoy_on_response: reads usage from the JSON or SSE reply as it streams by, never
--     changing or holding a byte (bodyChunks() does not buffer), and publishes it as
--     dynamic metadata namespace `ccr.usage` (ccr.contract): the four token counts,
--     `usage_status` and `usage_note`. The "if nothing more arrives" assessment is
--     published at the headers and whenever it changes, so an aborted attempt is logged
--     with what it produced; the final one at the end.
--
-- The one deliberate difference from router/usage.py: Lua cannot inflate, so a reply
-- with any content-encoding other than identity is `unknown` (the request asks for
-- identity, so a provider that honours HTTP never sends one).
--
-- Everything above the Envoy glue is pure Lua (tests load it with lupa and compare it
-- with the Python meter). The chunk returns the module table.

local M = {}

local byte, char, find, sub, gsub, format, lower, rep = string.byte, string.char, string.find, string.sub,
  string.gsub, string.format, string.lower, string.rep
local concat = table.concat
local floor, ceil, max, huge = math.floor, math.ceil, math.max, math.huge
local type, pcall, error, tonumber, tostring, setmetatable, getmetatable, next =
  type, pcall, error, tonumber, tostring, setmetatable, getmetatable, next

-- Names shared with the Python side (ccr/contract.py); tests check they agree.
M.USAGE_NS = "ccr.usage"
M.USAGE_TOKEN_FIELDS = { "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens" }
-- cache_creation_input_tokens split by lifetime, read from usage.cache_creation (USAGE_CACHE_SPLIT).
M.USAGE_CACHE_SPLIT = { "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens" }
M.USAGE_CACHE_SPLIT_SOURCE = { "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens" }
M.USAGE_STATUS = "usage_status"
M.USAGE_NOTE = "usage_note"
M.CCR_HEADER_PREFIX = "x-ccr-"
-- Body capture for the audit trail (router/capture.lua does the same on the adapter's clusters).
-- router/resources.py turns this on when audit.bodies names someone; off, nothing below looks for it.
M.CAPTURE_ENABLED = false
M.CAPTURE_NS = "ccr.capture"
M.H_CAPTURE = "x-ccr-capture"
-- Limits and the estimate rule of router/usage.py (read at run time so tests can lower them).
M.MAX_JSON_BYTES = 64 * 1024 * 1024
M.MAX_SSE_LINE_BYTES = 16 * 1024 * 1024
M.BYTES_PER_TOKEN = 4

local FIELDS = M.USAGE_TOKEN_FIELDS
local NFIELDS = #FIELDS
local SPLIT, SPLIT_SOURCE = M.USAGE_CACHE_SPLIT, M.USAGE_CACHE_SPLIT_SOURCE
-- Every count published (USAGE_METERED_FIELDS): the top-level ones, then the split.
local PUBLISHED = { FIELDS[1], FIELDS[2], FIELDS[3], FIELDS[4], SPLIT[1], SPLIT[2] }
local NPUBLISHED = #PUBLISHED

---------------------------------------------------------------------------- UTF-8

-- Length of the well-formed UTF-8 sequence starting at i, or 0 and the length of the
-- maximal ill-formed subpart (what Python's decode(errors="replace") turns into one U+FFFD).
local function utf8_seq(s, i)
  local b = byte(s, i)
  if b < 0x80 then return 1 end
  local n, lo, hi
  if b >= 0xC2 and b <= 0xDF then n, lo, hi = 1, 0x80, 0xBF
  elseif b == 0xE0 then n, lo, hi = 2, 0xA0, 0xBF
  elseif b == 0xED then n, lo, hi = 2, 0x80, 0x9F
  elseif b >= 0xE1 and b <= 0xEF then n, lo, hi = 2, 0x80, 0xBF
  elseif b == 0xF0 then n, lo, hi = 3, 0x90, 0xBF
  elseif b == 0xF4 then n, lo, hi = 3, 0x80, 0x8F
  elseif b >= 0xF1 and b <= 0xF3 then n, lo, hi = 3, 0x80, 0xBF
  else return 0, 1 end
  local c = byte(s, i + 1)
  if not c or c < lo or c > hi then return 0, 1 end
  for k = 2, n do
    c = byte(s, i + k)
    if not c or c < 0x80 or c > 0xBF then return 0, k end
  end
  return n + 1
end

-- True when s is well-formed UTF-8 (no surrogates, nothing above U+10FFFF), like orjson's check.
local function utf8_valid(s)
  local i = find(s, "[\128-\255]")
  while i do
    local n = utf8_seq(s, i)
    if n == 0 then return false end
    i = find(s, "[\128-\255]", i + n)
  end
  return true
end
M.utf8_valid = utf8_valid

-- True when every byte of s is printable ASCII (32..126): such text needs no control-character
-- or UTF-8 check. A byte loop that LuaJIT compiles runs several times faster than string.find
-- with a character class (Lua's matcher tests the class byte by byte in C, slowly).
local function printable_ascii(s)
  local n = #s
  local k = 1
  while k + 7 <= n do
    local a, b, c, d, e, f, g, h = byte(s, k, k + 7)
    if a < 32 or b < 32 or c < 32 or d < 32 or e < 32 or f < 32 or g < 32 or h < 32
        or a > 126 or b > 126 or c > 126 or d > 126 or e > 126 or f > 126 or g > 126 or h > 126 then
      return false
    end
    k = k + 8
  end
  while k <= n do
    local a = byte(s, k)
    if a < 32 or a > 126 then return false end
    k = k + 1
  end
  return true
end
M.printable_ascii = printable_ascii

-- s decoded as UTF-8 with errors="replace" (how the adapter reads header values).
local function utf8_replace(s)
  if not find(s, "[\128-\255]") then return s end
  local out, o, i, n = {}, 0, 1, #s
  while i <= n do
    local j = find(s, "[\128-\255]", i)
    if not j then o = o + 1; out[o] = sub(s, i); break end
    if j > i then o = o + 1; out[o] = sub(s, i, j - 1) end
    local len, bad = utf8_seq(s, j)
    if len > 0 then o = o + 1; out[o] = sub(s, j, j + len - 1); i = j + len
    else o = o + 1; out[o] = "\239\191\189"; i = j + bad end
  end
  return concat(out)
end
M.utf8_replace = utf8_replace

local function utf8_encode(cp)
  if cp < 0x80 then return char(cp)
  elseif cp < 0x800 then return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
  elseif cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64, 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local function utf8_decode_at(s, i, len)
  local b = byte(s, i)
  if len == 1 then return b end
  if len == 2 then return (b - 0xC0) * 64 + byte(s, i + 1) - 0x80 end
  if len == 3 then return ((b - 0xE0) * 64 + byte(s, i + 1) - 0x80) * 64 + byte(s, i + 2) - 0x80 end
  return (((b - 0xF0) * 64 + byte(s, i + 1) - 0x80) * 64 + byte(s, i + 2) - 0x80) * 64 + byte(s, i + 3) - 0x80
end

---------------------------------------------------------------------------- JSON

-- A strict JSON decoder that accepts exactly what orjson.loads accepts (RFC 8259, UTF-8
-- only, no BOM, nesting at most 1024), keeping the distinctions the meter's Python
-- checks make: objects are plain tables; arrays, null, floats and integers beyond 2^53
-- are tagged (an integer count and a float count are different things to the meter).
local ARRAY, NULL_MT, FLOAT, BIGINT = {}, {}, {}, {}
local NULL = setmetatable({}, NULL_MT)
M.NULL = NULL
M.JSON_TAGS = { array = ARRAY, null = NULL_MT, float = FLOAT, bigint = BIGINT }
local MAX_DEPTH = 1024
local TWO53 = 2 ^ 53
-- With `ordered`, objects remember their keys' first-insertion order (for Python repr).
local ORDER = setmetatable({}, { __mode = "k" })

local JsonError = {}
local function fail() error(JsonError, 0) end

local decode_value

local function skip_ws(s, i)
  local b = byte(s, i)
  if b == 32 or b == 10 or b == 13 or b == 9 then
    local _, e = find(s, "^[ \t\r\n]*", i)
    return e + 1
  end
  return i
end

local ESCAPES = { [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r",
  [116] = "\t" }

local function unescape(c, hex)
  if c == "u" then
    if #hex < 4 then fail() end
    return utf8_encode(tonumber(hex, 16)) -- a surrogate comes out in its 3-byte form, paired below
  end
  local e = ESCAPES[byte(c)]
  if not e then fail() end
  return e .. hex
end

local function join_pair(b1, b2, b3, b4)
  local hi = 0xD000 + (byte(b1) - 0x80) * 64 + byte(b2) - 0x80
  local lo = 0xD000 + (byte(b3) - 0x80) * 64 + byte(b4) - 0x80
  return utf8_encode(0x10000 + (hi - 0xD800) * 1024 + (lo - 0xDC00))
end
local SURROGATE_PAIR = "\237([\160-\175])([\128-\191])\237([\176-\191])([\128-\191])"

-- Set per document: it is all printable ASCII, so its strings need no byte checks.
local clean_doc = false

-- i: just after the opening quote. Returns the decoded string and the index after the closing
-- quote. The content is checked as a whole (control characters, UTF-8) and unescaped in one
-- gsub, so that long texts cost a few C-speed scans instead of a Lua loop per escape.
local function decode_string(s, i)
  local j = find(s, '"', i, true)
  while j do
    local k = j - 1
    while byte(s, k) == 92 do k = k - 1 end
    if (j - 1 - k) % 2 == 0 then break end -- not an escaped quote
    j = find(s, '"', j + 1, true)
  end
  if not j then fail() end
  local raw = sub(s, i, j - 1)
  if not clean_doc and (find(raw, "[%z\1-\31]") or not utf8_valid(raw)) then fail() end
  if not find(raw, "\\", 1, true) then return raw, j + 1 end
  local out = gsub(raw, "\\(.)(%x?%x?%x?%x?)", unescape)
  -- Raw UTF-8 cannot hold surrogates (checked above): any here came from \u escapes and
  -- must be a high one directly followed by a low one, as orjson requires.
  if find(out, "\237[\160-\191]") then
    out = gsub(out, SURROGATE_PAIR, join_pair)
    if find(out, "\237[\160-\191]") then fail() end
  end
  return out, j + 1
end

local U64_MAX, I64_MIN_ABS = "18446744073709551615", "9223372036854775808"

local function decode_number(s, i)
  local st = i
  local neg = byte(s, i) == 45
  if neg then i = i + 1 end
  local b = byte(s, i)
  if b == 48 then
    i = i + 1
    b = byte(s, i)
    if b and b >= 48 and b <= 57 then fail() end
  elseif b and b >= 49 and b <= 57 then
    local _, e = find(s, "^[0-9]*", i + 1)
    i = e + 1
  else
    fail()
  end
  local int_end = i
  local is_float = false
  if byte(s, i) == 46 then
    local _, e = find(s, "^[0-9]+", i + 1)
    if not e then fail() end
    i, is_float = e + 1, true
  end
  b = byte(s, i)
  if b == 101 or b == 69 then
    i = i + 1
    b = byte(s, i)
    if b == 43 or b == 45 then i = i + 1 end
    local _, e = find(s, "^[0-9]+", i)
    if not e then fail() end
    i, is_float = e + 1, true
  end
  local lit = sub(s, st, i - 1)
  local v = tonumber(lit)
  if not v or v == huge or v == -huge then fail() end
  if not is_float then
    -- orjson: an integer literal within int64/uint64 is an int, beyond that a float.
    local digits = sub(s, neg and st + 1 or st, int_end - 1)
    local limit = neg and I64_MIN_ABS or U64_MAX
    if #digits < #limit or (#digits == #limit and digits <= limit) then
      if v < TWO53 and v > -TWO53 then return v + 0, i end -- exact; + 0: -0 is the int 0
      return setmetatable({ v = v, lit = lit }, BIGINT), i
    end
  end
  return setmetatable({ v = v }, FLOAT), i
end

local function decode_array(s, i, depth, ordered)
  if depth > MAX_DEPTH then fail() end
  local arr, n = setmetatable({}, ARRAY), 0
  i = skip_ws(s, i)
  if byte(s, i) == 93 then return arr, i + 1 end
  while true do
    local v
    v, i = decode_value(s, i, depth, ordered)
    n = n + 1; arr[n] = v
    i = skip_ws(s, i)
    local b = byte(s, i)
    if b == 93 then arr.n = n; return arr, i + 1 end
    if b ~= 44 then fail() end
    i = skip_ws(s, i + 1)
  end
end

local function decode_object(s, i, depth, ordered)
  if depth > MAX_DEPTH then fail() end
  local obj, keys = {}, nil
  if ordered then keys = {}; ORDER[obj] = keys end
  i = skip_ws(s, i)
  if byte(s, i) == 125 then return obj, i + 1 end
  while true do
    if byte(s, i) ~= 34 then fail() end
    local k, v
    k, i = decode_string(s, i + 1)
    i = skip_ws(s, i)
    if byte(s, i) ~= 58 then fail() end
    v, i = decode_value(s, skip_ws(s, i + 1), depth, ordered)
    if keys and obj[k] == nil then keys[#keys + 1] = k end
    obj[k] = v
    i = skip_ws(s, i)
    local b = byte(s, i)
    if b == 125 then return obj, i + 1 end
    if b ~= 44 then fail() end
    i = skip_ws(s, i + 1)
  end
end

decode_value = function(s, i, depth, ordered)
  local b = byte(s, i)
  if b == 34 then return decode_string(s, i + 1) end
  if b == 123 then return decode_object(s, i + 1, depth + 1, ordered) end
  if b == 91 then return decode_array(s, i + 1, depth + 1, ordered) end
  if b == 116 then if sub(s, i, i + 3) == "true" then return true, i + 4 end fail() end
  if b == 102 then if sub(s, i, i + 4) == "false" then return false, i + 5 end fail() end
  if b == 110 then if sub(s, i, i + 3) == "null" then return NULL, i + 4 end fail() end
  return decode_number(s, i)
end

local function decode_all(s, ordered)
  clean_doc = printable_ascii(s)
  local v, i = decode_value(s, skip_ws(s, 1), 0, ordered)
  if skip_ws(s, i) <= #s then fail() end
  return v
end

-- ok, value: value is the decoded document when ok. Never raises on bad input.
local function json_decode(s, ordered)
  local ok, v = pcall(decode_all, s, ordered)
  if ok then return true, v end
  if v ~= JsonError then error(v, 0) end -- a bug, not bad input
  return false, nil
end
M.json_decode = json_decode

local function is_object(v) return type(v) == "table" and getmetatable(v) == nil end
-- Python isinstance(v, int) (bool included, as in Python).
local function is_int(v)
  local t = type(v)
  return t == "number" or t == "boolean" or (t == "table" and getmetatable(v) == BIGINT)
end
-- A non-negative int that is not a bool, as a Lua number; else nil (Usage.update's rule).
local function count_of(v)
  if type(v) == "number" then return v >= 0 and v or nil end
  if type(v) == "table" and getmetatable(v) == BIGINT and v.v >= 0 then return v.v end
  return nil
end

-- Python truthiness of a decoded JSON value.
local function truthy(v)
  local t = type(v)
  if t == "string" then return v ~= "" end
  if t == "number" then return v ~= 0 end
  if t == "boolean" then return v end
  if t ~= "table" then return false end
  local mt = getmetatable(v)
  if mt == NULL_MT then return false end
  if mt == FLOAT then return v.v ~= 0 end
  if mt == BIGINT then return true end
  if mt == ARRAY then return v[1] ~= nil end
  return next(v) ~= nil
end

-- repr(float) as Python prints it: the shortest round-tripping digits.
local function py_float(x)
  if x ~= x then return "nan" end
  if x == 0 then return (1 / x < 0) and "-0.0" or "0.0" end
  local s
  for p = 0, 16 do
    s = format("%." .. p .. "e", x)
    if tonumber(s) == x then break end
  end
  local sign, d1, frac, ex = s:match("^(-?)(%d)%.?(%d*)e([-+]%d+)$")
  local digits = (d1 .. frac):gsub("0+$", "")
  if digits == "" then digits = "0" end
  local decpt = tonumber(ex) + 1
  if decpt > -4 and decpt <= 16 then
    if decpt <= 0 then return sign .. "0." .. rep("0", -decpt) .. digits end
    if decpt >= #digits then return sign .. digits .. rep("0", decpt - #digits) .. ".0" end
    return sign .. sub(digits, 1, decpt) .. "." .. sub(digits, decpt + 1)
  end
  local e = decpt - 1
  local mant = sub(digits, 1, 1) .. (#digits > 1 and ("." .. sub(digits, 2)) or "")
  return format("%se%s%02d", sign .. mant, e < 0 and "-" or "+", e < 0 and -e or e)
end

-- Code points Python's str.isprintable() rejects beyond ASCII (controls, separators,
-- format and private-use characters: the common ones; see the module notes).
local function py_printable(cp)
  if cp <= 0xA0 or cp == 0xAD or cp == 0x1680 or (cp >= 0x2000 and cp <= 0x200F) then return false end
  if (cp >= 0x2028 and cp <= 0x202F) or (cp >= 0x205F and cp <= 0x206F) or cp == 0x3000 then return false end
  if cp == 0xFEFF or (cp >= 0xE000 and cp <= 0xF8FF) or (cp >= 0xFFF9 and cp <= 0xFFFB) then return false end
  if cp == 0xFFFE or cp == 0xFFFF or cp >= 0xF0000 then return false end
  return true
end

-- repr(str) as Python prints it.
local function py_repr_str(s)
  local q = (find(s, "'", 1, true) and not find(s, '"', 1, true)) and '"' or "'"
  local out, o, i, n = {}, 0, 1, #s
  while i <= n do
    local len = utf8_seq(s, i)
    if len == 0 then len = 1 end -- not reached for decoded input
    local cp = utf8_decode_at(s, i, len)
    local piece
    if cp == 92 then piece = "\\\\"
    elseif cp == byte(q) then piece = "\\" .. q
    elseif cp == 9 then piece = "\\t"
    elseif cp == 10 then piece = "\\n"
    elseif cp == 13 then piece = "\\r"
    elseif cp < 32 or cp == 127 then piece = format("\\x%02x", cp)
    elseif cp < 128 or py_printable(cp) then piece = sub(s, i, i + len - 1)
    elseif cp <= 0xFF then piece = format("\\x%02x", cp)
    elseif cp <= 0xFFFF then piece = format("\\u%04x", cp)
    else piece = format("\\U%08x", cp) end
    o = o + 1; out[o] = piece
    i = i + len
  end
  return q .. concat(out) .. q
end
M.py_repr_str = py_repr_str

local py_repr
-- str(v) of a decoded JSON value as Python prints it (for an error type that is not a string).
local function py_str(v)
  if type(v) == "string" then return v end
  return py_repr(v)
end
py_repr = function(v)
  local t = type(v)
  if t == "string" then return py_repr_str(v) end
  if t == "number" then return format("%d", v) end
  if t == "boolean" then return v and "True" or "False" end
  local mt = getmetatable(v)
  if mt == NULL_MT then return "None" end
  if mt == FLOAT then return py_float(v.v) end
  if mt == BIGINT then return v.lit end
  local out = {}
  if mt == ARRAY then
    for k = 1, v.n or 0 do out[k] = py_repr(v[k]) end
    return "[" .. concat(out, ", ") .. "]"
  end
  local keys = ORDER[v] or {}
  for k = 1, #keys do out[k] = py_repr_str(keys[k]) .. ": " .. py_repr(v[keys[k]]) end
  return "{" .. concat(out, ", ") .. "}"
end
M.py_str = py_str

---------------------------------------------------------------------------- meter results

local function new_usage() return { input_tokens = 0, output_tokens = 0, cache_creation_input_tokens = 0,
  cache_read_input_tokens = 0, cache_creation_5m_input_tokens = 0, cache_creation_1h_input_tokens = 0 } end

-- Usage.update: take the non-negative integer counters present; true if any changed.
local function usage_update(usage, u)
  if not is_object(u) then return false end
  local changed = false
  for k = 1, NFIELDS do
    local f = FIELDS[k]
    local v = count_of(u[f])
    if v and usage[f] ~= v then usage[f] = v; changed = true end
  end
  local split = u.cache_creation
  if is_object(split) then
    for k = 1, #SPLIT do
      local v = count_of(split[SPLIT_SOURCE[k]])
      if v and usage[SPLIT[k]] ~= v then usage[SPLIT[k]] = v; changed = true end
    end
  end
  return changed
end

local function new_result()
  return { usage = new_usage(), billable = false, complete = false, error = nil, started = false, final = false,
    est_bytes = 0, est_deltas = 0, problem = nil }
end

local function est_tokens(r)
  return max(ceil(r.est_bytes / M.BYTES_PER_TOKEN), r.est_deltas)
end

---------------------------------------------------------------------------- assess

-- An assessment: { status = UsageStatus value, usage = counts table or nil (unknown), note = string }.
local function copy_usage(u)
  return { input_tokens = u.input_tokens, output_tokens = u.output_tokens,
    cache_creation_input_tokens = u.cache_creation_input_tokens, cache_read_input_tokens = u.cache_read_input_tokens,
    cache_creation_5m_input_tokens = u.cache_creation_5m_input_tokens,
    cache_creation_1h_input_tokens = u.cache_creation_1h_input_tokens }
end
local function not_billable(note) return { status = "not_billable", usage = new_usage(), note = note } end
local function unknown(note) return { status = "unknown", usage = nil, note = note } end
M.not_billable, M.unknown = not_billable, unknown

-- router.usage.assess: `ended` false means "if nothing more arrives".
local function assess(r, streaming, ended)
  local cut = ended and "the reply ended" or "the reply did not finish"
  if r.problem then return unknown(r.problem) end
  if not streaming then
    if not r.complete then
      return unknown(cut .. " before its JSON body was complete; usage unreadable")
    end
    if r.billable then return { status = "complete", usage = copy_usage(r.usage), note = "" } end
    if r.error then return not_billable("provider error body (" .. r.error .. ") carries no usage") end
    return not_billable("reply is not a Message and bills no tokens (e.g. count_tokens)")
  end
  if r.final then
    if r.complete then return { status = "complete", usage = copy_usage(r.usage), note = "" } end
    local why = r.error and ("provider error event " .. r.error) or "no message_stop"
    return { status = "partial", usage = copy_usage(r.usage),
      note = cut .. " before it was complete (" .. why .. "); the provider's last cumulative count is used" }
  end
  if r.started then
    local counts = copy_usage(r.usage)
    counts.output_tokens = max(r.usage.output_tokens, est_tokens(r))
    local why = r.error and ("provider error event " .. r.error) or "cut off"
    return { status = "estimated", usage = counts, note = format(
      "%s before its final usage (%s); input and cache counts are the provider's, output estimated from " ..
      "%d streamed deltas (%d UTF-8 bytes, %d bytes per token)", cut, why, r.est_deltas, r.est_bytes,
      M.BYTES_PER_TOKEN) }
  end
  if r.complete then return unknown("stream carried no usage") end
  if r.error then return unknown("stream ended with provider error event " .. r.error .. " before message_start") end
  return unknown(cut .. " before message_start; no usage read")
end
M.assess = assess

local function same_assessment(a, b)
  if a == nil or b == nil then return false end
  if a.status ~= b.status or a.note ~= b.note then return false end
  local ua, ub = a.usage, b.usage
  if ua == nil or ub == nil then return ua == ub end
  for k = 1, NPUBLISHED do if ua[PUBLISHED[k]] ~= ub[PUBLISHED[k]] then return false end end
  return true
end
M.same_assessment = same_assessment

-- The error type an error body or event names, as Python's str() of it would read
-- (router/usage.py); `text` is the JSON it came from, decoded again in key order when
-- the type is an object (key order matters to Python's repr).
local function error_type(err, text)
  local t = err.type
  if not truthy(t) then return "error" end
  if type(t) == "table" and getmetatable(t) ~= FLOAT and getmetatable(t) ~= BIGINT then
    local _, again = json_decode(text, true)
    t = again.error.type
  end
  return py_str(t)
end

---------------------------------------------------------------------------- JSON meter

local JsonMeter = {}
JsonMeter.__index = JsonMeter

function M.json_meter()
  return setmetatable({ result = new_result(), parts = {}, n = 0, size = 0, overflow = false }, JsonMeter)
end

function JsonMeter:feed(chunk)
  if not self.overflow then
    if self.size + #chunk > M.MAX_JSON_BYTES then
      self.overflow = true
      self.parts, self.n, self.size = {}, 0, 0
      self.result.problem = format("JSON reply larger than %d bytes; usage not metered", M.MAX_JSON_BYTES)
    else
      self.n = self.n + 1
      self.parts[self.n] = chunk
      self.size = self.size + #chunk
    end
  end
  return false
end

function JsonMeter:finish()
  local r = self.result
  if self.overflow or r.complete or r.problem then return r end
  local body = concat(self.parts)
  self.parts, self.n, self.size = {}, 0, 0
  local ok, doc = json_decode(body)
  if not ok then
    r.problem = "reply body is not valid JSON; usage unreadable"
    return r
  end
  r.complete = true
  if not is_object(doc) then return r end
  -- Only a Message bills tokens; {"input_tokens": N} from count_tokens does not.
  local kind = doc.type
  if kind == "message" then
    usage_update(r.usage, doc.usage)
    r.billable = is_object(doc.usage)
  elseif kind == "error" and is_object(doc.error) then
    r.error = error_type(doc.error, body)
  end
  return r
end

---------------------------------------------------------------------------- SSE meter

local SseMeter = {}
SseMeter.__index = SseMeter

-- Events that can carry usage, output to estimate, or end the stream.
local USEFUL_EVENTS = { message_start = true, message_delta = true, message_stop = true, error = true,
  content_block_delta = true }
-- The streamed output of each delta type (signatures and citations bill no output of their own).
local DELTA_TEXT = { text_delta = "text", thinking_delta = "thinking", input_json_delta = "partial_json" }

-- {"type":"content_block_delta","index":N,"delta":{"type":"T","F":"TEXT"}}: T, F, TEXT (TEXT still
-- to be checked for quotes, escapes and control characters). N: no leading zero, and short
-- enough to be an integer to orjson.
local DELTA_PATTERN = '^{"type":"content_block_delta","index":(%d+),"delta":{"type":"([%w_]+)","([%w_]+)":"(.*)"}}$'
local match = string.match
local function delta_match(payload)
  local index, dtype, field, text = match(payload, DELTA_PATTERN)
  if not index or #index > 18 or (#index > 1 and byte(index, 1) == 48) then return nil end
  return dtype, field, text
end

function M.sse_meter()
  -- buf: unterminated tail; parts: chunks without any line end, appended after buf.
  return setmetatable({ result = new_result(), buf = "", parts = {}, nparts = 0, size = 0, event = "", data = {},
    ndata = 0, skip_line = false }, SseMeter)
end

function SseMeter:dispatch()
  local event, ndata = self.event, self.ndata
  self.event = ""
  if ndata == 0 then return false end
  local data = self.data
  self.data, self.ndata = {}, 0
  if event ~= "" and not USEFUL_EVENTS[event] then return false end
  local payload = ndata == 1 and data[1] or concat(data, "\n", 1, ndata)
  if event == "" and not find(payload, '"message_', 1, true) and not find(payload, '"error"', 1, true)
      and not find(payload, '"content_block_delta"', 1, true) then
    return false
  end
  local r = self.result
  -- The bulk of a stream: a delta in the provider's compact form. When its text needs no
  -- unescaping it is counted without decoding the event (the same result as decoding it).
  local dtype, field, text = delta_match(payload)
  if dtype then
    if (printable_ascii(text) or (not find(text, "[%z\1-\31]") and utf8_valid(text)))
        and not find(text, '"', 1, true) and not find(text, "\\", 1, true) then
      if text ~= "" and DELTA_TEXT[dtype] == field then
        r.est_bytes = r.est_bytes + #text
        r.est_deltas = r.est_deltas + 1
        return true
      end
      return false
    end
  end
  local ok, doc = json_decode(payload)
  if not ok or not is_object(doc) then return false end
  local kind = doc.type
  if not truthy(kind) then kind = event end
  if kind == "content_block_delta" then
    local delta = doc.delta
    if not is_object(delta) then return false end
    local dt = delta.type
    local text = delta[(type(dt) == "string" and DELTA_TEXT[dt]) or ""]
    if type(text) ~= "string" or text == "" then return false end
    r.est_bytes = r.est_bytes + #text
    r.est_deltas = r.est_deltas + 1
    return true
  end
  if kind == "message_start" then
    local msg = doc.message
    local u = is_object(msg) and msg.usage or nil
    if is_object(u) then
      r.billable = true
      local changed = not r.started
      r.started = true
      return usage_update(r.usage, u) or changed
    end
    return false
  end
  if kind == "message_delta" then
    local u = doc.usage
    if is_object(u) then
      r.billable = true
      local changed = not r.final
      -- output_tokens is cumulative; input/cache counts, when present, are final.
      r.final = is_int(u.output_tokens)
      return usage_update(r.usage, u) or changed
    end
    return false
  end
  if kind == "message_stop" then
    r.complete = true
  elseif kind == "error" then
    local err = doc.error
    r.error = is_object(err) and error_type(err, payload) or "error"
  end
  return false
end

function SseMeter:line(l)
  if l == "" then return self:dispatch() end
  if byte(l, 1) == 58 then return false end -- comment / keep-alive
  local c = find(l, ":", 1, true)
  local name, value
  if c then
    name = sub(l, 1, c - 1)
    value = byte(l, c + 1) == 32 and sub(l, c + 2) or sub(l, c + 1)
  else
    name, value = l, ""
  end
  if name == "data" then
    self.ndata = self.ndata + 1
    self.data[self.ndata] = value
  elseif name == "event" then
    self.event = value
  end
  return false
end

-- Complete lines of buf; a CR at the very end may be half a CRLF unless `final`.
function SseMeter:drain(final)
  local buf = self.buf
  local changed, pos, n = false, 1, #buf
  -- Without any CR (the usual stream) a plain search for LF is enough, and LuaJIT compiles it.
  local lf_only = not find(buf, "\r", 1, true)
  while true do
    local s
    if lf_only then s = find(buf, "\n", pos, true) else s = find(buf, "[\r\n]", pos) end
    if not s then break end
    local e = s
    if byte(buf, s) == 13 then
      if byte(buf, s + 1) == 10 then e = s + 1
      elseif s == n and not final then break end
    end
    if self.skip_line then
      self.skip_line = false
    else
      changed = self:line(sub(buf, pos, s - 1)) or changed
    end
    pos = e + 1
  end
  if pos > 1 then buf = sub(buf, pos) end
  if #buf > M.MAX_SSE_LINE_BYTES and not self.skip_line then self.skip_line = true end
  if self.skip_line then buf = "" end
  self.buf = buf
  return changed
end

function SseMeter:feed(chunk)
  local buf = self.buf
  if not find(chunk, "\n", 1, true) and not find(chunk, "\r", 1, true) and byte(buf, #buf) ~= 13 then
    -- No line ends here (a long line in pieces): keep the piece, join once a line ends.
    if self.skip_line then return false end
    local size = self.size + #chunk
    if #buf + size > M.MAX_SSE_LINE_BYTES then
      self.skip_line = true
      self.buf, self.parts, self.nparts, self.size = "", {}, 0, 0
      return false
    end
    self.nparts = self.nparts + 1
    self.parts[self.nparts] = chunk
    self.size = size
    return false
  end
  if self.nparts > 0 then
    self.parts[self.nparts + 1] = chunk
    buf = buf .. concat(self.parts, "", 1, self.nparts + 1)
    self.parts, self.nparts, self.size = {}, 0, 0
  elseif buf == "" then
    buf = chunk
  else
    buf = buf .. chunk
  end
  self.buf = buf
  return self:drain(false)
end

function SseMeter:finish()
  if self.nparts > 0 then
    self.buf = self.buf .. concat(self.parts, "", 1, self.nparts)
    self.parts, self.nparts, self.size = {}, 0, 0
  end
  self:drain(true)
  if self.buf ~= "" and not self.skip_line then self:line(self.buf) end
  self.buf = ""
  -- A stream cut off without its blank line still dispatches what it had.
  self:dispatch()
  return self.result
end

---------------------------------------------------------------------------- headers

-- What Python's str.strip() removes (str.isspace), as UTF-8.
local SPACES = { "\t", "\n", "\v", "\f", "\r", "\28", "\29", "\30", "\31", " ", "\194\133", "\194\160",
  "\225\154\128", "\226\128\168", "\226\128\169", "\226\128\175", "\226\129\159", "\227\128\128" }
for cp = 0x2000, 0x200A do SPACES[#SPACES + 1] = utf8_encode(cp) end

local function py_strip(s)
  local changed = true
  while changed and s ~= "" do
    changed = false
    for k = 1, #SPACES do
      local sp = SPACES[k]
      if sub(s, 1, #sp) == sp then s = sub(s, #sp + 1); changed = true end
      if s ~= "" and sub(s, -#sp) == sp then s = sub(s, 1, -#sp - 1); changed = true end
    end
  end
  return s
end
M.py_strip = py_strip

-- router.usage.media_type (header values decoded as the adapter decodes them).
local function media_type(ctype)
  local v = utf8_replace(ctype or "")
  local semi = find(v, ";", 1, true)
  if semi then v = sub(v, 1, semi - 1) end
  return lower(py_strip(v))
end
M.media_type = media_type

-- router.usage.content_codings, joined with ",".
local function content_codings(cenc)
  local v = utf8_replace(cenc or "")
  local out = {}
  for piece in (v .. ","):gmatch("([^,]*),") do
    local c = py_strip(piece)
    if c ~= "" and c ~= "identity" then out[#out + 1] = lower(c) end
  end
  return concat(out, ",")
end
M.content_codings = content_codings

-- What the adapter decides at the response headers: an assessment and whether a body
-- matters to it (a bodiless reply is not_billable), or a meter to feed.
-- Returns kind ("done" | "unless_body" | "meter"), assessment, meter, streaming.
function M.plan(status, ctype, cenc)
  if status >= 400 then
    return "done", not_billable(format("provider replied %d; error replies bill no tokens", status))
  end
  local mt = media_type(ctype)
  local streaming = mt == "text/event-stream"
  if mt ~= "application/json" and not streaming then
    return "unless_body", not_billable("reply of type " .. (mt ~= "" and mt or "none") .. " carries no usage")
  end
  local codings = content_codings(cenc)
  if codings ~= "" then
    return "unless_body", unknown("provider replied with content-encoding " .. py_repr_str(codings) ..
      ", which the meter cannot read")
  end
  local meter = streaming and M.sse_meter() or M.json_meter()
  return "meter", assess(meter.result, streaming, false), meter, streaming
end

function M.no_body(status)
  return not_billable(format("provider replied %d with no body", status))
end

-- Python's int() of the :status value, 0 when it is not one.
function M.status_code(v)
  if type(v) ~= "string" then return 0 end
  local d = py_strip(v)
  if find(d, "^[+-]?%d+$") then return tonumber(d) + 0 end
  return 0
end

---------------------------------------------------------------------------- Envoy glue

local METER_FAILED = "the usage meter failed on this reply (see the Envoy log)"

-- Publish `a` into ccr.usage. Envoy merges each set into the namespace; `last` holds
-- what this attempt published, so only what changed is set, and the first publication
-- of an attempt sets every field (over an earlier attempt's). nil becomes null_value.
-- The metadata object is fetched for every publication: Envoy's Lua wrappers die when
-- the script yields (between body chunks), so one kept from the headers would fail.
local function publish(handle, last, a)
  if last.status ~= nil and same_assessment(last, a) then return end
  local first = last.status == nil
  last.status = nil -- until every set below went through
  local md = handle:streamInfo():dynamicMetadata()
  local u = a.usage
  for k = 1, NPUBLISHED do
    local f = PUBLISHED[k]
    local v = u and u[f] or nil
    if first or last[f] ~= v then md:set(M.USAGE_NS, f, v) end
    last[f] = v
  end
  if first or last.kind ~= a.status then md:set(M.USAGE_NS, M.USAGE_STATUS, a.status) end
  -- Envoy copies a string value up to its first NUL; the audit log shows NUL as U+FFFD.
  if first or last.note ~= a.note then md:set(M.USAGE_NS, M.USAGE_NOTE, (a.note:gsub("%z", "\239\191\189"))) end
  last.kind, last.note, last.usage = a.status, a.note, u and copy_usage(u) or nil
  last.status = a.status
end
M.publish = publish

local function log_warn(handle, msg)
  pcall(handle.logWarn, handle, "ccr usage meter: " .. msg)
end

-- Metering must never break the reply: on any error, say so in ccr.usage and stop.
local function failed(handle, last, err)
  log_warn(handle, tostring(err))
  last.status = nil
  pcall(publish, handle, last, unknown(METER_FAILED))
end

-- The reply of a capture-enabled attempt (extauth's x-ccr-capture, seen by on_request): its bytes
-- as they pass, at most `max`, published base64-encoded in ccr.capture at the end.
local function capture_of(handle)
  if not M.CAPTURE_ENABLED then return nil end
  local cap = handle:streamInfo():dynamicMetadata():get(M.CAPTURE_NS)
  if cap == nil or cap.max == nil then return nil end
  return { max = cap.max, parts = {}, n = 0, kept = 0, total = 0 }
end

local function capture_chunk(c, s)
  local len = #s
  c.total = c.total + len
  if c.kept < c.max and len > 0 then
    if c.kept + len > c.max then s = sub(s, 1, c.max - c.kept) end
    c.n = c.n + 1
    c.parts[c.n] = s
    c.kept = c.kept + #s
  end
end

local function capture_publish(handle, c)
  local md = handle:streamInfo():dynamicMetadata()
  md:set(M.CAPTURE_NS, "response", handle:base64Escape(concat(c.parts)))
  md:set(M.CAPTURE_NS, "response_bytes", c.total)
  md:set(M.CAPTURE_NS, "response_truncated", c.total > c.kept)
end

function M.on_response(handle)
  local cap = capture_of(handle)
  if cap ~= nil then
    -- Whatever the meter does with the reply, the capture sees all of it and says so at the end.
    -- metered_response handles its own errors; bodyChunks() can be called once per reply, so the
    -- capture reads the body here only when the meter returned before reading it.
    if not M.metered_response(handle, cap) then
      for chunk in handle:bodyChunks() do capture_chunk(cap, chunk:getBytes(0, chunk:length())) end
    end
    return capture_publish(handle, cap)
  end
  return M.metered_response(handle)
end

-- `cap`, when given, gets every chunk of the body: the loop then reads to the end even when the
-- meter has no (more) use for it. Returns true when it read the body, nil when it returned before.
function M.metered_response(handle, cap)
  local last = {}
  local ok, kind, meter, streaming, status = pcall(function()
    local h = handle:headers()
    local st = M.status_code(h:get(":status"))
    local k, a0, m, s = M.plan(st, h:get("content-type"), h:get("content-encoding"))
    publish(handle, last, a0)
    return k, m, s, st
  end)
  if not ok then return failed(handle, last, kind) end
  if kind == "done" then return end
  local chunks = 0
  -- bodyChunks() hands over each data frame as Envoy passes it on (no buffering); the
  -- script yields in between.
  local broken = false
  for chunk in handle:bodyChunks() do
    chunks = chunks + 1
    if not meter and not cap then break end -- a body, but nothing to read in it
    local bytes = chunk:getBytes(0, chunk:length())
    if cap then capture_chunk(cap, bytes) end
    if meter and not broken then
      local fed, err = pcall(function()
        if meter:feed(bytes) then
          -- Publish as soon as usage or the output estimate moves, so an aborted
          -- attempt is still charged for what was generated.
          publish(handle, last, assess(meter.result, streaming, false))
        end
      end)
      if not fed then
        failed(handle, last, err)
        if not cap then return true end
        broken = true -- metering stops; the capture reads on
      end
    end
  end
  if broken then return true end
  local done, err = pcall(function()
    if chunks == 0 then return publish(handle, last, M.no_body(status)) end
    if not meter then return end
    local fin, result = pcall(meter.finish, meter)
    if not fin then log_warn(handle, tostring(result)); result = meter.result end
    -- The end of a reply always says where it ended up.
    last.status = nil
    publish(handle, last, assess(result, streaming, true))
  end)
  if not done then failed(handle, last, err) end
  return true
end

-- The error body a refused attempt gets (ccr/errors.py shape).
M.HYGIENE_FAILED = '{"type":"error","error":{"type":"api_error","message":' ..
  '"the gateway could not prepare this request for the provider"}}'

-- Header hygiene for the provider: the client's credentials and the gateway's x-ccr-*
-- headers never leave; the reply is asked for unencoded so that it can be metered.
-- Returns the value of x-ccr-capture when there was one (extauth's: clients' are stripped earlier).
function M.clean_request_headers(h)
  local drop, n = {}, 0
  local prefix, plen = M.CCR_HEADER_PREFIX, #M.CCR_HEADER_PREFIX
  local capture
  for name, value in pairs(h) do -- iterate to the end: Envoy forbids changes while an iterator is open
    local k = lower(name)
    if k == "authorization" or k == "x-api-key" or sub(k, 1, plen) == prefix then
      n = n + 1; drop[n] = name
      if k == M.H_CAPTURE then capture = value end
    end
  end
  for i = 1, n do h:remove(drop[i]) end
  h:replace("accept-encoding", "identity")
  return capture
end

function M.on_request(handle)
  local ok, err = pcall(M.clean_request_headers, handle:headers())
  if ok and err ~= nil and M.CAPTURE_ENABLED then
    local max = tonumber(err)
    if max ~= nil and max > 0 then
      -- Per attempt: a retry starts its capture over (the last attempt's reply is what the client got).
      local md = handle:streamInfo():dynamicMetadata()
      md:set(M.CAPTURE_NS, "max", max)
      md:set(M.CAPTURE_NS, "response", "")
      md:set(M.CAPTURE_NS, "response_bytes", 0)
      md:set(M.CAPTURE_NS, "response_truncated", false)
    end
  end
  if not ok then
    -- Never forward a request whose credentials may still be on it.
    log_warn(handle, "request header hygiene failed: " .. tostring(err))
    handle:respond({ [":status"] = "500", ["content-type"] = "application/json" }, M.HYGIENE_FAILED)
  end
end

function envoy_on_request(request_handle) -- luacheck: ignore 111
  M.on_request(request_handle)
end

function envoy_on_response(response_handle) -- luacheck: ignore 111
  M.on_response(response_handle)
end

return M
