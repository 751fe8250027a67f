//! The Redis directory: teams, users and keys in the ledger's Redis, shared by every replica,
//! with a change feed that tells every replica what to drop from its key cache.
//!
//! Keys (`T` is the ledger's `key_prefix` followed by `{tenants}:`; the hash tag keeps them in
//! one Redis Cluster slot, so each script below touches one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `T team:<name>` | hash | `budget_pico`, `budget_period`, `created_at` |
//! | `T user:<name>` | hash | `plan`, `team`, `overrides` (JSON), `metrics`, `created_at` |
//! | `T users`, `T plan:<plan>`, `T team-users:<team>` | sorted sets (score 0, by name) | every user; a plan's; a team's: pages by name |
//! | `T metrics-users` | set | users with per-user metric series |
//! | `T key:<id>` | hash | the key's fields (`sha256` in hex) |
//! | `T keyhash:<sha256 hex>` | string | the key's id |
//! | `T user-keys:<name>` | set | the user's key ids |
//! | `T changes` | stream | `kind` (`key-new`, `key`, `user`, `team`) and `name` (a key's hash in hex) of every change |
//!
//! Every write is one script: it checks, changes and appends to the change feed in one atomic
//! step. Replicas read the feed every [`FEED_EVERY`] and drop what changed from their caches:
//! a change made on one replica is seen by all within a second, with no reload.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::model::{ApiKey, Member, Team};
use super::overrides;
use super::store::{
    Change, ChangeFeed, Changes, Directory, KeyChain, StoreError, StoreResult, TeamDeletion, UserQuery,
};
use crate::config::BudgetPeriod;
use crate::cost::Usd;
use crate::ledger::redis::{Op, Store};
use crate::ledger::{period, BoxFuture, LedgerError};

/// How often each replica reads the change feed.
pub const FEED_EVERY: Duration = Duration::from_millis(200);
/// Changes kept in the feed (approximately): far more than a replica reads between two polls.
const FEED_LENGTH: u32 = 100_000;

const COMMON: &str = r"
local T = ARGV[1]
local function changed(kind, name)
  redis.call('XADD', T .. 'changes', 'MAXLEN', '~', ARGV[2], '*', 'kind', kind, 'name', name)
end
local function set_or_clear(key, field, value)
  if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end
";

/// ARGV: T, feed length, name, budget pico ('' none), period, created. Returns 1, or 0 if taken.
const INSERT_TEAM: &str = r"
local key = T .. 'team:' .. ARGV[3]
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'budget_period', ARGV[5], 'created_at', ARGV[6])
set_or_clear(key, 'budget_pico', ARGV[4])
changed('team', ARGV[3])
return 1
";

/// ARGV: T, feed length, name, budget pico ('' none), period. Returns 1, or 0 if absent.
const REPLACE_TEAM: &str = r"
local key = T .. 'team:' .. ARGV[3]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, 'budget_period', ARGV[5])
set_or_clear(key, 'budget_pico', ARGV[4])
changed('team', ARGV[3])
return 1
";

/// ARGV: T, feed length, name. Returns -1 absent, 0 deleted, or its member count.
const DELETE_TEAM: &str = r"
local key = T .. 'team:' .. ARGV[3]
if redis.call('EXISTS', key) == 0 then return -1 end
local members = redis.call('ZCARD', T .. 'team-users:' .. ARGV[3])
if members > 0 then return members end
redis.call('DEL', key)
changed('team', ARGV[3])
return 0
";

/// Puts user ARGV[3] in its plan's and team's sets and the metrics set.
const MEMBERSHIP: &str = r"
local function join(name, plan, team, metrics)
  redis.call('ZADD', T .. 'users', 0, name)
  redis.call('ZADD', T .. 'plan:' .. plan, 0, name)
  if team ~= '' then redis.call('ZADD', T .. 'team-users:' .. team, 0, name) end
  if metrics == '1' then redis.call('SADD', T .. 'metrics-users', name) else redis.call('SREM', T .. 'metrics-users', name) end
end
local function leave(name, plan, team)
  if plan then redis.call('ZREM', T .. 'plan:' .. plan, name) end
  if team then redis.call('ZREM', T .. 'team-users:' .. team, name) end
end
";

