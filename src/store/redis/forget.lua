-- KEYS[1]: the record's key. Deletes it if it holds a completed record (returns 1); a claim
-- or a free key is left alone (returns 0).
if redis.call('GETRANGE', KEYS[1], 0, 2) == 'TIC' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
