-- Request mix for the end-to-end runs: wrk through Envoy, one POST /v1/chat/completions per
-- call, the key and the model varying per request over the whole key population.
--
--   wrk -t1 -c32 -d3s --latency -s bench/mix.lua http://127.0.0.1:PORT -- 100000 [START [stream]]
--
-- The arguments: the number of keys (sk-bench-0 ...), and where the request counter c
-- starts (0 by default; a run started elsewhere uses other keys). Per 20 requests:
--   c % 20 == 0            an unknown key  (sk-bench-unknown-<c % 1000>)     -> 401 invalid_api_key
--   otherwise              sk-bench-<(c * 7919) % n_keys>: 7919 is prime to 100,000, so
--                          100,000 consecutive requests visit every key once
--   c % 20 in {3, 7, 13}   model bench-model-b, c % 20 == 11 a model no key may call
--                          (gpt-unknown), otherwise bench-model
-- Whether a key may call a model follows from its number (see bench/run.py, population):
-- most may, some are restricted, in a restricted or blocked team, blocked or expired.
-- bench/run.py mirrors this file (lua_mix) to tell the denied share to expect.

local n_keys = 100000
local counter = 0
local stream = false  -- a third argument "stream": streamed calls (the upstream answers with events)

function init(args)
  if args[1] then n_keys = tonumber(args[1]) end
  if args[2] then counter = tonumber(args[2]) end
  stream = args[3] == "stream"
end

function request()
  counter = counter + 1
  local key
  if counter % 20 == 0 then
    key = "sk-bench-unknown-" .. (counter % 1000)
  else
    key = "sk-bench-" .. ((counter * 7919) % n_keys)
  end
  local m = counter % 20
  local model = "bench-model"
  if m == 3 or m == 7 or m == 13 then
    model = "bench-model-b"
  elseif m == 11 then
    model = "gpt-unknown"
  end
  local body = '{"model":"' .. model .. '","messages":[{"role":"system","content":"You are a helpful assistant."},'
    .. '{"role":"user","content":"Write one sentence about benchmarks, request ' .. counter .. '."}],'
    .. '"max_tokens":64,"temperature":0.2' .. (stream and ',"stream":true}' or '}')
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
  if stream then headers["x-bench-stream"] = "1" end
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end
