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
-- message_start, then message_delta; the Responses API: response.completed; Gemini with
-- alt=sse): each "data:" line is one event's JSON, scanned the same way, its usage object
-- read where the API puts it (top level, or under "message" / "response"); the last
-- count of each name wins. The counts are written as they come, so a client that goes
-- away mid-stream still leaves what was reported until then.
--
-- A stream whose usage the gateway asked for and the client did not (the check's
-- usage_unasked): after its counts are read, each event loses what asking added, so the
-- client gets the events the provider sends a request that did not ask. OpenAI adds a
-- last chunk with no choices and the usage (dropped) and "usage": null to every other
-- chunk (taken out). Nothing is held but an unfinished "data: {" line and the usage chunk
-- until its event ends (see without_unasked).
--
-- AWS's event stream (Bedrock's invoke-with-response-stream): each message's payload is
-- {"bytes": "<base64>"}, the bytes of an Anthropic stream event, decoded and read as above.
local NAMESPACE = "extauthz.usage"
local FIELDS = {"prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
                "cache_read_input_tokens", "cache_creation_input_tokens",
                -- Gemini's usageMetadata
                "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"}
-- The top-level member that holds them: "usage", or Gemini's "usageMetadata"; or "usage"
-- one level down, in Anthropic's message_start ({"message": {"usage": …}}) and the
-- Responses API's events ({"response": {"usage": …}}). Nowhere else: a client's own JSON
-- echoed in a response (a tool's schema, Gemini's function arguments) is deeper.
local USAGE_KEYS = {usage = true, usageMetadata = true}
local PARENTS = {message = true, response = true}
local LINE_MAX = 65536    -- an event line longer than this is scanned as it comes, not held
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

-- A line longer than this is not edited (no usage chunk is that long): it passes on as
-- it comes.
local EDIT_MAX = 16384
local WANTED = {usage = true, choices = true}

-- The top-level members "usage" and "choices" of the JSON object a line holds, in one
-- pass: for each, where its name starts and its value's first and last bytes (the last
-- is nil when the line ends first).
local function top_members(text, from)
  local found, depth, pos = {}, 0, from
  local expect_key, key, key_start, member = false, nil, nil, nil
  local function close(at)                -- the member being read ends before ``at``
    if member ~= nil then
      local last = at - 1
      while last >= member.first and string.find(string.sub(text, last, last), "%s") do last = last - 1 end
      member.last = last
      member = nil
    end
  end
  while true do
    local i = string.find(text, "[{}%[%]\":,]", pos)
    if i == nil then return found end
    local c = string.byte(text, i)
    if c == 34 then                       -- a string, to its closing quote
      local j, k = i + 1, nil
      while true do
        k = string.find(text, "[\"\\]", j)
        if k == nil then return found end
        if string.byte(text, k) == 92 then j = k + 2 else break end
      end
      if depth == 1 and expect_key then
        key, key_start = string.sub(text, i + 1, k - 1), i
      end
      expect_key = false
      pos = k + 1
    else
      if c == 123 or c == 91 then         -- { [
        depth = depth + 1
        expect_key = depth == 1 and c == 123
      elseif c == 125 or c == 93 then     -- } ]
        if depth == 1 then close(i) end
        depth = depth - 1
        if depth == 0 then return found end
      elseif depth == 1 and c == 58 then  -- ':' after a top-level name
        if key ~= nil then
          member = {start = key_start, first = i + 1}
          if WANTED[key] then found[key] = member end
          while string.find(string.sub(text, member.first, member.first), "%s") do
            member.first = member.first + 1
          end
        end
        key = nil
      elseif depth == 1 and c == 44 then  -- ','
        close(i)
        expect_key = true
      end
      pos = i + 1
    end
  end
end

