-- Body capture for the audit trail (docs/audit.md "Bodies"), run by Envoy's Lua filter as the
-- FIRST upstream HTTP filter of the adapter's clusters (translate, objects), and only when
-- audit.bodies names someone (router/resources.py adds it then; otherwise it is not in the chain).
-- The Messages and failover clusters capture in their usage meter (router/meter.lua) instead.
--
-- extauth sets x-ccr-capture (value: the most bytes to keep) on the requests whose principal or
-- tenant audit.bodies names; a client cannot send it (x-ccr-* is stripped before ext_authz). For
-- those, the reply body as it leaves for the client (after the adapter's translation, since this
-- filter is first) is copied, never held or changed (bodyChunks() does not buffer), and published
-- base64-encoded in dynamic metadata namespace ccr.capture for the access-log receiver, which
-- encrypts it. Every other request costs one header lookup and one metadata lookup (on a
-- path that already pays the adapter's gRPC round trips).

local CAPTURE_NS = "ccr.capture"
local H_CAPTURE = "x-ccr-capture"
local concat = table.concat

function envoy_on_request(handle) -- luacheck: ignore 111
  local v = handle:headers():get(H_CAPTURE)
  if v == nil then return end
  local max = tonumber(v)
  if max ~= nil and max > 0 then
    -- Per attempt: a retry starts its capture over (the last attempt's reply is what the client got).
    local md = handle:streamInfo():dynamicMetadata()
    md:set(CAPTURE_NS, "max", max)
    md:set(CAPTURE_NS, "response", "")
    md:set(CAPTURE_NS, "response_bytes", 0)
    md:set(CAPTURE_NS, "response_truncated", false)
  end
end

function envoy_on_response(handle) -- luacheck: ignore 111
  local cap = handle:streamInfo():dynamicMetadata():get(CAPTURE_NS)
  if cap == nil or cap.max == nil then return end
  local max = cap.max
  local parts, n, kept, total = {}, 0, 0, 0
  for chunk in handle:bodyChunks() do
    local len = chunk:length()
    total = total + len
    if kept < max and len > 0 then
      local take = len
      if kept + take > max then take = max - kept end
      n = n + 1
      parts[n] = chunk:getBytes(0, take)
      kept = kept + take
    end
  end
  -- Wrappers die when the script yields: fetch the metadata object again after the loop.
  local md = handle:streamInfo():dynamicMetadata()
  md:set(CAPTURE_NS, "response", handle:base64Escape(concat(parts)))
  md:set(CAPTURE_NS, "response_bytes", total)
  md:set(CAPTURE_NS, "response_truncated", total > kept)
end
