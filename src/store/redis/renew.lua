-- KEYS[1]: the record's key. ARGV: the fence token, the new lease in ms.
local head, status = fence(KEYS[1], ARGV[1], true)
if not head then
  return status
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + retention(head))
return 1
