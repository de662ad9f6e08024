-- Envoy Lua filter, placed after ext_authz: writes the provider-side model name into
-- the JSON body by replacing the bytes of the top-level "model" value, and nothing else.
-- Every other byte reaches the provider as the client sent it.
--
-- The authorization service plans the change in the request header x-extauthz-splice
-- (set with overwrite on every allow, so a client's own value never survives):
--   "-"                                                   leave the body alone
--   "<body length> <start> <end> <original hex> <text>"   replace bytes [start, end)
-- where <original hex> is what those bytes were when checked and <text> the new JSON
-- string (or, with an empty span just inside "{", a whole "model" member to insert). Whatever does not match the plan refuses the request: forwarding the body
-- unchanged would send a model name that was not checked for this deployment.
local PLAN = "x-extauthz-splice"

local function refuse(handle, message)
  handle:respond(
    {[":status"] = "500", ["content-type"] = "application/json"},
    '{"error": {"message": "' .. message .. ' The request was not forwarded.", ' ..
    '"type": "api_error", "param": null, "code": "body_rewrite_failed"}}')
end

local function unhex(hex)
  return (hex:gsub("%x%x", function(pair) return string.char(tonumber(pair, 16)) end))
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local plan = headers:get(PLAN)
  if plan == nil then
    refuse(handle, "The authorization service sent no rewrite plan.")
    return
  end
  headers:remove(PLAN)
  if plan == "-" then
    return  -- no change: the body streams through without being buffered here
  end
  local length, first, last, original, token = plan:match("^(%d+) (%d+) (%d+) (%x*) (.+)$")
  if length == nil then
    refuse(handle, "The rewrite plan is malformed.")
    return
  end
  length, first, last = tonumber(length), tonumber(first), tonumber(last)
  local body = handle:body()
  if body == nil or body:length() ~= length or first > last or last > length then
    refuse(handle, "The request body is not the one that was checked.")
    return
  end
  local text = body:getBytes(0, length)
  if text:sub(first + 1, last) ~= unhex(original) then
    refuse(handle, "The request body is not the one that was checked.")
    return
  end
  body:setBytes(text:sub(1, first) .. token .. text:sub(last + 1))
end
