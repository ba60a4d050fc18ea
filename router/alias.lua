-- Model aliases on the upstream, per attempt (extauth/aliases.py, ccr/routing.py `resolve`).
--
-- When a client named an alias, extauth's metadata says where its request names the model: the
-- byte span of the body's top-level "model" value (model_span), or the path to use (model_path,
-- Bedrock clients). This step puts the concrete id (`model`, always extauth's, never a client's)
-- there, so the provider receives the model the policy decided on; every other byte stays as the
-- client sent it. Each attempt gets its own copy of the body, so a failover attempt is rewritten too.
-- Requests without an alias pass untouched (one metadata lookup).

local NS = "envoy.filters.http.ext_authz"

function envoy_on_request(handle) -- luacheck: ignore 111
  local md = handle:streamInfo():dynamicMetadata():get(NS)
  if md == nil then
    return
  end
  local span, path, served = md["model_span"], md["model_path"], md["model"]
  if served == nil or (span == nil and path == nil) then
    return
  end
  if path ~= nil then
    handle:headers():replace(":path", path)
    return
  end
  local s, e = string.match(span, "^(%d+),(%d+)$")
  s, e = tonumber(s), tonumber(e)
  local body = handle:body()
  local raw = body:getBytes(0, body:length())
  local out = string.sub(raw, 1, s) .. '"' .. served .. '"' .. string.sub(raw, e + 1)
  body:setBytes(out)
  handle:headers():replace("content-length", tostring(#out))
end
