-- POST /v1/derived without a key and with a fresh body every time: the layer derives the key
-- from the request (the default MissingKey::Fingerprint), a first execution each.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local salt
function request()
  if not salt then
    -- Fold the run id and thread into the order number, so bodies never repeat across
    -- threads or runs.
    salt = 0
    for i = 1, #run_id do salt = (salt * 31 + run_id:byte(i)) % 0x7fffffff end
    salt = salt * 0x10000 + thread_id * 0x1000000000
  end
  counter = counter + 1
  return wrk.format("POST", "/v1/derived", common.headers, common.body(salt + counter))
end
