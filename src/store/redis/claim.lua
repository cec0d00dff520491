-- Claim-or-get in one round trip.
-- KEYS[1]: the record's key. ARGV[1]: a new in-flight marker. ARGV[2]: the lease, in ms.
-- Free: writes the marker for the lease and returns 1. Held: returns {value, PTTL}, where
-- the value is an in-flight marker or a completed record (the caller tells them apart).
local value = redis.call('GET', KEYS[1])
if value then
  return {value, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
