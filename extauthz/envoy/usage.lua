-- Envoy Lua filter on responses: the token counts a model call's response reports, as
-- dynamic metadata (namespace extauthz.usage) for the usage report that Envoy's gRPC
-- access log sends to the sidecar once the response has ended (usage/reports.py).
-- Chunks pass on as they come: nothing is buffered, nothing waits.
--
-- A JSON body (OpenAI, Anthropic, Responses API; Gemini's usageMetadata, also in the
-- array of objects its streamGenerateContent answers): the top-level object only. The
-- scan follows the JSON's nesting from one structural character to the next (strings
-- skipped as a whole), so a "usage" a client got echoed deeper in the body (the Responses
-- API echoes tools and schemas) is never read, and long runs of numbers (embeddings) are
-- passed over at the speed of string.find.
--
-- An event stream (OpenAI with stream_options.include_usage: its last chunk; Anthropic:
-- message_start, then message_delta): the last count of each name. A model's own text
-- is a JSON string in the stream, its quotes escaped, so it cannot spell a count.
--
-- AWS's event stream (Bedrock's invoke-with-response-stream): each message's payload is
-- {"bytes": "<base64>"}, the bytes an Anthropic stream event; each is decoded and read
-- as above.
local NAMESPACE = "extauthz.usage"
local FIELDS = {"prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                "cache_read_input_tokens", "cache_creation_input_tokens",
                -- Gemini's usageMetadata
                "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"}
-- The top-level member that holds them: "usage", or Gemini's "usageMetadata".
local USAGE_KEYS = {usage = true, usageMetadata = true}
local OVERLAP = 96        -- bytes of an event stream kept across chunks: a count split in two is read whole
local USAGE_MAX = 4096    -- bytes of a usage object kept (they are a few hundred)
local KEY_MAX = 16        -- a top-level key longer than this is not "usage"
-- How long the end of a response waits for the sidecar to free its place: past this the
-- response goes on, and a client's next request may find the place still taken (429).
-- A busy 2-core host was seen to take more than 250 ms.
local RELEASE_TIMEOUT_MS = 2000

