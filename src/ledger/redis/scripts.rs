//! The key layout and the server-side scripts: each ledger operation is one script, so it is
//! one atomic step whatever the number of replicas.
//!
//! Keys (`P` is `key_prefix`; `{user}` is an account's name: a user's, or `~key:<id>` or
//! `~team:<name>` for a key's or a team's budget; it is also a Redis Cluster hash tag, keeping
//! one account's keys in one slot). On a Redis Cluster, an account's keys are instead
//! `P{root}:<account>:...`, `root` being the last level of the request's chain (the team's, else
//! the top user's), so that one request's key, user and team share a slot and one script
//! reserves or settles all of them; the root's own keys keep the `P{root}:...` names:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{user}:spend:<period_start>` | hash | `spent`, `requests`, `prompt_tokens`, `completion_tokens`, and `b/<backend>/<same>` |
//! | `P{user}:holds` | sorted set | one member per open reservation, `<replica>:<id>:<amount>`, scored by its expiry (ms, Redis clock) |
//! | `P{user}:reserved` | string | the sum of the amounts in `holds` |
//! | `P{user}:settled` | sorted set | settlement ids of the last [`DEDUPE_WINDOW_MS`], so a retried settlement is applied once |
//! | `P{user}:rate` | hash | rpm/tpm token buckets: `r`, `t`, `ts` |
//! | `Precords` | list | the newest request records (JSON), capped |
//! | `Prank:<period>:<start>` | sorted set | every user with a request in that period, score 0: who has spend to read |
//! | `P{user}:hour:<hour_start>` | hash | the user's hour ([`rollup`](crate::ledger::rollup)): `<backend>/requests`, `errors`, `spent`, `prompt_tokens`, `completion_tokens`, `latency_ms`; kept as long as the records |
//! | `Phour:<hour_start>` | hash | everyone's hour, the same fields; kept [`BACKEND_ROWS_KEPT_S`](crate::ledger::rollup::BACKEND_ROWS_KEPT_S) |
//! | `Pslots` | hash | Cluster only: account → its root (none for a root), written at an account's first reservation in a replica, for reads that start from an account alone |
//!
//! On a Cluster, `Precords`, the rankings and everyone's hour are in slots of their own: a
//! settlement's script updates the chain's keys, and those three are written right after it,
//! only when it applied; a gateway dying in between loses that request from the reports,
//! never from the spend.
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

    /// What every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An account's key, in the hash slot of `slot`: the account itself on one Redis (the
    /// names of every release before Cluster support), the root of its request's chain on a
    /// Cluster, so that one script can touch every level of a request.
    fn account(&self, slot: &str, account: &str, what: &str) -> String {
        if slot == account {
            format!("{}{{{account}}}:{what}", self.prefix)
        } else {
            format!("{}{{{slot}}}:{account}:{what}", self.prefix)
        }
    }

    pub fn spend(&self, slot: &str, account: &str, period_start: i64) -> String {
        self.account(slot, account, &format!("spend:{period_start}"))
    }

    pub fn holds(&self, slot: &str, account: &str) -> String {
        self.account(slot, account, "holds")
    }

    pub fn reserved(&self, slot: &str, account: &str) -> String {
        self.account(slot, account, "reserved")
    }

    pub fn settled(&self, slot: &str, account: &str) -> String {
        self.account(slot, account, "settled")
    }

    pub fn rate(&self, slot: &str, account: &str) -> String {
        self.account(slot, account, "rate")
    }

    /// The users with a request in one period (`<period>:<start>`), a free one too, so the
    /// standings know whose spend to read. A sorted set (its scores 0) since it held each
    /// user's spend as the score once; a member is only ever added.
    pub fn ranking(&self, period: &str, start: i64) -> String {
        format!("{}rank:{period}:{start}", self.prefix)
    }

    /// One user's hourly rollup (the hour's start, Unix seconds).
    pub fn user_hour(&self, slot: &str, user: &str, hour: i64) -> String {
        self.account(slot, user, &format!("hour:{hour}"))
    }

    /// Everyone's hourly rollup.
    pub fn hour(&self, hour: i64) -> String {
        format!("{}hour:{hour}", self.prefix)
    }

    pub fn records(&self) -> String {
        format!("{}records", self.prefix)
    }

    /// On a Cluster: account → the slot its keys are in (the root of its chain), for reads
    /// that start from an account alone (`/admin/usage`, the standings, a user's hours).
    pub fn slots(&self) -> String {
        format!("{}slots", self.prefix)
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

/// Every level of a request (key, user, team) is one account: three keys each, in level
/// order. KEYS: (reserved, holds, spend) per level. ARGV: member, amount, ttl ms, then the
/// budget of each level ('' = none). All levels reserve or none does.
/// Returns {1 reserved | 0 refused, the refusing level (1-based; 0 when reserved), then
/// spent and reserved-before-this of each level}.
const RESERVE: &str = r"
local now = now_ms()
local levels = #KEYS / 3
local seen = {}
local refused = 0
for i = 1, levels do
  local k = (i - 1) * 3
  prune(KEYS[k + 1], KEYS[k + 2], now)
  local spent = str(redis.call('HGET', KEYS[k + 3], 'spent'))
  local reserved = str(redis.call('GET', KEYS[k + 1]))
  seen[#seen + 1] = spent
  seen[#seen + 1] = reserved
  local budget = ARGV[3 + i]
  if refused == 0 and budget ~= '' and not le(add(add(parts(spent), parts(reserved)), parts(ARGV[2])), parts(budget)) then
    refused = i
  end
end
if refused > 0 then
  return {0, refused, unpack(seen)}
end
local ttl = tonumber(ARGV[3])
for i = 1, levels do
  local k = (i - 1) * 3
  -- A member already there would be counted twice in `reserved` and freed once: refuse it.
  if redis.call('ZSCORE', KEYS[k + 2], ARGV[1]) then
    return redis.error_reply('duplicate reservation id ' .. ARGV[1])
  end
end
for i = 1, levels do
  local k = (i - 1) * 3
  redis.call('ZADD', KEYS[k + 2], now + ttl, ARGV[1])
  redis.call('INCRBY', KEYS[k + 1], ARGV[2])
  -- Both keys outlive their last reservation, then vanish together with an idle account.
  redis.call('PEXPIRE', KEYS[k + 1], ttl + 60000)
  redis.call('PEXPIRE', KEYS[k + 2], ttl + 60000)
end
return {1, 0, unpack(seen)}
";

/// KEYS: settled, the user's hour, (reserved, holds, spend) per level, then, on one Redis
/// (not a Cluster, where they are in other slots and written after the script), records, the
/// user's period ranking and everyone's hour.
/// ARGV: member ('' = the reservation was local), settlement id, cost, prompt tokens,
/// completion tokens, backend, record JSON, max records, dedupe window ms, the user's name,
/// the ranking's expire-at, '1' if the request failed (status >= 400) else '0', latency ms,
/// the user's hour expire-at, everyone's hour expire-at, then each level's spend expire-at
/// (unix s, '' = never).
/// Returns 1 when applied, 0 when this settlement was applied before (so the hours, like the
/// spend, count a retried settlement once).
const SETTLE: &str = r"
local now = now_ms()
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[9]))
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
local levels = #ARGV - 15
local h = ARGV[6] .. '/'
local function hour(key, expire_at)
  redis.call('HINCRBY', key, h .. 'requests', 1)
  if ARGV[12] == '1' then redis.call('HINCRBY', key, h .. 'errors', 1) end
  redis.call('HINCRBY', key, h .. 'spent', ARGV[3])
  redis.call('HINCRBY', key, h .. 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', key, h .. 'completion_tokens', ARGV[5])
  redis.call('HINCRBY', key, h .. 'latency_ms', ARGV[13])
  redis.call('EXPIREAT', key, expire_at)
end
hour(KEYS[2], ARGV[14])
local b = 'b/' .. ARGV[6] .. '/'
for i = 1, levels do
  local k = 2 + (i - 1) * 3
  if ARGV[1] ~= '' and redis.call('ZREM', KEYS[k + 2], ARGV[1]) == 1 then
    redis.call('DECRBY', KEYS[k + 1], string.match(ARGV[1], '(%d+)$'))
  end
  local spend = KEYS[k + 3]
  redis.call('HINCRBY', spend, 'spent', ARGV[3])
  redis.call('HINCRBY', spend, 'requests', 1)
  redis.call('HINCRBY', spend, 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', spend, 'completion_tokens', ARGV[5])
  redis.call('HINCRBY', spend, b .. 'spent', ARGV[3])
  redis.call('HINCRBY', spend, b .. 'requests', 1)
  redis.call('HINCRBY', spend, b .. 'prompt_tokens', ARGV[4])
  redis.call('HINCRBY', spend, b .. 'completion_tokens', ARGV[5])
  if ARGV[15 + i] ~= '' then redis.call('EXPIREAT', spend, ARGV[15 + i]) end
end
local g = 2 + levels * 3
if #KEYS > g then
  redis.call('LPUSH', KEYS[g + 1], ARGV[7])
  redis.call('LTRIM', KEYS[g + 1], 0, tonumber(ARGV[8]) - 1)
  -- Unconditional, a cost of 0 too: a user whose requests were all free is still in the standings.
  -- Membership only (`NX`): a score kept as the spend moved the user within a set of every user
  -- on each request, a skiplist walk of cold nodes with thousands of users.
  redis.call('ZADD', KEYS[g + 2], 'NX', 0, ARGV[10])
  if ARGV[11] ~= '' then redis.call('EXPIREAT', KEYS[g + 2], ARGV[11]) end
  hour(KEYS[g + 3], ARGV[15])
end
return 1
";

/// KEYS: (reserved, holds) per level. ARGV: member. Returns 1 when it was still held.
const RELEASE: &str = r"
local held = 0
for i = 1, #KEYS / 2 do
  if redis.call('ZREM', KEYS[2 * i], ARGV[1]) == 1 then
    redis.call('DECRBY', KEYS[2 * i - 1], string.match(ARGV[1], '(%d+)$'))
    held = 1
  end
end
return held
";

/// KEYS: reserved, holds. ARGV: ttl ms, 'renew' | 'restore', members. Pushes back the expiry
/// of this replica's reservations that are still open (a long stream); one already expired
/// stays gone, since its amount has left the reserved sum. 'restore' (after a failover) also
/// adds back the members the new primary lacks, with their amounts.
const RENEW: &str = r"
local now = now_ms()
prune(KEYS[1], KEYS[2], now)
local ttl = tonumber(ARGV[1])
local restore = ARGV[2] == 'restore'
for i = 3, #ARGV do
  if restore and redis.call('ZADD', KEYS[2], 'NX', now + ttl, ARGV[i]) == 1 then
    redis.call('INCRBY', KEYS[1], string.match(ARGV[i], '(%d+)$'))
  else
    redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[i])
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl + 60000)
  redis.call('PEXPIRE', KEYS[2], ttl + 60000)
end
return 1
";

/// KEYS: (reserved, holds, spend) per level. ARGV: 'all' for every spend field of the first
/// level, else only `spent`. Returns {{reserved, spent} per level..., {field, value, ...}
/// when 'all'}.
const READ: &str = r"
local now = now_ms()
local out = {}
for i = 1, #KEYS / 3 do
  local k = (i - 1) * 3
  prune(KEYS[k + 1], KEYS[k + 2], now)
  out[#out + 1] = {str(redis.call('GET', KEYS[k + 1])), str(redis.call('HGET', KEYS[k + 3], 'spent'))}
end
if ARGV[1] == 'all' then
  out[#out + 1] = redis.call('HGETALL', KEYS[3])
end
return out
";

/// Token buckets refilling continuously at capacity per minute, as in `ratelimit`, for every
/// level of a request at once (a key's and its user's): all admit or none takes anything.
/// KEYS: rate per level. ARGV: tokens, then rpm and tpm per level ('' = none).
/// Returns {1, '', 0, 0} when admitted, else {0, 'requests' | 'tokens', retry after ms, level}.
const RATE: &str = r"
local now = now_ms()
local want_all = tonumber(ARGV[1])
local plans = {}
for i = 1, #KEYS do
  local state = redis.call('HMGET', KEYS[i], 'r', 't', 'ts')
  local elapsed = math.max(0, now - (tonumber(state[3]) or now)) / 60000
  local rpm, tpm = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local r, t, want
  if rpm then
    r = math.min(rpm, (tonumber(state[1]) or rpm) + elapsed * rpm)
    if r < 1 then return {0, 'requests', math.ceil((1 - r) * 60000 / rpm), i} end
  end
  if tpm then
    -- A request bigger than the whole allowance waits for a full bucket, not forever.
    want = math.min(want_all, tpm)
    t = math.min(tpm, (tonumber(state[2]) or tpm) + elapsed * tpm)
    if t < want then return {0, 'tokens', math.ceil((want - t) * 60000 / tpm), i} end
  end
  plans[i] = {r, t, want}
end
for i = 1, #KEYS do
  local r, t, want = plans[i][1], plans[i][2], plans[i][3]
  if r then redis.call('HSET', KEYS[i], 'r', tostring(r - 1)) end
  if t then redis.call('HSET', KEYS[i], 't', tostring(t - want)) end
  redis.call('HSET', KEYS[i], 'ts', now)
  -- After a minute idle a bucket is full again: the same as no key at all.
  redis.call('PEXPIRE', KEYS[i], 120000)
end
return {1, '', 0, 0}
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
