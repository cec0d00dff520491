-- KEYS[1]: the record's key. ARGV: the notification channel, the message that names the
-- key. Deletes the claim the key holds, live or abandoned, whoever owns it, and returns its
-- token; returns 0 when the key holds no claim.
local head = redis.call('GETRANGE', KEYS[1], 0, 12)
if not is_marker(head) then
  return 0
end
redis.call('DEL', KEYS[1])
if watched(head) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return string.sub(head, 6, 13)