-- Base64 (RFC 4648), for the payloads of AWS's event stream.
local B64 = {}
for i, c in ipairs({string.byte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", 1, 64)}) do
  B64[c] = i - 1
end
local B64_MAX = 65536     -- a payload longer than this is no usage event

local function unbase64(text)
  local out, n, bits, count = {}, 0, 0, 0
  for i = 1, #text do
    local v = B64[string.byte(text, i)]
    if v ~= nil then
      bits, count = bits * 64 + v, count + 1
      if count == 4 then
        n = n + 1
        out[n] = string.char(math.floor(bits / 65536), math.floor(bits / 256) % 256, bits % 256)
        bits, count = 0, 0
      end
    end
  end
  if count == 3 then
    n = n + 1
    out[n] = string.char(math.floor(bits / 1024), math.floor(bits / 4) % 256)
  elseif count == 2 then
    n = n + 1
    out[n] = string.char(math.floor(bits / 16))
  end
  return table.concat(out)
end

local function counts(text, found, last_wins)
  for _, name in ipairs(FIELDS) do
    for value in string.gmatch(text, "\"" .. name .. "\"%s*:%s*(%d+)") do
      if last_wins or found[name] == nil then
        found[name] = value
      end
    end
  end
end

-- The JSON scan's state across chunks.
local function json_state()
  -- top: the depth of the top-level object's members (1; 2 in a top-level array).
  return {depth = 0, top = nil, in_string = false, escaped = false, key = nil, last_key = nil,
          want_object = false, capturing = false, pieces = {}, size = 0, usage = nil}
end

local function keep(state, piece)
  if state.size + #piece <= USAGE_MAX then
    state.pieces[#state.pieces + 1] = piece
    state.size = state.size + #piece
  end
end

local function scan_json(state, text)
  local pos, n = 1, #text
  local key_from = 1           -- where the top-level string being read started, in this chunk
  local capture_from = 1       -- where the usage object being captured started, in this chunk
  while pos <= n do
    if state.in_string then
      if state.escaped then
        state.escaped = false
        pos = pos + 1
      else
        local i = string.find(text, "[\"\\]", pos)
        if i == nil then
          if state.key then
            state.key = state.key .. string.sub(text, key_from)
            if #state.key > KEY_MAX then state.key = nil end
          end
          pos = n + 1
        elseif string.byte(text, i) == 92 then  -- a backslash: the next byte is escaped
          state.key = nil                       -- "usage" has no escape in it
          state.escaped = true
          pos = i + 1
        else                                    -- the closing quote
          if state.key then
            state.last_key = state.key .. string.sub(text, key_from, i - 1)
          end
          state.key = nil
          state.in_string = false
          pos = i + 1
        end
      end
    else
      local i = string.find(text, "[{}%[%]\":]", pos)
      if i == nil then
        pos = n + 1
      else
        local c = string.sub(text, i, i)
        if c == "{" or c == "[" then
          if state.top == nil then
            state.top = (c == "[") and 2 or 1
          end
          if c == "{" and state.want_object and state.depth == state.top then
            state.capturing = true
            state.pieces, state.size = {}, 0   -- the last one counts (Gemini's stream: cumulative)
            capture_from = i
          end
          state.depth = state.depth + 1
        elseif c == "}" or c == "]" then
          state.depth = state.depth - 1
          if state.capturing and state.depth == state.top then
            keep(state, string.sub(text, capture_from, i))
            state.capturing = false
            state.usage = table.concat(state.pieces)
          end
        elseif c == ":" then
          if state.depth == state.top and USAGE_KEYS[state.last_key] then
            state.want_object = true
            state.last_key = nil
            pos = i + 1
            goto continue
          end
        else  -- a string starts: at the top level it may be a key
          state.in_string = true
          state.last_key = nil
          if state.depth == state.top and not state.capturing then
            state.key = ""
            key_from = i + 1
          end
        end
        state.want_object = false   -- "usage" must be followed by ':' and '{', nothing between
        state.last_key = nil
        pos = i + 1
      end
    end
    ::continue::
  end
  if state.capturing then
    keep(state, string.sub(text, capture_from))
  end
end

-- A call of a caller with max_parallel_requests holds a place until it ends: the sidecar
-- is told before the response's last byte goes on, so a client that sends its next
-- request at once finds the place free (the usage report, a moment later, would not).
local function release(handle)
  local decision = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.ext_authz")
  if decision == nil or decision["inflight"] ~= "1" or decision["usage_id"] == nil then
    return
  end
  handle:httpCall("extauthz_admin", {
    [":method"] = "POST", [":path"] = "/internal/usage/release", [":authority"] = "extauthz",
    ["x-usage-id"] = decision["usage_id"], ["x-key-id"] = decision["key_id"] or "",
    ["x-team-id"] = decision["team_id"] or ""}, "", RELEASE_TIMEOUT_MS)
end

-- AWS's event stream: the complete {"bytes":"…"} payloads in text, decoded and read;
-- returns what follows the last one (an unfinished payload, kept for the next chunk).
local function scan_aws(text, found)
  local from, rest = 1, nil
  while true do
    local s, e, payload = string.find(text, "\"bytes\"%s*:%s*\"([A-Za-z0-9+/=]*)\"", from)
    if s == nil then break end
    if #payload <= B64_MAX then
      local event = unbase64(payload)
      if string.find(event, "oken", 1, true) then
        counts(event, found, true)
      end
    end
    from = e + 1
  end
  rest = string.sub(text, from)
  if #rest > B64_MAX + 64 then rest = string.sub(rest, -(B64_MAX + 64)) end
  return rest
end

function envoy_on_response(handle)
  local content_type = string.lower(handle:headers():get("content-type") or "")
  local json = string.find(content_type, "application/json", 1, true) == 1
  local stream = string.find(content_type, "text/event-stream", 1, true) == 1
  local aws = string.find(content_type, "application/vnd.amazon.eventstream", 1, true) == 1
  if not json and not stream and not aws then
    for _ in handle:bodyChunks() do end  -- to the end, then free the place
    release(handle)
    return
  end
  local found = {}
  local state, tail = json_state(), ""
  for chunk in handle:bodyChunks() do
    local text = chunk:getBytes(0, chunk:length())
    if json then
      scan_json(state, text)
    elseif aws then
      tail = scan_aws(tail .. text, found)
    else
      text = tail .. text
      if string.find(text, "oken", 1, true) then  -- "_tokens", "TokenCount": no count without it
        counts(text, found, true)
      end
      tail = string.sub(text, -OVERLAP)
    end
  end
  release(handle)
  if json and state.usage then
    counts(state.usage, found, false)
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  for name, value in pairs(found) do
    metadata:set(NAMESPACE, name, tonumber(value))
  end
end
