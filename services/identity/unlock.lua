-- Delete a lock only if we still hold it (it may have lapsed and been taken by another).
-- KEYS: none; ARGV: lock key, holder token
if redis.call('GET', ARGV[1]) == ARGV[2] then
  return redis.call('DEL', ARGV[1])
end
return 0
