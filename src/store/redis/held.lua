-- A claim that found the key held by a marker, judged by this server's clock. KEYS[1]: the
-- record's key. ARGV: the token of an abandoned claim to take over ('' for none), the new
-- marker, its expiry in ms (lease + retention).
-- Returns {1} when the key is now claimed with the new marker (it was free, or held by the
-- abandoned claim named); {2, value} when it holds a live claim, a record or anything else;
-- {3, value} when it holds an abandoned claim, left as it is.
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
if not is_marker(value) or lease_left(KEYS[1], value) > 0 then
  return {2, value}
end
if ARGV[1] ~= '' and string.sub(value, 6, 13) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
return {3, value}
