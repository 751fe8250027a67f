//! The key layout and the server-side scripts: each ledger operation is one script, so it is
//! one atomic step whatever the number of replicas.
//!
//! Keys (`P` is `key_prefix`; `{user}` is also a Redis Cluster hash tag, keeping one user's
//! keys in one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{user}:spend:<period_start>` | hash | `spent`, `requests`, `prompt_tokens`, `completion_tokens`, and `b/<backend>/<same>` |
//! | `P{user}:holds` | sorted set | one member per open reservation, `<replica>:<id>:<amount>`, scored by its expiry (ms, Redis clock) |
//! | `P{user}:reserved` | string | the sum of the amounts in `holds` |
//! | `P{user}:settled` | sorted set | settlement ids of the last [`DEDUPE_WINDOW_MS`], so a retried settlement is applied once |
//! | `P{user}:rate` | hash | rpm/tpm token buckets: `r`, `t`, `ts` |
//! | `Precords` | list | the newest request records (JSON), capped |
//!
//! Why this shape: an expired reservation must stop counting without any replica alive to
//! release it. Every script that reads or writes the reserved sum first drops the members of
//! `holds` whose expiry has passed and subtracts their amounts, so `reserved` always equals the
//! amounts of the live reservations. The amount is in the member itself, so a release needs
//! no lookup and is idempotent (`ZREM` says whether it was still there).
//!
//! Money is integer pico-USD. Lua numbers are doubles (exact only below 2^53, ~$9,000 in
//! pico-USD), so the scripts never turn an amount into a Lua number: sums are done by Redis
//! (`INCRBY`, `HINCRBY` on the decimal strings) and the budget check compares numbers split
//! into 9-digit halves, which stay exact.

use redis::Script;

/// How long a settlement id is remembered to make a retry harmless.
pub const DEDUPE_WINDOW_MS: u64 = 15 * 60 * 1000;
/// Request records kept in Redis at most (the newest).
pub const MAX_RECORDS: usize = 100_000;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    fn user(&self, user: &str, what: &str) -> String {
        format!("{}{{{user}}}:{what}", self.prefix)
    }

    pub fn spend(&self, user: &str, period_start: i64) -> String {
        self.user(user, &format!("spend:{period_start}"))
    }

    pub fn holds(&self, user: &str) -> String {
        self.user(user, "holds")
    }

    pub fn reserved(&self, user: &str) -> String {
        self.user(user, "reserved")
    }

    pub fn settled(&self, user: &str) -> String {
        self.user(user, "settled")
    }

    pub fn rate(&self, user: &str) -> String {
        self.user(user, "rate")
    }

    pub fn records(&self) -> String {
        format!("{}records", self.prefix)
    }
}

/// Shared by the budget scripts: Redis's own clock (one clock for every replica), pruning of
/// expired reservations, and exact comparison of decimal amounts.
const COMMON: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function str(v)
  if v then return v end
  return '0'
end
local function prune(reserved_key, holds_key, now)
  local expired = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now, 'LIMIT', 0, 512)
  for _, member in ipairs(expired) do
    redis.call('ZREM', holds_key, member)
    redis.call('DECRBY', reserved_key, string.match(member, '(%d+)$'))
  end
end
local function parts(s)
  if string.sub(s, 1, 1) == '-' then return {0, 0} end
  local n = #s
  if n <= 9 then return {0, tonumber(s)} end
  return {tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))}
end
local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= 1000000000 then return {hi + 1, lo - 1000000000} end
  return {hi, lo}
end
local function le(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2])
end
";

/// KEYS: reserved, holds, spend. ARGV: member, amount, budget ('' = none), ttl ms.
/// Returns {1 reserved | 0 refused, spent, reserved before this reservation}.
const RESERVE: &str = r"
local now = now_ms()
prune(KEYS[1], KEYS[2], now)
local spent = str(redis.call('HGET', KEYS[3], 'spent'))
local reserved = str(redis.call('GET', KEYS[1]))
if ARGV[3] ~= '' and not le(add(add(parts(spent), parts(reserved)), parts(ARGV[2])), parts(ARGV[3])) then
  return {0, spent, reserved}
end
local ttl = tonumber(ARGV[4])
-- A member already there would be counted twice in `reserved` and freed once: refuse it.
if redis.call('ZADD', KEYS[2], 'NX', now + ttl, ARGV[1]) == 0 then
  return redis.error_reply('duplicate reservation id ' .. ARGV[1])
end
redis.call('INCRBY', KEYS[1], ARGV[2])
-- Both keys outlive their last reservation, then vanish together with an idle user.
redis.call('PEXPIRE', KEYS[1], ttl + 60000)
redis.call('PEXPIRE', KEYS[2], ttl + 60000)
return {1, spent, reserved}
";

