-- Give numbers back (a deleted service's cluster IP and node ports).
-- KEYS: owners hash, values hash. ARGV: owners.
for i = 1, #ARGV do
  local have = redis.call('HGET', KEYS[1], ARGV[i])
  if have then
    redis.call('HDEL', KEYS[1], ARGV[i])
    if redis.call('HGET', KEYS[2], have) == ARGV[i] then
      redis.call('HDEL', KEYS[2], have)
    end
  end
end
return #ARGV
