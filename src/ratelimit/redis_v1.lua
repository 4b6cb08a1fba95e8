-- mantlegate_rl_v1: mantlegate's rate limits (GCRA) in Redis, shared by every replica.
--
-- One script, four operations, chosen by ARGV[1]:
--   acquire  KEYS = the call's cells; ARGV[2k], ARGV[2k+1] = increment and burst (ns) of KEYS[k].
--            All or nothing. Returns {1, 0, 0, ahead...} (taken; ahead of each cell after its
--            take) or {0, index, wait, ahead...} (refused by KEYS[index + 1] for `wait` ns;
--            nothing written; ahead of each cell as it is).
--   adjust   KEYS[1]; ARGV[2] = signed delta (ns). A debt (> 0) is added in full; a refund
--            (< 0) never moves the TAT below now nor raises it. Returns the new ahead.
--   peek     KEYS = cells. Returns how far ahead of now each TAT is.
--   ping     Returns the script's name (a health probe that also loads the script).
-- "Ahead" is TAT - now in ns, 0 for a full bucket; now is the Redis server's clock (TIME), so
-- the replicas' clocks never matter.
--
-- A TAT is stored as the decimal nanoseconds since the Unix epoch (e.g. 1767225600123456789),
-- read and written as whole seconds and nanoseconds so that Lua's doubles stay exact; every
-- computation is on `ahead` values, kept below 2^52 ns. A key expires 120 s (twice the one
-- minute window) after its TAT: an expired key is a full bucket. A missing key counts as a TAT
-- 120 s in the past, the latest it can be.
--
-- The semantics are those of this version: a change of them is a new script with a new name and
-- key prefix (mantlegate_rl_v2, mantlegate:rl:{v2}:), and this one refuses any other key, so two
-- versions of mantlegate in one fleet never apply two semantics to the same counters.

local NAME = 'mantlegate_rl_v1'
local PREFIX = 'mantlegate:rl:{v1}:'
local NS = 1000000000
local MARGIN_S = 120
local MARGIN_NS = MARGIN_S * NS
local MAX_AHEAD = 4503599627370496 -- 2^52

-- Before Redis 5, scripts that read TIME must replicate their effects, not themselves.
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

for i = 1, #KEYS do
  if string.sub(KEYS[i], 1, #PREFIX) ~= PREFIX then
    return redis.error_reply('ERR ' .. NAME .. ': refusing key ' .. KEYS[i] .. ' (not under ' .. PREFIX .. ')')
  end
end

local time = redis.call('TIME')
local now_s = tonumber(time[1])
local now_ns = tonumber(time[2]) * 1000

-- How far the stored TAT of `key` is ahead of now (negative: past), at least -MARGIN_NS.
local function ahead_of(key)
  local value = redis.call('GET', key)
  if not value then
    return -MARGIN_NS
  end
  local s = tonumber(string.sub(value, 1, -10)) or 0
  local n = tonumber(string.sub(value, -9)) or 0
  local ds = s - now_s
  if ds < -MARGIN_S then
    return -MARGIN_NS
  end
  if ds > MAX_AHEAD / NS then
    return MAX_AHEAD
  end
  return ds * NS + (n - now_ns)
end

-- Stores the TAT `ahead` ns from now, expiring MARGIN_S after it.
local function store(key, ahead)
  if ahead > MAX_AHEAD then
    ahead = MAX_AHEAD
  end
  local total = now_ns + ahead
  local s = math.floor(total / NS)
  local n = total - s * NS
  if n < 0 then
    n = n + NS
    s = s - 1
  elseif n >= NS then
    n = n - NS
    s = s + 1
  end
  local px = math.floor(math.max(ahead, 0) / 1000000) + 1 + MARGIN_S * 1000
  redis.call('SET', key, string.format('%d%09d', now_s + s, n), 'PX', px)
end

-- One GCRA step at now = 0: the new ahead if a take of `inc` fits, else nil and the wait. An
-- increment larger than the burst window only fits into a full bucket.
local function gcra(ahead, inc, burst)
  if inc > burst then
    if ahead <= 0 then
      return inc, 0
    end
    return nil, ahead
  end
  local new = math.max(ahead, 0) + inc
  local allowed_at = new - burst
  if allowed_at <= 0 then
    return new, 0
  end
  return nil, allowed_at
end

local op = ARGV[1]

if op == 'acquire' then
  local current = {}
  local after = {}
  local reply = {1, 0, 0}
  for i = 1, #KEYS do
    local key = KEYS[i]
    if current[key] == nil then
      current[key] = ahead_of(key)
      after[key] = current[key]
    end
    local inc = tonumber(ARGV[2 * i])
    local burst = tonumber(ARGV[2 * i + 1])
    local new, wait = gcra(after[key], inc, burst)
    if new == nil then
      reply = {0, i - 1, wait}
      for j = 1, #KEYS do
        reply[3 + j] = math.max(current[KEYS[j]] or ahead_of(KEYS[j]), 0)
      end
      return reply
    end
    after[key] = new
    reply[3 + i] = new
  end
  for key, ahead in pairs(after) do
    store(key, ahead)
  end
  return reply
elseif op == 'adjust' then
  local key = KEYS[1]
  local delta = tonumber(ARGV[2])
  local ahead = ahead_of(key)
  if delta > 0 then
    ahead = ahead + delta
    store(key, ahead)
  elseif delta < 0 and ahead > 0 then
    ahead = math.max(ahead + delta, 0)
    store(key, ahead)
  end
  return math.min(math.max(ahead, 0), MAX_AHEAD)
elseif op == 'peek' then
  local reply = {}
  for i = 1, #KEYS do
    reply[i] = math.max(ahead_of(KEYS[i]), 0)
  end
  return reply
elseif op == 'ping' then
  return NAME
end
return redis.error_reply('ERR ' .. NAME .. ': unknown operation ' .. tostring(op))
