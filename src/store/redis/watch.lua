-- KEYS[1]: the record's key. Returns -2 when the key is free or its claim's lease has ended
-- (look again), -1 when it holds anything but an in-flight marker, -3 for a marker without
-- expiry (not one of ours), else the claim's remaining lease in ms, having flagged the marker
-- so that its end is published.
local head = redis.call('GETRANGE', KEYS[1], 0, 60)
if head == '' then
  return -2
end
if not is_marker(head) then
  return -1
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  return -3
end
local left = ttl - retention(head)
if left <= 0 then
  return -2
end
if string.byte(head, 5) == 0 then
  redis.call('SETRANGE', KEYS[1], 4, '\1')
end
return left