-- One complete line, less what asking added: "" for the usage chunk (a top-level usage
-- object, and no choices or none), else the line without its top-level "usage" member
-- (null, or the counts some servers put on the last chunk with choices).
local function unasked_removed(line)
  if #line > EDIT_MAX or not string.find(line, "\"usage\"", 1, true) then
    return line
  end
  local members = top_members(line, string.find(line, "{", 1, true))
  local usage, choices = members.usage, members.choices
  if usage == nil or usage.last == nil then
    return line
  end
  if string.sub(line, usage.first, usage.first) == "{" and (choices == nil or choices.last ~= nil
      and string.find(string.sub(line, choices.first, choices.last), "^%[%s*%]$")) then
    return ""
  end
  local s, e = usage.start, usage.last
  local before = string.match(string.sub(line, 1, s - 1), "()%s*,%s*$")
  if before then                                   -- ', "usage": null'
    return string.sub(line, 1, before - 1) .. string.sub(line, e + 1)
  end
  local after = string.match(line, "^%s*,%s*()", e + 1)
  return string.sub(line, 1, s - 1) .. string.sub(line, after or (e + 1))   -- '"usage": null, '
end

-- Whether a line (or the start of one) is, or may become, a "data:" line holding a JSON
-- object: only such a line can be the usage chunk or carry "usage": null.
local OBJECT_LINES = {"data: {", "data:{"}
local function object_line(text)
  for _, start in ipairs(OBJECT_LINES) do
    local n = math.min(#text, #start)
    if string.sub(text, 1, n) == string.sub(start, 1, n) then
      return true
    end
  end
  return false
end

-- Where the line starting at ``pos`` ends, its terminator included: "\n", "\r\n" or "\r"
-- (SSE's three), or nil. A "\r" last in ``buf`` ends its line too; the "\n" the next
-- chunk may start with is then the rest of that end (without_unasked's after_cr).
local function line_end(buf, pos)
  local i = string.find(buf, "[\r\n]", pos)
  if i ~= nil and string.byte(buf, i) == 13 and string.byte(buf, i + 1) == 10 then
    return i + 1
  end
  return i
end

local function blank(line)
  return line == "\n" or line == "\r\n" or line == "\r"
end

-- The stream's bytes to send on now, line by line. Held for the next chunk: an unfinished
-- line that may become a JSON "data:" line, and the usage chunk until the blank line that
-- makes it a whole event (then both are dropped; a usage line inside a longer event is
-- left as it came). Nothing else waits, so a stream that ends without a newline loses
-- only such a cut line, which an SSE reader would not dispatch either.
local function hide_state()
  -- after_cr: the last chunk ended with "\r", and what became of that line ("emit",
  -- "pending" or "drop"), for a "\n" this one may start with.
  return {carry = "", passing = false, pending = nil, event_start = true, after_cr = nil}
end

local function without_unasked(hs, text)
  local buf, out, n, pos = hs.carry .. text, {}, 0, 1
  hs.carry = ""
  local function emit(piece)
    n = n + 1
    out[n] = piece
  end
  if hs.after_cr ~= nil and string.byte(buf, 1) == 10 then
    if hs.after_cr == "emit" then
      emit("\n")
    elseif hs.after_cr == "pending" then
      hs.pending = hs.pending .. "\n"
    end
    pos = 2
  end
  hs.after_cr = nil
  while pos <= #buf do
    local e = line_end(buf, pos)
    if e == nil then                                 -- an unfinished line
      local tail = string.sub(buf, pos)
      if not hs.passing and #tail <= EDIT_MAX and object_line(tail) then
        hs.carry = tail
      else
        emit(tail)
        hs.passing = true
      end
      break
    end
    local line = string.sub(buf, pos, e)
    pos = e + 1
    local fate = "emit"
    if hs.passing then                               -- the end of a line passed on unread
      emit(line)
      hs.passing, hs.event_start = false, false
    else
      local held = hs.pending
      hs.pending = nil
      if held ~= nil and blank(line) then            -- the usage chunk, a whole event: dropped
        fate = "drop"
        hs.event_start = true
      else
        if held ~= nil then emit(held) end
        if blank(line) then
          emit(line)
          hs.event_start = true
        else
          local kept = object_line(line) and unasked_removed(line) or line
          if kept == "" and hs.event_start then
            hs.pending, fate = line, "pending"
          else
            emit(kept == "" and line or kept)
          end
          hs.event_start = false
        end
      end
    end
    if e == #buf and string.byte(buf, e) == 13 then
      hs.after_cr = fate
    end
  end
  return table.concat(out)
end

-- The counts in text, into found; true when one changed. One pass over the usage object,
-- every "name": number in it, the names kept those of FIELDS (the first of each, or with
-- last_wins the last).
local FIELD = {}
for _, name in ipairs(FIELDS) do FIELD[name] = true end
local function counts(text, found, last_wins)
  local changed = false
  for name, value in string.gmatch(text, "\"([%a_]+)\"%s*:%s*(%d+)") do
    if FIELD[name] and (last_wins or found[name] == nil) and found[name] ~= value then
      found[name] = value
      changed = true
    end
  end
  return changed
end

-- The counts so far, as the report's metadata. A stream's are written as they come (a
-- client that goes away before the end still leaves what was reported until then).
local function publish(handle, found)
  local metadata = handle:streamInfo():dynamicMetadata()
  for name, value in pairs(found) do
    metadata:set(NAMESPACE, name, tonumber(value))
  end
end

-- The JSON scan's state across chunks.
local function json_state()
  -- top: the depth of the top-level object's members (1; 2 in a top-level array).
  -- member: the top-level member whose value comes next; parent: the one whose object the
  -- scan is in (one level down).
  return {depth = 0, top = nil, in_string = false, escaped = false, key = nil, last_key = nil,
          want_object = false, capturing = false, capture_depth = nil, pieces = {}, size = 0, usage = nil,
          member = nil, parent = nil}
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
          local depth = state.depth
          if c == "{" and state.want_object then   -- only set where a usage object may be
            state.capturing, state.capture_depth = true, depth
            state.pieces, state.size = {}, 0   -- the last one counts (Gemini's stream: cumulative)
            capture_from = i
          elseif c == "{" and depth == state.top then
            state.parent = state.member        -- into a top-level member's object
          end
          state.depth = depth + 1
        elseif c == "}" or c == "]" then
          state.depth = state.depth - 1
          if state.capturing and state.depth == state.capture_depth then
            keep(state, string.sub(text, capture_from, i))
            state.capturing = false
            state.usage = table.concat(state.pieces)
          end
          if state.depth == state.top then
            state.parent = nil
          end
        elseif c == ":" then
          if state.depth == state.top then
            state.member = state.last_key
          end
          if (state.depth == state.top and USAGE_KEYS[state.last_key]) or (state.depth == (state.top or -2) + 1
              and PARENTS[state.parent] and state.last_key == "usage") then
            state.want_object = true
            state.last_key = nil
            pos = i + 1
            goto continue
          end
        else  -- a string starts: at the top level it may be a key
          state.in_string = true
          state.last_key = nil
          if not state.capturing and (state.depth == state.top or (state.depth == (state.top or -2) + 1
                                                                   and PARENTS[state.parent])) then
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
  if not RELEASE then   -- set where the filter is rendered: true for the calls holding a place
    return
  end
  local decision = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.ext_authz")
  if decision == nil or decision["inflight"] ~= "1" or decision["usage_id"] == nil then
    return
  end
  handle:httpCall("extauthz_admin", {
    [":method"] = "POST", [":path"] = "/internal/usage/release", [":authority"] = "extauthz",
    -- the counters' key: a regenerated key's line's (key_account), else its own
    ["x-usage-id"] = decision["usage_id"], ["x-key-id"] = decision["key_account"] or decision["key_id"] or "",
    ["x-team-id"] = decision["team_id"] or ""}, "", RELEASE_TIMEOUT_MS)
end

-- The response's last byte has passed: its counts are all it will report. A client
-- that goes away, or a reset, ends the filter before this, and the call is then settled
-- at no less than what it held when admitted (usage/reports.py).
local function ended(handle)
  handle:streamInfo():dynamicMetadata():set(NAMESPACE, "ended", 1)
end

-- One event's JSON, whole: its usage object, read.
local function read_event(handle, event, found)
  local state = json_state()
  scan_json(state, event)
  if state.usage and counts(state.usage, found, true) then
    publish(handle, found)
  end
end

-- An event stream's lines, as they come: each "data:" line is one event's JSON, read
-- whole (one with no count name in it is passed over), or, past LINE_MAX, scanned as it
-- comes. The model's own text is a JSON string there, its quotes escaped.
local function sse_state()
  return {line = {}, size = 0, scan = nil, skip = false}
end

local function end_line(handle, sse, found)
  if sse.scan then
    if sse.scan.usage and counts(sse.scan.usage, found, true) then
      publish(handle, found)
    end
  elseif not sse.skip then
    local line = table.concat(sse.line)
    -- "_tokens", "TokenCount": no count without it
    if string.sub(line, 1, 5) == "data:" and string.find(line, "oken", 6, true) then
      read_event(handle, string.sub(line, 6), found)
    end
  end
  sse.line, sse.size, sse.scan, sse.skip = {}, 0, nil, false
end

local function scan_sse(handle, sse, text, found)
  local pos, n = 1, #text
  while pos <= n do
    local nl = string.find(text, "\n", pos, true)
    local piece = string.sub(text, pos, (nl or (n + 1)) - 1)
    if sse.scan then
      scan_json(sse.scan, piece)
    elseif not sse.skip then
      sse.line[#sse.line + 1] = piece
      sse.size = sse.size + #piece
      if sse.size > LINE_MAX then        -- too long to hold: scanned from here on
        local line = table.concat(sse.line)
        sse.line, sse.size = {}, 0
        if string.sub(line, 1, 5) == "data:" then
          sse.scan = json_state()
          scan_json(sse.scan, string.sub(line, 6))
        else
          sse.skip = true
        end
      end
    end
    if nl == nil then
      return
    end
    end_line(handle, sse, found)
    pos = nl + 1
  end
end

-- AWS's event stream: the complete {"bytes":"…"} payloads in text, decoded and read;
-- returns what follows the last one (an unfinished payload, kept for the next chunk).
local function scan_aws(handle, text, found)
  local from, rest = 1, nil
  while true do
    local s, e, payload = string.find(text, "\"bytes\"%s*:%s*\"([A-Za-z0-9+/=]*)\"", from)
    if s == nil then break end
    if #payload <= B64_MAX then
      local event = unbase64(payload)
      if string.find(event, "oken", 1, true) then
        read_event(handle, event, found)
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
    ended(handle)
    release(handle)
    return
  end
  -- (the check's metadata is read only where it can matter: a JSON body never hides anything)
  local decision = stream and handle:streamInfo():dynamicMetadata():get("envoy.filters.http.ext_authz") or nil
  local hide = decision ~= nil and decision["usage_unasked"] == "1"
  local hs = hide and hide_state() or nil
  if hide then
    handle:headers():remove("content-length")   -- (the stream's length changes)
  end
  local found = {}
  local state, tail, sse, read = json and json_state() or nil, "", stream and sse_state() or nil, nil
  for chunk in handle:bodyChunks() do
    local text = chunk:getBytes(0, chunk:length())
    if json then
      scan_json(state, text)
      -- Each usage object as soon as it is whole (Gemini's array of chunks carries one a
      -- chunk, cumulative): a client going away mid-body leaves the last one read.
      if state.usage ~= read then
        read, found = state.usage, {}
        if counts(read, found, false) then
          publish(handle, found)
        end
      end
    elseif aws then
      tail = scan_aws(handle, tail .. text, found)
    else
      scan_sse(handle, sse, text, found)
      if hide then
        local held = (hs.pending or "") .. hs.carry
        local ok, sent = pcall(without_unasked, hs, text)
        if ok then
          chunk:setBytes(sent)
        else                     -- (a bug must not cut the client's stream: it gets the rest as sent)
          handle:logErr("extauthz usage filter: " .. tostring(sent))
          chunk:setBytes(held .. text)
          hide = false
        end
      end
    end
  end
  if stream then
    end_line(handle, sse, found)   -- a last event without its newline
  end
  ended(handle)
  release(handle)                  -- after the counts are written: the release may wait
end
