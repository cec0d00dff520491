-- A claim that found the key held by a marker, judged by this server's clock. KEYS[1]: the
-- record's key. ARGV: the token of an abandoned claim to take over ('' for none), the new
-- marker, its expiry in ms (lease + retention).
-- Returns {1} when the key is now claimed with the new marker (it was free, or held by the
-- abandoned claim named); {2, value, lease left in ms} when it holds a live claim, flagged so
-- that its end is published (the caller waits for it, or is refused); {2, value} when it
-- holds a record or anything else; {3, value} when it holds an abandoned claim, left as it is.
local value = redis.call('GET', KEYS[1])
if not value then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
if not is_marker(value) then
  return {2, value}
end
local left = lease_left(KEYS[1], value)
if left > 0 then
  if not watched(value) then
    redis.call('SETRANGE', KEYS[1], 4, '\1')
  end
  return {2, value, left}
end
if ARGV[1] ~= '' and string.sub(value, 6, 13) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
return {3, value}
