-- GET /v1/charges/ch_1: a method the layer does not protect (pass-through).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local request_text
function request()
  if not request_text then
    local headers = {}
    for name, value in pairs(common.headers) do
      if name ~= "Content-Type" then headers[name] = value end
    end
    request_text = wrk.format("GET", "/v1/charges/ch_1", headers)
  end
  return request_text
end
