-- Shared by the scripts. An in-flight marker is "TIF", a version byte (1 or 2), a flags byte
-- (1: someone waits for it to end), the owner's 8-byte fence token, the fingerprint, and in
-- version 2 the claim time and the retention (8 bytes each, ms). A completed record starts
-- with "TIC". A version 2 key expires lease + retention after its last claim or renewal, so
-- its lease has ended once the key's PTTL is down to the retention; a version 1 key expires
-- with its lease.
local function is_marker(head)
  local start = string.sub(head, 1, 4)
  return start == 'TIF\1' or start == 'TIF\2'
end

local function retention(head)
  if string.sub(head, 4, 4) == '\2' and string.len(head) >= 61 then
    return (struct.unpack('>I8', string.sub(head, 54, 61)))
  end
  return 0
end

-- The ms left of the lease of the marker `head` under `key`: 0 or less once it has ended.
local function lease_left(key, head)
  return redis.call('PTTL', key) - retention(head)
end

-- Returns the marker's head when `token` holds `key` (and, if `live`, its lease has not
-- ended); otherwise nil and why not: 0 when the lease is lost (the key is free, completed,
-- held by another claim, or, if `live`, expired), -1 when the key holds bytes not ours.
local function fence(key, token, live)
  local head = redis.call('GETRANGE', key, 0, 60)
  local magic = string.sub(head, 1, 3)
  if is_marker(head) and string.sub(head, 6, 13) == token then
    if live and lease_left(key, head) <= 0 then
      return nil, 0
    end
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