/// KEYS: reserved, holds, spend, settled, records. ARGV: member ('' = the reservation was
/// local), settlement id, cost, prompt tokens, completion tokens, backend, spend expire-at
/// (unix s, '' = never), record JSON, max records, dedupe window ms.
/// Returns 1 when applied, 0 when this settlement was applied before.
const SETTLE: &str = r"
local now = now_ms()
if redis.call('ZSCORE', KEYS[4], ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[10]))
redis.call('ZADD', KEYS[4], now, ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[10])
if ARGV[1] ~= '' and redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[1], string.match(ARGV[1], '(%d+)$'))
end
local b = 'b/' .. ARGV[6] .. '/'
redis.call('HINCRBY', KEYS[3], 'spent', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'requests', 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'completion_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[3], b .. 'spent', ARGV[3])
redis.call('HINCRBY', KEYS[3], b .. 'requests', 1)
redis.call('HINCRBY', KEYS[3], b .. 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[3], b .. 'completion_tokens', ARGV[5])
if ARGV[7] ~= '' then redis.call('EXPIREAT', KEYS[3], ARGV[7]) end
redis.call('LPUSH', KEYS[5], ARGV[8])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[9]) - 1)
return 1
";

/// KEYS: reserved, holds. ARGV: member. Returns 1 when it was still held.
const RELEASE: &str = r"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[1], string.match(ARGV[1], '(%d+)$'))
  return 1
end
return 0
";

/// KEYS: reserved, holds. ARGV: ttl ms, members. Pushes back the expiry of this replica's
/// reservations that are still open (a long stream); one already expired stays gone, since
/// its amount has left the reserved sum.
const RENEW: &str = r"
local now = now_ms()
prune(KEYS[1], KEYS[2], now)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[i])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl + 60000)
  redis.call('PEXPIRE', KEYS[2], ttl + 60000)
end
return 1
";

/// KEYS: reserved, holds, spend. ARGV: 'all' for every spend field, else only `spent`.
/// Returns {reserved, spent, {field, value, ...} when 'all'}.
const READ: &str = r"
prune(KEYS[1], KEYS[2], now_ms())
local reserved = str(redis.call('GET', KEYS[1]))
local spent = str(redis.call('HGET', KEYS[3], 'spent'))
if ARGV[1] == 'all' then
  return {reserved, spent, redis.call('HGETALL', KEYS[3])}
end
return {reserved, spent, {}}
";

/// Token buckets refilling continuously at capacity per minute, as in `ratelimit`.
/// KEYS: rate. ARGV: rpm ('' = none), tpm ('' = none), tokens.
/// Returns {1, '', 0} when admitted, else {0, 'requests' | 'tokens', retry after ms}.
const RATE: &str = r"
local now = now_ms()
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local elapsed = math.max(0, now - (tonumber(state[3]) or now)) / 60000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local r, t, want
if rpm then
  r = math.min(rpm, (tonumber(state[1]) or rpm) + elapsed * rpm)
  if r < 1 then return {0, 'requests', math.ceil((1 - r) * 60000 / rpm)} end
end
if tpm then
  -- A request bigger than the whole allowance waits for a full bucket, not forever.
  want = math.min(tonumber(ARGV[3]), tpm)
  t = math.min(tpm, (tonumber(state[2]) or tpm) + elapsed * tpm)
  if t < want then return {0, 'tokens', math.ceil((want - t) * 60000 / tpm)} end
end
if r then redis.call('HSET', KEYS[1], 'r', tostring(r - 1)) end
if t then redis.call('HSET', KEYS[1], 't', tostring(t - want)) end
redis.call('HSET', KEYS[1], 'ts', now)
-- After a minute idle a bucket is full again: the same as no key at all.
redis.call('PEXPIRE', KEYS[1], 120000)
return {1, '', 0}
";

/// KEYS: rate. ARGV: tpm, tokens to give back (negative: to take). Corrects the token bucket
/// by the difference between the estimate taken at admission and the real usage.
const RATE_SETTLE: &str = r"
local t = tonumber(redis.call('HGET', KEYS[1], 't'))
if not t then return 0 end
redis.call('HSET', KEYS[1], 't', tostring(math.min(tonumber(ARGV[1]), t + tonumber(ARGV[2]))))
return 1
";

/// The scripts, hashed once; `EVALSHA` runs them and a `NOSCRIPT` answer (Redis restarted or
/// flushed its script cache) makes the client load the script and retry, once.
pub struct Scripts {
    pub reserve: Script,
    pub settle: Script,
    pub release: Script,
    pub renew: Script,
    pub read: Script,
    pub rate: Script,
    pub rate_settle: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        let with_common = |body: &str| Script::new(&format!("{COMMON}{body}"));
        Self {
            reserve: with_common(RESERVE),
            settle: with_common(SETTLE),
            release: with_common(RELEASE),
            renew: with_common(RENEW),
            read: with_common(READ),
            rate: with_common(RATE),
            rate_settle: with_common(RATE_SETTLE),
        }
    }
}

impl Scripts {
    pub fn all(&self) -> [&Script; 7] {
        [&self.reserve, &self.settle, &self.release, &self.renew, &self.read, &self.rate, &self.rate_settle]
    }
}
