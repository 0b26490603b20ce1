-- Allocate (or re-reference) the identity of one canonical label set, atomically.
-- ARGV: prefix, canonical labels, owner, lease seconds (0 = no expiry), min id, max id,
--       request id, seconds to remember the request id
-- Returns {id, new (0|1)}, or an error "exhausted" / "lease_mismatch".
--
-- The request id makes a retry safe: a request that ran but whose reply was lost (a timeout)
-- returns its first result again instead of taking a second reference.
local p, labels, owner = ARGV[1], ARGV[2], ARGV[3]
local lease, min_id, max_id = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local request, remember = ARGV[7], tonumber(ARGV[8])

local done = redis.call('GET', p .. 'req:' .. request)
if done then
  local id, new = string.match(done, '^(%d+):(%d)$')
  return {tonumber(id), tonumber(new)}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

-- An owner's references either all live until released or all follow its lease: mixing the
-- two would let one lease-less allocation keep a dead node's references forever.
local held = redis.call('ZSCORE', p .. 'leases', owner)
if held and ((lease > 0) ~= (held ~= 'inf')) then
  return redis.error_reply('lease_mismatch')
end

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
  redis.call('ZADD', p .. 'leases', '+inf', owner)
end
redis.call('SET', p .. 'req:' .. request, id .. ':' .. new, 'EX', remember)
return {tonumber(id), new}
