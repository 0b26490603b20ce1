-- Cluster-pool IPAM: give a node the index of a pod CIDR inside the cluster CIDR, idempotently.
-- ARGV: prefix, node, pool fingerprint (cluster cidr + mask), number of subnets in the pool
-- Returns the subnet index, or an error "exhausted" / "pool_changed:<old>".
local p, node, pool, size = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local current = redis.call('GET', p .. 'pool')
if current and current ~= pool then
  if redis.call('HLEN', p .. 'nodes') > 0 then
    return redis.error_reply('pool_changed:' .. current)
  end
  -- nobody holds a CIDR of the old pool: its indexes mean nothing in the new one
  redis.call('DEL', p .. 'next', p .. 'free')
end
redis.call('SET', p .. 'pool', pool)
local have = redis.call('HGET', p .. 'nodes', node)
if have then
  return tonumber(have)
end
local index = redis.call('SPOP', p .. 'free')
if not index then
  local nxt = tonumber(redis.call('GET', p .. 'next') or 0)
  if nxt >= size then
    return redis.error_reply('exhausted')
  end
  redis.call('SET', p .. 'next', nxt + 1)
  index = tostring(nxt)
end
redis.call('HSET', p .. 'nodes', node, index)
return tonumber(index)
