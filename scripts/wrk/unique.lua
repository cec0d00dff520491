-- POST /v1/charges with a fresh Idempotency-Key on every request: a first execution each.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local body = common.body(0)
function request()
  counter = counter + 1
  common.headers["Idempotency-Key"] = string.format("%s-%d-%d", run_id, thread_id, counter)
  return wrk.format("POST", "/v1/charges", common.headers, body)
end
