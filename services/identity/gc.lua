-- Garbage collection, one atomic step:
-- 1. owners whose lease lapsed lose all their references;
-- 2. identities unreferenced for the whole grace period are deleted, and their ids
--    quarantined for another grace period before they may be reused.
-- ARGV: prefix, grace seconds, max identities to delete in this step
-- Returns {expired owners..., '', deleted ids...}
local p, grace, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}

for _, owner in ipairs(redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now)) do
  local held = redis.call('HGETALL', p .. 'owner:' .. owner)
  for i = 1, #held, 2 do
    local id, count = held[i], tonumber(held[i + 1])
    if redis.call('HINCRBY', p .. 'refs', id, -count) <= 0 then
      redis.call('HDEL', p .. 'refs', id)
      redis.call('ZADD', p .. 'gc', now + grace, id)
    end
  end
  redis.call('DEL', p .. 'owner:' .. owner)
  redis.call('ZREM', p .. 'leases', owner)
  table.insert(out, owner)
end
table.insert(out, '')

for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'gc', '-inf', now, 'LIMIT', 0, batch)) do
  redis.call('ZREM', p .. 'gc', id)
  if not redis.call('HGET', p .. 'refs', id) then
    local labels = redis.call('HGET', p .. 'ids', id)
    if labels then
      redis.call('HDEL', p .. 'labels', labels)
      redis.call('HDEL', p .. 'ids', id)
    end
    redis.call('ZADD', p .. 'free', now + grace, id)
    table.insert(out, id)
  end
end
return out
