-- Renew an owner's lease.
-- ARGV: prefix, owner, ttl seconds
-- Returns the lease's expiry (as a string, unix seconds on the Redis clock), or an error:
-- "no_lease" when the owner holds nothing (its lease lapsed and GC dropped its references,
-- or it never had any: it must allocate again), "not_leased" when its references have no
-- lease to renew.
local p, owner, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local held = redis.call('ZSCORE', p .. 'leases', owner)
if not held then
  return redis.error_reply('no_lease')
end
if held == 'inf' then
  return redis.error_reply('not_leased')
end
local t = redis.call('TIME')
-- formatted to the microsecond: Lua's tostring keeps only 14 significant digits
local expires = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + ttl)
if tonumber(expires) > tonumber(held) then
  redis.call('ZADD', p .. 'leases', expires, owner)
  return expires
end
return held
