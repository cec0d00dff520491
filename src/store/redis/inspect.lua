-- KEYS[1]: the record's key. Read-only. Returns {} when free, else {value, PTTL, TIME's
-- seconds, TIME's microseconds}: what the key holds, how long it has left, and when that
-- was, by this server's clock.
local value = redis.call('GET', KEYS[1])
if not value then
  return {}
end
local now = redis.call('TIME')
return {value, redis.call('PTTL', KEYS[1]), now[1], now[2]}
