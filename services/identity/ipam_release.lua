-- Release a node's pod CIDR; atomic, so two concurrent releases never free an index twice.
-- ARGV: prefix, node. Returns the freed subnet index, or nil if the node held none.
local index = redis.call('HGET', ARGV[1] .. 'nodes', ARGV[2])
if not index then return nil end
redis.call('HDEL', ARGV[1] .. 'nodes', ARGV[2])
redis.call('SADD', ARGV[1] .. 'free', index)
return tonumber(index)
