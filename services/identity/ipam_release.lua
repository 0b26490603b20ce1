-- Release a node's pod CIDR and its underlay address; atomic, so two concurrent releases never
-- free an index twice. ARGV: prefix, node. Returns the freed subnet index, or nil if the node
-- held none.
local index = redis.call('HGET', ARGV[1] .. 'nodes', ARGV[2])
if not index then return nil end
redis.call('HDEL', ARGV[1] .. 'nodes', ARGV[2])
redis.call('SADD', ARGV[1] .. 'free', index)
local underlay = redis.call('HGET', ARGV[1] .. 'underlay', ARGV[2])
if underlay then
  redis.call('HDEL', ARGV[1] .. 'underlay', ARGV[2])
  redis.call('HDEL', ARGV[1] .. 'claimed', ARGV[2])
  if redis.call('HGET', ARGV[1] .. 'holders', underlay) == ARGV[2] then
    redis.call('HDEL', ARGV[1] .. 'holders', underlay)
  end
end
return tonumber(index)