/// ARGV: T, feed length, name, plan, team ('' none), overrides, metrics (0/1), created.
/// Returns 1, or 0 if taken.
const INSERT_USER: &str = r"
local key = T .. 'user:' .. ARGV[3]
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'plan', ARGV[4], 'overrides', ARGV[6], 'metrics', ARGV[7], 'created_at', ARGV[8])
set_or_clear(key, 'team', ARGV[5])
join(ARGV[3], ARGV[4], ARGV[5], ARGV[7])
changed('user', ARGV[3])
return 1
";

/// ARGV: T, feed length, name, plan, team ('' none), overrides, metrics. Returns 1, or 0 if
/// absent.
const REPLACE_USER: &str = r"
local key = T .. 'user:' .. ARGV[3]
if redis.call('EXISTS', key) == 0 then return 0 end
local old = redis.call('HMGET', key, 'plan', 'team')
leave(ARGV[3], old[1], old[2])
redis.call('HSET', key, 'plan', ARGV[4], 'overrides', ARGV[6], 'metrics', ARGV[7])
set_or_clear(key, 'team', ARGV[5])
join(ARGV[3], ARGV[4], ARGV[5], ARGV[7])
changed('user', ARGV[3])
return 1
";

/// ARGV: T, feed length, name, now. Returns {0} if absent, else {1, hashes of revoked keys...}.
const DELETE_USER: &str = r"
local key = T .. 'user:' .. ARGV[3]
if redis.call('EXISTS', key) == 0 then return {0} end
local old = redis.call('HMGET', key, 'plan', 'team')
leave(ARGV[3], old[1], old[2])
redis.call('ZREM', T .. 'users', ARGV[3])
redis.call('SREM', T .. 'metrics-users', ARGV[3])
redis.call('DEL', key)
local out = {1}
for _, id in ipairs(redis.call('SMEMBERS', T .. 'user-keys:' .. ARGV[3])) do
  local k = T .. 'key:' .. id
  if redis.call('HEXISTS', k, 'revoked_at') == 0 then
    redis.call('HSET', k, 'revoked_at', ARGV[4])
    local sha = redis.call('HGET', k, 'sha256')
    if sha then
      out[#out + 1] = sha
      changed('key', sha)
    end
  end
end
changed('user', ARGV[3])
return out
";

/// ARGV: T, feed length, id, sha256 hex, user, then field/value pairs ('' values left out).
/// Returns 1, or 0 if the id or the hash is taken.
const INSERT_KEY: &str = r"
local key = T .. 'key:' .. ARGV[3]
if redis.call('EXISTS', key) == 1 then return 0 end
if redis.call('SETNX', T .. 'keyhash:' .. ARGV[4], ARGV[3]) == 0 then return 0 end
redis.call('HSET', key, 'id', ARGV[3], 'sha256', ARGV[4], 'user', ARGV[5])
for i = 6, #ARGV, 2 do set_or_clear(key, ARGV[i], ARGV[i + 1]) end
redis.call('SADD', T .. 'user-keys:' .. ARGV[5], ARGV[3])
changed('key-new', ARGV[4])
return 1
";

/// ARGV: T, feed length, id, then field/value pairs ('' clears). Returns 1, or 0 if absent.
const REPLACE_KEY: &str = r"
local key = T .. 'key:' .. ARGV[3]
if redis.call('EXISTS', key) == 0 then return 0 end
for i = 4, #ARGV, 2 do set_or_clear(key, ARGV[i], ARGV[i + 1]) end
changed('key', redis.call('HGET', key, 'sha256'))
return 1
";

/// ARGV: T, sha256 hex. Returns the key's fields (HGETALL), or an empty list.
const KEY_BY_HASH: &str = r"
local id = redis.call('GET', ARGV[1] .. 'keyhash:' .. ARGV[2])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. 'key:' .. id)
";

/// ARGV: T, key hash (hex). Returns {} for an unknown key, else the key's, its user's and the
/// user's team's fields ({} for one that is gone): a first sight in one round trip.
const KEY_CHAIN: &str = r"
local T = ARGV[1]
local id = redis.call('GET', T .. 'keyhash:' .. ARGV[2])
if not id then return {} end
local key = redis.call('HGETALL', T .. 'key:' .. id)
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
local user, team = {}, {}
local user_name = field(key, 'user')
if user_name then user = redis.call('HGETALL', T .. 'user:' .. user_name) end
local team_name = field(user, 'team')
if team_name then team = redis.call('HGETALL', T .. 'team:' .. team_name) end
return {key, user, team}
";

