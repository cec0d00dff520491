-- KEYS[1]: the record's key. ARGV: the fence token, the encoded record, its TTL in ms, the
-- notification channel, the message that names the key.
local head, status = fence(KEYS[1], ARGV[1])
if not head then
  return status
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if watched(head) then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
