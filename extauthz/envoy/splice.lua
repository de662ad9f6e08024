-- Envoy Lua filter, placed after ext_authz: writes the provider-side model name into
-- the JSON body by replacing the bytes of the top-level "model" value, and nothing else.
-- Every other byte reaches the provider as the client sent it.
--
-- The authorization service plans the change in the request header x-extauthz-splice
-- (set with overwrite on every allow, so a client's own value never survives):
--   "-"                                                   leave the body alone
--   "<body length> <start> <end> <original hex> <text>"   replace bytes [start, end)
--   "<body length> * <start>,<end>,<original hex>,<text hex> ..."   several such edits
-- where <original hex> is what those bytes were when checked and <text> the new JSON
-- string (or, with an empty span just inside "{", a whole "model" member to insert);
-- several edits (Bedrock's invoke body) come in order, none overlapping, texts in hex. Whatever does not match the plan refuses the request: forwarding the body
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

-- Several edits: each span checked against the body as it was checked, applied together.
function splice_many(handle, length, edits)
  local spans, seen = {}, {}
  local previous_end = 0
  for edit in edits:gmatch("[^ ]+") do
    seen[#seen + 1] = edit
    local first, last, original, token = edit:match("^(%d+),(%d+),(%x*),(%x*)$")
    if first == nil then
      refuse(handle, "The rewrite plan is malformed.")
      return
    end
    first, last = tonumber(first), tonumber(last)
    if first < previous_end or first > last or #original ~= 2 * (last - first) or #token % 2 ~= 0 then
      refuse(handle, "The rewrite plan is malformed.")
      return
    end
    previous_end = last
    spans[#spans + 1] = {first, last, unhex(original), unhex(token)}
  end
  if table.concat(seen, " ") ~= edits then
    refuse(handle, "The rewrite plan is malformed.")
    return
  end
  local body = handle:body()
  if #spans == 0 or body == nil or body:length() ~= length or previous_end > length then
    refuse(handle, "The request body is not the one that was checked.")
    return
  end
  local text = body:getBytes(0, length)
  local parts, at = {}, 0
  for _, span in ipairs(spans) do
    if text:sub(span[1] + 1, span[2]) ~= span[3] then
      refuse(handle, "The request body is not the one that was checked.")
      return
    end
    parts[#parts + 1] = text:sub(at + 1, span[1])
    parts[#parts + 1] = span[4]
    at = span[2]
  end
  parts[#parts + 1] = text:sub(at + 1)
  body:setBytes(table.concat(parts))
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
  local many_length, edits = plan:match("^(%d+) %* (.+)$")
  if many_length ~= nil then
    splice_many(handle, tonumber(many_length), edits)
    return
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
