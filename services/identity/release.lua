-- Drop one reference of an owner to an identity.
-- ARGV: prefix, id, owner, grace seconds, request id, seconds to remember the request id
-- Returns the references left cluster-wide, or an error "not_referenced".
-- The request id makes a retry safe: it answers the first result instead of dropping a
-- second reference.
local p, id, owner, grace = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local request, remember = ARGV[5], tonumber(ARGV[6])

local done = redis.call('GET', p .. 'req:' .. request)
if done then
  return tonumber(done)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

local held = tonumber(redis.call('HGET', p .. 'owner:' .. owner, id) or 0)
if held <= 0 then
  return redis.error_reply('not_referenced')
end
if redis.call('HINCRBY', p .. 'owner:' .. owner, id, -1) <= 0 then
  redis.call('HDEL', p .. 'owner:' .. owner, id)
end
local left = redis.call('HINCRBY', p .. 'refs', id, -1)
if left <= 0 then
  redis.call('HDEL', p .. 'refs', id)
  redis.call('ZADD', p .. 'gc', now + grace, id)
  left = 0
end
redis.call('SET', p .. 'req:' .. request, left, 'EX', remember)
return left
