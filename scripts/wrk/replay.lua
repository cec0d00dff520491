-- POST /v1/charges with one key per thread, the same body each time: the first request
-- executes, every later one is replayed.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local request_text
function request()
  if not request_text then
    common.headers["Idempotency-Key"] = string.format("%s-hot-%d", run_id, thread_id)
    request_text = wrk.format("POST", "/v1/charges", common.headers, common.body(0))
  end
  return request_text
end
