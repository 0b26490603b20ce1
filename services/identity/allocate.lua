-- Allocate (or re-reference) the identity of one canonical label set, atomically.
-- ARGV: prefix, canonical labels, owner, lease seconds (0 = no expiry), min id, max id
-- Returns {id, new (0|1)} or an error "exhausted".
local p, labels, owner = ARGV[1], ARGV[2], ARGV[3]
local lease, min_id, max_id = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

local id = redis.call('HGET', p .. 'labels', labels)
local new = 0
if not id then
  -- Fresh ids come from a counter; once the range is used up, ids freed by GC are reused,
  -- but only after their quarantine has passed.
  local nxt = tonumber(redis.call('GET', p .. 'next') or min_id)
  if nxt < min_id then nxt = min_id end
  if nxt <= max_id then
    id = tostring(nxt)
    redis.call('SET', p .. 'next', nxt + 1)
  else
    local free = redis.call('ZRANGEBYSCORE', p .. 'free', '-inf', now, 'LIMIT', 0, 1)
    if #free == 0 then
      return redis.error_reply('exhausted')
    end
    id = free[1]
    redis.call('ZREM', p .. 'free', id)
  end
  redis.call('HSET', p .. 'labels', labels, id)
  redis.call('HSET', p .. 'ids', id, labels)
  new = 1
end

redis.call('HINCRBY', p .. 'refs', id, 1)
redis.call('HINCRBY', p .. 'owner:' .. owner, id, 1)
-- a reference taken inside the grace period keeps the id alive
redis.call('ZREM', p .. 'gc', id)
if lease > 0 then
  redis.call('ZADD', p .. 'leases', 'GT', now + lease, owner)
else
  redis.call('ZADD', p .. 'leases', 'GT', '+inf', owner)
end
return {tonumber(id), new}
