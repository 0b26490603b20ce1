-- Cluster-pool IPAM: give a node the index of a pod CIDR inside the cluster CIDR, idempotently,
-- and record its underlay address (the one peers route and tunnel to).
-- ARGV: prefix, node, pool fingerprint (cluster cidr + mask), number of subnets in the pool,
--       underlay address ("" to leave the record as it is), the node that may lose the address
--       to this one ("": none; the caller found that node dead), the time now (unix seconds)
-- Returns the subnet index, or an error "exhausted" / "pool_changed:<old>" /
-- "underlay_taken:<node>"; an error changes nothing.
local p, node, pool, size = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local underlay, takeover, now = ARGV[5] or '', ARGV[6] or '', ARGV[7] or '0'
local current = redis.call('GET', p .. 'pool')
if current and current ~= pool then
  if redis.call('HLEN', p .. 'nodes') > 0 then
    return redis.error_reply('pool_changed:' .. current)
  end
end
local holder = false
if underlay ~= '' then
  holder = redis.call('HGET', p .. 'holders', underlay)
  if holder and holder ~= node and holder ~= takeover then
    return redis.error_reply('underlay_taken:' .. holder)
  end
end
local have = redis.call('HGET', p .. 'nodes', node)
local index = have
if not have then
  if current and current ~= pool then
    -- nobody holds a CIDR of the old pool: its indexes mean nothing in the new one
    redis.call('DEL', p .. 'next', p .. 'free')
  end
  index = redis.call('SPOP', p .. 'free')
  if not index then
    local nxt = tonumber(redis.call('GET', p .. 'next') or 0)
    if nxt >= size then
      return redis.error_reply('exhausted')
    end
    redis.call('SET', p .. 'next', nxt + 1)
    index = tostring(nxt)
  end
  redis.call('HSET', p .. 'nodes', node, index)
end
redis.call('SET', p .. 'pool', pool)
if underlay ~= '' then
  local old = redis.call('HGET', p .. 'underlay', node)
  if old and old ~= underlay and redis.call('HGET', p .. 'holders', old) == node then
    redis.call('HDEL', p .. 'holders', old)  -- the node came back with another address
  end
  if holder and holder ~= node then
    redis.call('HDEL', p .. 'underlay', holder)  -- taken over from a dead node
    redis.call('HDEL', p .. 'claimed', holder)
  end
  redis.call('HSET', p .. 'claimed', node, now)
  redis.call('HSET', p .. 'holders', underlay, node)
  redis.call('HSET', p .. 'underlay', node, underlay)
end
return tonumber(index)
