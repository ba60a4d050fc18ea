-- The client's request headers for every attempt of a failover chain (router/failover.py), run first
-- among the chain cluster's UPSTREAM filters.
--
-- Envoy's retries share one request header map: what an attempt's upstream filters change stays for
-- the next attempt. A translating attempt (the adapter: Bedrock, Vertex, OpenAI-compatible) rewrites
-- :path, content-length and content-type, adds SigV4 or bearer headers and drops anthropic-version, so
-- without this the next target would get the previous target's request. The body needs nothing:
-- Envoy hands each attempt its own copy of the client's buffered body.
--
-- The first attempt saves the headers as they left the downstream filters (after extauth) in dynamic
-- metadata of the request (upstream filters share the downstream stream info); every later attempt
-- puts exactly those back: changed ones reset, added ones removed, removed ones restored. Left to Envoy:
-- the other pseudo-headers (:authority is set per attempt from the endpoint) and x-envoy-* (set by
-- the router per attempt). Credentials and x-ccr-* are neither saved nor put back: the chain's hygiene
-- step after this drops them on the first attempt, so no later attempt has them either.

local NS = "ccr.chain.request" -- ccr.contract.CHAIN_REQUEST_NS

-- Never saved (the chain's hygiene step drops them from every attempt anyway): the client's credentials and
-- the gateway's x-ccr-* headers. Dynamic metadata reaches the access log, and a gateway key must not.
local SECRET = { ["authorization"] = true, ["x-api-key"] = true, ["proxy-authorization"] = true }

local function kept(name)
  if name == ":path" or name == ":method" then return true end
  local first = string.sub(name, 1, 1)
  return first ~= ":" and string.sub(name, 1, 8) ~= "x-envoy-" and string.sub(name, 1, 6) ~= "x-ccr-"
    and not SECRET[name]
end

function envoy_on_request(handle) -- luacheck: ignore 111
  local headers = handle:headers()
  local md = handle:streamInfo():dynamicMetadata()
  local saved = md:get(NS)
  if saved == nil then
    local snap = {}
    for name, value in pairs(headers) do
      if kept(name) then
        snap[name] = snap[name] and (snap[name] .. "," .. value) or value
      end
    end
    md:set(NS, "headers", snap)
    return
  end
  local snap = saved["headers"] or {}
  local extra, n = {}, 0
  for name, _ in pairs(headers) do -- to the end: Envoy forbids changes while an iterator is open
    if kept(name) and snap[name] == nil then
      n = n + 1
      extra[n] = name
    end
  end
  for i = 1, n do headers:remove(extra[i]) end
  for name, value in pairs(snap) do headers:replace(name, value) end
end