/// ARGV: T, then id/at pairs. Keeps the latest use of each existing key.
const TOUCH_KEYS: &str = r"
for i = 2, #ARGV, 2 do
  local key = ARGV[1] .. 'key:' .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then
    local last = tonumber(redis.call('HGET', key, 'last_used_at') or '0')
    if tonumber(ARGV[i + 1]) > last then redis.call('HSET', key, 'last_used_at', ARGV[i + 1]) end
  end
end
return 1
";

struct Scripts {
    insert_team: Script,
    replace_team: Script,
    delete_team: Script,
    insert_user: Script,
    replace_user: Script,
    delete_user: Script,
    insert_key: Script,
    replace_key: Script,
    key_by_hash: Script,
    key_chain: Script,
    touch_keys: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        let write = |body: &str| Script::new(&format!("{COMMON}{MEMBERSHIP}{body}"));
        Self {
            insert_team: write(INSERT_TEAM),
            replace_team: write(REPLACE_TEAM),
            delete_team: write(DELETE_TEAM),
            insert_user: write(INSERT_USER),
            replace_user: write(REPLACE_USER),
            delete_user: write(DELETE_USER),
            insert_key: write(INSERT_KEY),
            replace_key: write(REPLACE_KEY),
            key_by_hash: Script::new(KEY_BY_HASH),
            key_chain: Script::new(KEY_CHAIN),
            touch_keys: Script::new(TOUCH_KEYS),
        }
    }
}

pub struct RedisDirectory {
    store: Arc<Store>,
    scripts: Scripts,
    /// `key_prefix` + `{tenants}:`
    prefix: String,
    /// The one key every script declares (it builds the others from the prefix): on a Redis
    /// Cluster it routes the script to the node of the `{tenants}` slot.
    anchor: [String; 1],
}

impl std::fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectory").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unavailable(e: LedgerError) -> StoreError {
    StoreError::Unavailable(e)
}

