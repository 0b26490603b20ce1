-- Batched, idempotent allocation of numbers from a range: service ids, backend ids, cluster IPs
-- (as integers) and node ports all use it. One call serves a whole apply.
-- KEYS: owners hash (owner -> value), values hash (value -> owner), cursor
-- ARGV: low, high, then pairs (owner, requested value or 0 for any)
-- Returns the value of each owner in order, or an error "conflict:<index>:<holder>" /
-- "exhausted"; on an error nothing was allocated (a first pass checks every request).
local owners, values, cursor = KEYS[1], KEYS[2], KEYS[3]
local low, high = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = (#ARGV - 2) / 2
for i = 0, n - 1 do
  local owner, want = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  if want ~= 0 then
    local holder = redis.call('HGET', values, tostring(want))
    if holder and holder ~= owner then
      return redis.error_reply('conflict:' .. i .. ':' .. holder)
    end
  end
end
local out = {}
local next_value = tonumber(redis.call('GET', cursor) or low)
for i = 0, n - 1 do
  local owner, want = ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  local have = redis.call('HGET', owners, owner)
  if have and (want == 0 or tonumber(have) == want) then
    out[#out + 1] = tonumber(have)
  else
    if have then
      redis.call('HDEL', values, have)
    end
    local value = want
    if value == 0 then
      local tries = 0
      while redis.call('HEXISTS', values, tostring(next_value)) == 1 do
        next_value = next_value + 1
        if next_value > high then next_value = low end
        tries = tries + 1
        if tries > high - low then return redis.error_reply('exhausted') end
      end
      value = next_value
      next_value = next_value + 1
      if next_value > high then next_value = low end
    end
    redis.call('HSET', owners, owner, tostring(value))
    redis.call('HSET', values, tostring(value), owner)
    out[#out + 1] = value
  end
end
redis.call('SET', cursor, tostring(next_value))
return out
