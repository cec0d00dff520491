-- POST /v1/charges without a key: the server's layer passes it through
-- (MissingKey::PassThrough).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local request_text
function request()
  if not request_text then
    request_text = wrk.format("POST", "/v1/charges", common.headers, common.body(0))
  end
  return request_text
end
