-- KEYS[1]: the record's key. ARGV: the fence token, the notification channel, the message
-- that names the key. An owner may release its claim after its lease ended, if nobody took
-- it over.
local head, status = fence(KEYS[1], ARGV[1], false)
if not head then
  return status
end
redis.call('DEL', KEYS[1])
if watched(head) then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
