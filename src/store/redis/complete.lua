-- KEYS[1]: the record's key. ARGV: the fence token, the encoded record, its TTL in ms, the
-- notification channel, the message that names the key.
-- Stores the completed envelope: "TIC", version 1, the expiry (Unix ms by this server's
-- clock: the clock the key expires by), the TTL, then the record.
local head, status = fence(KEYS[1], ARGV[1], true)
if not head then
  return status
end
local now = redis.call('TIME')
local ttl = tonumber(ARGV[3])
local expires_at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ttl
redis.call('SET', KEYS[1], 'TIC\1' .. struct.pack('>I8I8', expires_at, ttl) .. ARGV[2], 'PX', ARGV[3])
if watched(head) then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
