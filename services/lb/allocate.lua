-- Batched, idempotent allocation of numbers from a range: frontend ids, backend ids, cluster
-- IPs (as integers) and node ports all use it. One call serves a whole apply.
-- KEYS: owners hash (owner -> value), values hash (value -> owner), cursor
-- ARGV: low, high, requests "owner<TAB>wanted\n..." (wanted 0: any) -- one argument rather than
-- two per owner: tens of thousands of arguments cost the client more than the script
-- Returns the values, comma-separated in request order, or an error
-- "conflict:<index>:<holder>" / "exhausted"; on an error nothing was allocated.
local owners, values, cursor = KEYS[1], KEYS[2], KEYS[3]
local low, high = tonumber(ARGV[1]), tonumber(ARGV[2])
local requests = {}
for owner, want in string.gmatch(ARGV[3], "([^\t\n]+)\t(%d+)") do
  requests[#requests + 1] = {owner, tonumber(want)}
end
for i, r in ipairs(requests) do
  if r[2] ~= 0 then
    local holder = redis.call('HGET', values, tostring(r[2]))
    if holder and holder ~= r[1] then
      return redis.error_reply('conflict:' .. (i - 1) .. ':' .. holder)
    end
  end
end
local out = {}
local next_value = tonumber(redis.call('GET', cursor) or low)
for _, r in ipairs(requests) do
  local owner, want = r[1], r[2]
  local have = redis.call('HGET', owners, owner)
  if have and (want == 0 or tonumber(have) == want) then
    out[#out + 1] = have
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
    out[#out + 1] = tostring(value)
  end
end
redis.call('SET', cursor, tostring(next_value))
return table.concat(out, ',')
