-- Batched, idempotent allocation of numbers from a range: frontend ids, backend ids, cluster
-- IPs (as integers) and node ports all use it. One call serves a whole apply.
-- KEYS: owners hash (owner -> value), values hash (value -> owner), cursor
-- ARGV: low, high, requests "owner<TAB>wanted\n..." (wanted 0: any) -- one argument rather than
-- two per owner: tens of thousands of arguments cost the client more than the script
-- Returns the values, comma-separated in request order, or an error
-- "conflict:<index>:<holder>" / "exhausted"; on an error nothing was allocated.
--
-- Reads and writes go in multi-field commands (HMGET, HSET, HDEL of thousands of fields)
-- rather than a redis.call per owner: 40,000 new owners take 0.2 s instead of 0.3 s.
local owners, values, cursor = KEYS[1], KEYS[2], KEYS[3]
local low, high = tonumber(ARGV[1]), tonumber(ARGV[2])
local CHUNK = 4000 -- arguments per command: unpack() stays inside Lua's C stack (8000)

local function hmget(key, fields)
  local out = {}
  for first = 1, #fields, CHUNK do
    local part = redis.call('HMGET', key, unpack(fields, first, math.min(first + CHUNK - 1, #fields)))
    for j = 1, #part do out[first + j - 1] = part[j] end
  end
  return out
end

local function each_chunk(command, key, args) -- CHUNK is even: field-value pairs stay whole
  for first = 1, #args, CHUNK do
    redis.call(command, key, unpack(args, first, math.min(first + CHUNK - 1, #args)))
  end
end

local names, wants = {}, {}
for owner, want in string.gmatch(ARGV[3], "([^\t\n]+)\t(%d+)") do
  names[#names + 1] = owner
  wants[#wants + 1] = tonumber(want)
end

-- asked-for values: free, or already this owner's; none asked for twice in one call
local asked, asked_at, taken = {}, {}, {}
for i = 1, #names do
  if wants[i] ~= 0 then
    local text = tostring(wants[i])
    if taken[text] and taken[text] ~= names[i] then
      return redis.error_reply('conflict:' .. (i - 1) .. ':' .. taken[text])
    end
    taken[text] = names[i]
    asked[#asked + 1] = text
    asked_at[#asked_at + 1] = i
  end
end
local holders = hmget(values, asked)
for j = 1, #asked do
  local i = asked_at[j]
  if holders[j] and holders[j] ~= names[i] then
    return redis.error_reply('conflict:' .. (i - 1) .. ':' .. holders[j])
  end
end

local out, fresh, freed = {}, {}, {}
local have = hmget(owners, names)
for i = 1, #names do
  local value = have[i]
  if value and (wants[i] == 0 or tonumber(value) == wants[i]) then
    out[i] = value
  else
    if value then freed[#freed + 1] = value end
    if wants[i] ~= 0 then
      out[i] = tostring(wants[i])
    else
      fresh[#fresh + 1] = i
    end
  end
end

-- fresh values: the next free ones from the cursor on, probed a window at a time
local next_value = tonumber(redis.call('GET', cursor) or low)
local span = high - low + 1
local probed, filled = 0, 0
while filled < #fresh do
  local window = {}
  local size = math.min(#fresh - filled, CHUNK)
  for k = 1, size do
    window[k] = tostring(next_value)
    next_value = next_value + 1
    if next_value > high then next_value = low end
  end
  probed = probed + size
  local held = hmget(values, window)
  for k = 1, size do
    local text = window[k]
    if not held[k] and not taken[text] and filled < #fresh then
      filled = filled + 1
      out[fresh[filled]] = text
      taken[text] = names[fresh[filled]]
    end
  end
  if filled < #fresh and probed >= span then return redis.error_reply('exhausted') end
end

if #freed > 0 then each_chunk('HDEL', values, freed) end
local owner_pairs, value_pairs = {}, {}
for i = 1, #names do
  if out[i] ~= have[i] then
    owner_pairs[#owner_pairs + 1] = names[i]
    owner_pairs[#owner_pairs + 1] = out[i]
    value_pairs[#value_pairs + 1] = out[i]
    value_pairs[#value_pairs + 1] = names[i]
  end
end
if #owner_pairs > 0 then
  each_chunk('HSET', owners, owner_pairs)
  each_chunk('HSET', values, value_pairs)
end
redis.call('SET', cursor, tostring(next_value))
return table.concat(out, ',')
