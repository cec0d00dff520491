-- Shared by the fenced scripts. An in-flight marker is "TIF", version byte 1, a flags byte
-- (1: someone waits for it to end), the owner's 8-byte fence token, the fingerprint; a
-- completed record starts with "TIC".
-- Returns the marker's head when `token` holds `key`; otherwise nil and why not:
-- 0 when the lease is lost (the key is free, completed, or held by another claim),
-- -1 when the key holds bytes that are not ours.
local function fence(key, token)
  local head = redis.call('GETRANGE', key, 0, 12)
  local magic = string.sub(head, 1, 3)
  if string.sub(head, 1, 4) == 'TIF\1' and string.sub(head, 6, 13) == token then
    return head, 1
  end
  if head == '' or magic == 'TIF' or magic == 'TIC' then
    return nil, 0
  end
  return nil, -1
end

local function watched(head)
  return string.byte(head, 5) ~= 0
end