/// A hash's fields as pairs, looked up by name.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn new(flat: Vec<String>) -> Self {
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Self(pairs)
    }

    fn get(&self, field: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == field).map(|(_, v)| v.as_str())
    }

    fn int(&self, field: &str) -> Option<i64> {
        self.get(field).and_then(|v| v.parse().ok())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn text(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn team_from(name: &str, f: &Fields) -> Team {
    Team {
        name: name.to_owned(),
        budget_usd: f.int("budget_pico").map(Usd::from_pico),
        budget_period: f.get("budget_period").and_then(BudgetPeriod::parse).unwrap_or(BudgetPeriod::Month),
        created_at: f.int("created_at").unwrap_or(0),
    }
}

fn user_from(name: &str, f: &Fields) -> Member {
    let overrides = f
        .get("overrides")
        .and_then(|t| serde_json::from_str(t).ok())
        .and_then(|v| overrides::from_json(&v).ok())
        .unwrap_or_default();
    Member {
        name: name.to_owned(),
        plan: f.get("plan").unwrap_or_default().to_owned(),
        team: f.get("team").map(str::to_owned),
        overrides,
        metrics: f.get("metrics") == Some("1"),
        created_at: f.int("created_at").unwrap_or(0),
    }
}

fn key_from(f: &Fields) -> Option<ApiKey> {
    let sha256 = crate::config::parse_sha256(f.get("sha256")?)?;
    Some(ApiKey {
        id: f.get("id")?.to_owned(),
        user: f.get("user")?.to_owned(),
        sha256,
        prefix: f.get("prefix").unwrap_or_default().to_owned(),
        label: f.get("label").map(str::to_owned),
        created_at: f.int("created_at").unwrap_or(0),
        expires_at: f.int("expires_at"),
        revoked_at: f.int("revoked_at"),
        last_used_at: f.int("last_used_at"),
        budget_usd: f.int("budget_pico").map(Usd::from_pico),
        budget_period: f.get("budget_period").and_then(BudgetPeriod::parse).unwrap_or(BudgetPeriod::Total),
        rpm: f.int("rpm").and_then(|v| u32::try_from(v).ok()),
        end_users: f.get("end_users").map(str::to_owned),
        lineage: f.get("lineage").or(f.get("id"))?.to_owned(),
    })
}

/// The key's mutable fields, as field/value pairs ('' clears).
fn key_fields(k: &ApiKey) -> Vec<String> {
    vec![
        "prefix".into(),
        k.prefix.clone(),
        "label".into(),
        text(k.label.as_ref()),
        "created_at".into(),
        k.created_at.to_string(),
        "expires_at".into(),
        text(k.expires_at),
        "revoked_at".into(),
        text(k.revoked_at),
        "budget_pico".into(),
        text(k.budget_usd.map(Usd::pico)),
        "budget_period".into(),
        period::name(k.budget_period).into(),
        "rpm".into(),
        text(k.rpm),
        "end_users".into(),
        text(k.end_users.as_ref()),
        "lineage".into(),
        k.lineage.clone(),
    ]
}

impl RedisDirectory {
    pub fn new(store: Arc<Store>) -> Self {
        let prefix = format!("{}{{tenants}}:", store.keys.prefix());
        let anchor = [format!("{prefix}changes")];
        Self { store, scripts: Scripts::default(), prefix, anchor }
    }

    /// ARGV for a write script: the prefix and the feed's length first.
    fn args(&self, rest: impl IntoIterator<Item = String>) -> Vec<String> {
        [self.prefix.clone(), FEED_LENGTH.to_string()].into_iter().chain(rest).collect()
    }

    async fn write<T: redis::FromRedisValue>(&self, script: &Script, args: Vec<String>) -> StoreResult<T> {
        self.store.script(Op::Tenants, script, &self.anchor, &args).await.map_err(unavailable)
    }

    async fn hash(&self, key: String) -> StoreResult<Fields> {
        let mut command = redis::cmd("HGETALL");
        command.arg(key);
        self.store.command::<Vec<String>>(Op::Tenants, command).await.map(Fields::new).map_err(unavailable)
    }

    async fn members(&self, set: &str, after: Option<&str>, count: usize) -> StoreResult<Vec<String>> {
        let mut command = redis::cmd("ZRANGEBYLEX");
        let from = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        command.arg(format!("{}{set}", self.prefix)).arg(from).arg("+").arg("LIMIT").arg(0).arg(count);
        self.store.command(Op::Tenants, command).await.map_err(unavailable)
    }

    /// The feed's last id now: a replica starting reads what comes after it.
    async fn feed_position(&self) -> StoreResult<String> {
        let mut command = redis::cmd("XREVRANGE");
        command.arg(format!("{}changes", self.prefix)).arg("+").arg("-").arg("COUNT").arg(1);
        let last: Vec<(String, Vec<(String, String)>)> =
            self.store.command(Op::Tenants, command).await.map_err(unavailable)?;
        Ok(last.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    /// Changes after `position`, and the position after them. `None` when the feed no longer
    /// holds `position` (Redis lost it): the caller must assume anything changed.
    async fn read_changes(&self, position: &str) -> StoreResult<Option<Changes>> {
        let stream = format!("{}changes", self.prefix);
        let mut command = redis::cmd("XREAD");
        command.arg("COUNT").arg(10_000).arg("STREAMS").arg(&stream).arg(position);
        let answer: Option<Vec<(String, StreamEntries)>> =
            self.store.command(Op::Tenants, command).await.map_err(unavailable)?;
        let entries = answer.into_iter().flatten().flat_map(|(_, entries)| entries).collect::<Vec<_>>();
        if entries.is_empty() {
            // Nothing new; but a feed that restarted (a Redis that lost its data) ends before
            // where this replica was.
            let last = self.feed_position().await?;
            return Ok(
                (!newer(position, &last)).then(|| Changes { changes: Vec::new(), position: position.to_owned() })
            );
        }
        let mut next = position.to_owned();
        let mut changes = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            next = id;
            let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            match (get("kind"), get("name")) {
                (Some("key"), Some(hex)) => changes.extend(crate::config::parse_sha256(hex).map(Change::Key)),
                (Some("key-new"), Some(hex)) => changes.extend(crate::config::parse_sha256(hex).map(Change::NewKey)),
                (Some("user"), Some(name)) => changes.push(Change::User(name.to_owned())),
                (Some("team"), Some(name)) => changes.push(Change::Team(name.to_owned())),
                _ => {}
            }
        }
        Ok(Some(Changes { changes, position: next }))
    }
}

/// A stream's entries as `XREAD` answers them: id, then field/value pairs.
type StreamEntries = Vec<(String, Vec<(String, String)>)>;

/// Whether stream id `a` is after `b` (`<ms>-<seq>`).
fn newer(a: &str, b: &str) -> bool {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a) > parse(b)
}

impl Directory for RedisDirectory {
    fn insert_team(&self, team: Team) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let args = self.args([
                team.name.clone(),
                text(team.budget_usd.map(Usd::pico)),
                period::name(team.budget_period).into(),
                team.created_at.to_string(),
            ]);
            match self.write::<i64>(&self.scripts.insert_team, args).await? {
                1 => Ok(()),
                _ => Err(StoreError::Conflict(team.name)),
            }
        })
    }

    fn team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Team>>> {
        Box::pin(async move {
            let fields = self.hash(format!("{}team:{name}", self.prefix)).await?;
            Ok((!fields.is_empty()).then(|| team_from(name, &fields)))
        })
    }

    fn replace_team(&self, team: Team) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let args =
                self.args([team.name, text(team.budget_usd.map(Usd::pico)), period::name(team.budget_period).into()]);
            Ok(self.write::<i64>(&self.scripts.replace_team, args).await? == 1)
        })
    }

    fn delete_team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<TeamDeletion>> {
        Box::pin(async move {
            Ok(match self.write::<i64>(&self.scripts.delete_team, self.args([name.to_owned()])).await? {
                -1 => TeamDeletion::Absent,
                0 => TeamDeletion::Deleted,
                n => TeamDeletion::HasMembers(u64::try_from(n).unwrap_or(0)),
            })
        })
    }

    fn insert_user(&self, user: Member) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let args = self.args([
                user.name.clone(),
                user.plan,
                text(user.team),
                overrides::to_json(&user.overrides).to_string(),
                if user.metrics { "1" } else { "0" }.into(),
                user.created_at.to_string(),
            ]);
            match self.write::<i64>(&self.scripts.insert_user, args).await? {
                1 => Ok(()),
                _ => Err(StoreError::Conflict(user.name)),
            }
        })
    }

    fn user<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Member>>> {
        Box::pin(async move {
            let fields = self.hash(format!("{}user:{name}", self.prefix)).await?;
            Ok((!fields.is_empty()).then(|| user_from(name, &fields)))
        })
    }

    fn replace_user(&self, user: Member) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let args = self.args([
                user.name,
                user.plan,
                text(user.team),
                overrides::to_json(&user.overrides).to_string(),
                if user.metrics { "1" } else { "0" }.into(),
            ]);
            Ok(self.write::<i64>(&self.scripts.replace_user, args).await? == 1)
        })
    }

    fn delete_user<'a>(&'a self, name: &'a str, now: i64) -> BoxFuture<'a, StoreResult<Option<Vec<[u8; 32]>>>> {
        Box::pin(async move {
            let args = self.args([name.to_owned(), now.to_string()]);
            let answer: Vec<redis::Value> = self.write(&self.scripts.delete_user, args).await?;
            let mut it = answer.into_iter();
            let found: i64 = it.next().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or(0);
            if found == 0 {
                return Ok(None);
            }
            let hashes = it
                .filter_map(|v| redis::from_redis_value::<String>(v).ok())
                .filter_map(|hex| crate::config::parse_sha256(&hex))
                .collect();
            Ok(Some(hashes))
        })
    }

    fn users<'a>(&'a self, query: &'a UserQuery) -> BoxFuture<'a, StoreResult<Vec<Member>>> {
        Box::pin(async move {
            // The narrowest set first; the other filter is applied to what it gives.
            let set = match (&query.team, &query.plan) {
                (Some(team), _) => format!("team-users:{team}"),
                (None, Some(plan)) => format!("plan:{plan}"),
                (None, None) => "users".to_owned(),
            };
            let mut out = Vec::new();
            let mut after = query.after.clone();
            while out.len() < query.limit {
                let batch = (query.limit - out.len()).clamp(1, 1000);
                let names = self.members(&set, after.as_deref(), batch).await?;
                if names.is_empty() {
                    break;
                }
                // The page's users in one round trip: one each made a million users' listing
                // (the report's) a million round trips.
                let mut pipeline = redis::pipe();
                for name in &names {
                    pipeline.cmd("HGETALL").arg(format!("{}user:{name}", self.prefix));
                }
                let hashes: Vec<Vec<String>> = self.store.pipeline(Op::Tenants, pipeline).await.map_err(unavailable)?;
                for (name, fields) in names.iter().zip(hashes) {
                    let fields = Fields::new(fields);
                    let user = user_from(name, &fields);
                    if !fields.is_empty() && query.plan.as_deref().is_none_or(|p| user.plan == p) {
                        out.push(user);
                    }
                }
                after = names.last().cloned();
                if names.len() < batch {
                    break;
                }
            }
            out.truncate(query.limit);
            Ok(out)
        })
    }

    fn count_metrics_users(&self) -> BoxFuture<'_, StoreResult<u64>> {
        Box::pin(async move {
            let mut command = redis::cmd("SCARD");
            command.arg(format!("{}metrics-users", self.prefix));
            self.store.command(Op::Tenants, command).await.map_err(unavailable)
        })
    }

    fn insert_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let mut rest = vec![key.id.clone(), crate::config::hex(&key.sha256), key.user.clone()];
            rest.extend(key_fields(&key));
            match self.write::<i64>(&self.scripts.insert_key, self.args(rest)).await? {
                1 => Ok(()),
                _ => Err(StoreError::Conflict(key.id)),
            }
        })
    }

    fn key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        Box::pin(async move { Ok(key_from(&self.hash(format!("{}key:{id}", self.prefix)).await?)) })
    }

    fn key_by_hash<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        Box::pin(async move {
            let args = [self.prefix.clone(), crate::config::hex(sha256)];
            let flat: Vec<String> = self
                .store
                .script(Op::Tenants, &self.scripts.key_by_hash, &self.anchor, &args)
                .await
                .map_err(unavailable)?;
            Ok(key_from(&Fields::new(flat)))
        })
    }

    fn key_chain<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<KeyChain>>> {
        Box::pin(async move {
            let args = [self.prefix.clone(), crate::config::hex(sha256)];
            let parts: Vec<Vec<String>> = self
                .store
                .script(Op::Tenants, &self.scripts.key_chain, &self.anchor, &args)
                .await
                .map_err(unavailable)?;
            let mut parts = parts.into_iter().map(Fields::new);
            let Some(key) = parts.next().as_ref().and_then(key_from) else { return Ok(None) };
            let user = parts.next().filter(|f| !f.is_empty()).map(|f| user_from(&key.user, &f));
            let team = match (parts.next().filter(|f| !f.is_empty()), user.as_ref().and_then(|u| u.team.as_deref())) {
                (Some(fields), Some(name)) => Some(team_from(name, &fields)),
                _ => None,
            };
            Ok(Some(KeyChain { key, user, team }))
        })
    }

    fn keys_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<ApiKey>>> {
        Box::pin(async move {
            let mut command = redis::cmd("SMEMBERS");
            command.arg(format!("{}user-keys:{user}", self.prefix));
            let ids: Vec<String> = self.store.command(Op::Tenants, command).await.map_err(unavailable)?;
            let mut keys = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(key) = key_from(&self.hash(format!("{}key:{id}", self.prefix)).await?) {
                    keys.push(key);
                }
            }
            keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(keys)
        })
    }

    fn replace_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<bool>> {
        Box::pin(async move {
            let mut rest = vec![key.id.clone()];
            rest.extend(key_fields(&key));
            Ok(self.write::<i64>(&self.scripts.replace_key, self.args(rest)).await? == 1)
        })
    }

    fn touch_keys(&self, used: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let mut args = vec![self.prefix.clone()];
            for (id, at) in used {
                args.push(id);
                args.push(at.to_string());
            }
            self.store
                .script::<i64>(Op::Tenants, &self.scripts.touch_keys, &self.anchor, &args)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn feed(&self) -> Option<&dyn ChangeFeed> {
        Some(self)
    }
}

impl ChangeFeed for RedisDirectory {
    fn position(&self) -> BoxFuture<'_, StoreResult<String>> {
        Box::pin(self.feed_position())
    }

    fn changes_after<'a>(&'a self, position: &'a str) -> BoxFuture<'a, StoreResult<Option<Changes>>> {
        Box::pin(self.read_changes(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(newer("1700000000001-0", "1700000000000-5"));
        assert!(newer("1700000000000-6", "1700000000000-5"));
        assert!(!newer("0-0", "1700000000000-5"));
        assert!(!newer("5-1", "5-1"));
    }
}
