//! The Redis ledger: budgets, reservations, spend and rate limits shared by every replica.
//!
//! Each operation is one server-side script ([`scripts`]), run with `EVALSHA`: a reservation
//! checks `spent + reserved + estimate <= budget` and adds to `reserved` in one atomic step
//! across replicas, a settlement swaps a reservation for its cost, a release drops it.
//! Reservations expire on Redis's clock, a TTL longer than the longest backend timeout
//! ([`RedisLedger::requests_last_at_most`]); the replica that holds one pushes its expiry back
//! while its request lives (a stream may outlive any timeout), so only a dead replica's
//! reservations expire, and within one TTL.
//!
//! `settle` and `release` run when a response ends or is dropped, so they never wait: they
//! are applied on their own task, and what Redis cannot take goes to a backlog retried until
//! it lands ([`store`]). Settlements carry an id, remembered by Redis for a while, so a retry
//! of one whose answer was lost is not charged twice.
//!
//! When Redis cannot be reached, `on_ledger_error` decides: `fail-closed` answers 503
//! `ledger_unavailable` (nothing is served unmetered), `fail-open` admits against what this
//! replica last knew ([`local`]), and its settlements reach Redis when it is back.

mod limits;
mod local;
mod primary;
mod replay;
pub mod scripts;
mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;

pub use limits::RedisLimiter;
pub use store::{Op, Store};

use smallvec::SmallVec;

use super::rollup::{self, HourQuery, HourRow, Sums, HOUR_S};
use super::{
    period, Account, BoxFuture, Budget, Budgets, Ledger, LedgerError, Left, RequestRecord, Reserve, Standing, Totals,
};
use crate::config::{BudgetPeriod, OnLedgerError};
use crate::cost::Usd;
use crate::telemetry::RequestId;
use scripts::{DEDUPE_WINDOW_MS, MAX_RECORDS};
use store::{Write, WriteScript};

/// Reservation ids with this bit were made locally while Redis was away (fail-open).
const LOCAL: u64 = 1 << 63;
/// Added to the longest request timeout to make the reservation TTL: covers the settlement's
/// own trip to Redis and a queue before it.
const TTL_MARGIN: Duration = Duration::from_secs(60);
/// Keys read per round trip by `hourly` and `standings`: each trip stays well within the
/// operation timeout, and a month of hours is one trip.
const KEYS_PER_TRIP: usize = 1000;
/// The longest window `hourly` reads (about four years: more than the dashboard's longest,
/// 1500 days): a window reaching far into the future has no expiry to bound it.
const MAX_WINDOW_S: i64 = 4 * 366 * 86_400;
/// Members asked of a ranking per `ZSCAN` step (a hint: Redis may answer more or fewer).
const SCAN_COUNT: usize = 1000;
/// The latest expire-at `EXPIREAT` takes (Redis refuses one whose milliseconds overflow): a
/// huge retention must not make a settlement fail half-applied.
const MAX_EXPIRE_AT: i64 = i64::MAX / 1000;

pub struct RedisLedger {
    store: Arc<Store>,
    /// Makes reservation ids unique across replicas (and restarts of one).
    replica: String,
    next_id: AtomicU64,
    held: Arc<Held>,
    fixed_ttl: bool,
    retention: Duration,
    /// On a Redis Cluster: keys in their chain root's slot, and the root of each account this
    /// replica has checked against [`Keys::slots`](scripts::Keys::slots) (moving its spend when
    /// the root changed).
    cluster: Option<DashMap<Arc<str>, Arc<str>>>,
}

/// The (slot, account) of a reservation's levels, and its member in each one's `holds`.
type Hold = (SmallVec<[(Arc<str>, Arc<str>); 3]>, String);

/// This replica's open Redis reservations, kept alive by [`renew_loop`].
#[derive(Debug, Default)]
struct Held {
    /// Reservation id → the (slot, account) of its levels and its member in each `holds`.
    open: DashMap<u64, Hold>,
    /// Reservation lifetime; fixed by `reservation_ttl_s`, else follows the backends' timeouts.
    ttl_ms: AtomicU64,
}

/// Every third of a TTL, pushes back the expiry of the reservations still open here; right
/// after a failover, restores those the new primary lacks (the old one had not replicated
/// them), so the requests in flight keep their budget held.
async fn renew_loop(store: Weak<Store>, held: Weak<Held>) {
    let mut last_round = tokio::time::Instant::now();
    loop {
        let (Some(strong), Some(held_now)) = (store.upgrade(), held.upgrade()) else { return };
        let pause = Duration::from_millis(held_now.ttl_ms.load(Ordering::Relaxed) / 3)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        drop(held_now);
        // Waits a second at most while holding the store: a dropped ledger ends the loop soon.
        let wait = pause.saturating_sub(last_round.elapsed()).min(Duration::from_secs(1));
        let restore = tokio::time::timeout(wait, strong.failed_over.notified()).await.is_ok();
        drop(strong);
        if !restore && last_round.elapsed() < pause {
            continue;
        }
        last_round = tokio::time::Instant::now();
        let (Some(store), Some(held)) = (store.upgrade(), held.upgrade()) else { return };
        let mut by_account: std::collections::HashMap<(Arc<str>, Arc<str>), Vec<String>> =
            std::collections::HashMap::new();
        for entry in &held.open {
            let (accounts, member) = entry.value();
            for account in accounts {
                by_account.entry(account.clone()).or_default().push(member.clone());
            }
        }
        let ttl = held.ttl_ms.load(Ordering::Relaxed).to_string();
        let mode = if restore { "restore" } else { "renew" };
        for ((slot, account), members) in by_account {
            let keys = [store.keys.reserved(&slot, &account), store.keys.holds(&slot, &account)];
            let args: Vec<String> = [ttl.clone(), mode.to_owned()].into_iter().chain(members).collect();
            // A failure is counted and logged by the store; the next round tries again, well
            // before the reservations could expire.
            let _ = store.script::<i64>(Op::Renew, &store.scripts.renew, &keys, &args).await;
        }
    }
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedger").field("replica", &self.replica).finish_non_exhaustive()
    }
}

/// A replica id unique across processes and ledgers: the kernel's random UUID where there is
/// one, mixed with what differs anyway (pid, time, a per-process counter, an address), hashed.
fn replica_id() -> String {
    use sha2::Digest;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let random = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let marker = 0u8;
    let seed =
        format!("{random}:{}:{nanos}:{}:{:p}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), &marker);
    let digest = sha2::Sha256::digest(seed.as_bytes());
    crate::config::hex(&digest[..8])
}

fn parse_usd(text: &str) -> Usd {
    Usd::from_pico(text.parse().unwrap_or(0))
}

fn parse_u64(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

/// A record as stored in Redis (JSON, money in pico-USD).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRecord {
    at_ms: i64,
    user: String,
    route: String,
    backend: String,
    reason: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_pico: i64,
    status: u16,
    latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

impl From<&RequestRecord> for StoredRecord {
    fn from(r: &RequestRecord) -> Self {
        Self {
            at_ms: r.at_ms,
            user: r.user.to_string(),
            route: r.route.to_string(),
            backend: r.backend.to_string(),
            reason: r.reason.to_string(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cost_pico: r.cost.pico(),
            status: r.status,
            latency_ms: r.latency_ms,
            request_id: r.request_id.as_ref().map(|id| id.as_str().to_owned()),
        }
    }
}

impl From<StoredRecord> for RequestRecord {
    fn from(r: StoredRecord) -> Self {
        Self {
            at_ms: r.at_ms,
            user: r.user.into(),
            route: r.route.into(),
            backend: r.backend.into(),
            reason: r.reason.into(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cost: Usd::from_pico(r.cost_pico),
            status: r.status,
            latency_ms: r.latency_ms,
            request_id: r.request_id.as_deref().and_then(RequestId::from_stored),
        }
    }
}

/// Adds one hour's rollup hash (`<backend>/<sum>` fields) to `rows`.
fn add_hour(rows: &mut std::collections::HashMap<(i64, Arc<str>), Sums>, hour: i64, fields: &[String]) {
    let mut by_backend: std::collections::HashMap<&str, Sums> = std::collections::HashMap::new();
    for pair in fields.chunks_exact(2) {
        let (field, value) = (pair[0].as_str(), pair[1].as_str());
        // The sum's name has no `/`; a backend's name may.
        let Some((backend, name)) = field.rsplit_once('/') else { continue };
        let sums = by_backend.entry(backend).or_default();
        match name {
            "requests" => sums.requests = parse_u64(value),
            "errors" => sums.errors = parse_u64(value),
            "spent" => sums.spent = parse_usd(value),
            "prompt_tokens" => sums.prompt_tokens = parse_u64(value),
            "completion_tokens" => sums.completion_tokens = parse_u64(value),
            "latency_ms" => sums.latency_ms = parse_u64(value),
            _ => {}
        }
    }
    for (backend, sums) in by_backend {
        if sums.requests > 0 {
            rows.entry((hour, Arc::from(backend))).or_default().add(&sums);
        }
    }
}

/// The hour starts in `[from, to)`, but none before `oldest` (expired by then) and none more
/// than [`MAX_WINDOW_S`] before `to`.
fn hours_in(from: i64, to: i64, oldest: i64) -> Vec<i64> {
    let from = from.max(oldest).max(to.saturating_sub(MAX_WINDOW_S));
    let Some(first) = from.checked_add(HOUR_S - 1).map(|f| f.div_euclid(HOUR_S) * HOUR_S) else {
        return Vec::new();
    };
    std::iter::successors(Some(first), |h| h.checked_add(HOUR_S)).take_while(|h| *h < to).collect()
}

/// A user's period spend from the fields of its spend hash.
fn account(period_start: i64, reserved: Usd, fields: &[String]) -> Account {
    let mut account = Account::new(period_start);
    account.reserved = reserved;
    for pair in fields.chunks_exact(2) {
        let (field, value) = (pair[0].as_str(), pair[1].as_str());
        let (totals, name) = match field.strip_prefix("b/").and_then(|rest| rest.rsplit_once('/')) {
            Some((backend, name)) => (account.by_backend.entry(backend), name),
            None => (&mut account.totals, field),
        };
        set_total(totals, name, value);
    }
    account
}

fn set_total(totals: &mut Totals, name: &str, value: &str) {
    match name {
        "spent" => totals.spent = parse_usd(value),
        "requests" => totals.requests = parse_u64(value),
        "prompt_tokens" => totals.prompt_tokens = parse_u64(value),
        "completion_tokens" => totals.completion_tokens = parse_u64(value),
        _ => {}
    }
}

impl RedisLedger {
    pub fn new(store: Arc<Store>, retention: Duration, reservation_ttl: Option<Duration>) -> Self {
        let ttl = reservation_ttl.unwrap_or(TTL_MARGIN);
        let held = Arc::new(Held {
            open: DashMap::new(),
            ttl_ms: AtomicU64::new(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        });
        store.runtime.spawn(renew_loop(Arc::downgrade(&store), Arc::downgrade(&held)));
        let cluster = store.is_cluster().then(DashMap::new);
        Self {
            store,
            replica: replica_id(),
            next_id: AtomicU64::new(1),
            held,
            fixed_ttl: reservation_ttl.is_some(),
            retention,
            cluster,
        }
    }

    /// The hash slot `level`'s keys are in: its own on one Redis, the chain root's on a
    /// Cluster.
    fn slot<'a>(&self, budgets: &'a Budgets, level: &'a Budget) -> &'a Arc<str> {
        if self.cluster.is_some() {
            budgets.root()
        } else {
            &level.account
        }
    }

    /// On a Cluster, before a request's first reservation in this replica: checks where each
    /// level's keys were (`Pslots`); a level whose chain root changed (a user moved to or out
    /// of a team) has its spend in the periods holding `now` moved to the new root's slot, so
    /// a team change neither resets nor strands a budget. The move takes the old hash (read
    /// and deleted at once) and adds it to the new one: not atomic across slots, so a
    /// settlement landing on the old keys afterwards (another replica still on the old chain,
    /// for up to a second) stays there, and a reservation made meanwhile does not see it.
    async fn ensure_roots(&self, budgets: &Budgets, now: i64) -> Result<(), LedgerError> {
        let Some(checked) = &self.cluster else { return Ok(()) };
        let root = budgets.root();
        let unchecked: Vec<&Budget> =
            budgets.iter().filter(|b| checked.get(&b.account).is_none_or(|r| *r != *root)).collect();
        if unchecked.is_empty() {
            return Ok(());
        }
        let accounts: Vec<&str> = unchecked.iter().map(|b| &*b.account).collect();
        let recorded = self.slots_of(&accounts).await?;
        let keys = &self.store.keys;
        let mut record = redis::pipe();
        for (b, old) in unchecked.iter().zip(&recorded) {
            if *old == *root {
                continue;
            }
            let start = period::start(b.period, now);
            let (from, to) = (keys.spend(old, &b.account, start), keys.spend(root, &b.account, start));
            // Taken and deleted in one step: of replicas moving the same account at once,
            // one gets the spend, the others nothing.
            let mut take = redis::pipe();
            take.atomic().cmd("HGETALL").arg(&from).cmd("DEL").arg(&from).ignore();
            let (fields,): (Vec<String>,) = self.store.pipeline_on_one_key(Op::Settle, &take).await?;
            if !fields.is_empty() {
                let mut copy = redis::pipe();
                for pair in fields.chunks_exact(2) {
                    copy.cmd("HINCRBY").arg(&to).arg(&pair[0]).arg(&pair[1]).ignore();
                }
                let expires_at = self.spend_expires_at(b.period, now);
                if !expires_at.is_empty() {
                    copy.cmd("EXPIREAT").arg(&to).arg(expires_at).ignore();
                }
                self.store.pipeline_on_one_key::<()>(Op::Settle, &copy).await?;
                tracing::info!(account = %b.account, "a budget's spend moved to its new chain root's slot");
            }
            // The root's own keys are named by it: no entry for it.
            if b.account == *root {
                record.cmd("HDEL").arg(keys.slots()).arg(&*b.account).ignore();
            } else {
                record.cmd("HSET").arg(keys.slots()).arg(&*b.account).arg(&**root).ignore();
            }
        }
        if !record.is_empty() {
            self.store.pipeline_on_one_key::<()>(Op::Settle, &record).await?;
        }
        for b in unchecked {
            checked.insert(Arc::clone(&b.account), Arc::clone(root));
        }
        Ok(())
    }

    /// The slots of accounts read alone (not from a request's chain): on a Cluster, the root
    /// [`Self::ensure_roots`] recorded in [`scripts::Keys::slots`] (the account itself when
    /// none: a root, or an account that never reserved).
    async fn slots_of(&self, accounts: &[&str]) -> Result<Vec<Arc<str>>, LedgerError> {
        if self.cluster.is_none() || accounts.is_empty() {
            return Ok(accounts.iter().map(|a| Arc::from(*a)).collect());
        }
        let mut command = redis::cmd("HMGET");
        command.arg(self.store.keys.slots()).arg(accounts);
        let slots: Vec<Option<String>> = self.store.command(Op::Read, command).await?;
        Ok(accounts.iter().zip(slots).map(|(a, slot)| slot.map_or_else(|| Arc::from(*a), Arc::from)).collect())
    }

    /// `<replica>:<id>:<amount>`: the reservation's member in the user's `holds`.
    fn member(&self, id: u64, amount: Usd) -> String {
        format!("{}:{id}:{}", self.replica, amount.pico())
    }

    /// (reserved, holds, spend) of every level, in level order.
    fn level_keys(&self, budgets: &Budgets, now: i64) -> Vec<String> {
        let mut out = Vec::with_capacity(3 * budgets.len());
        for b in budgets {
            out.extend(self.account_keys(self.slot(budgets, b), b, now));
        }
        out
    }

    /// (reserved, holds, spend) of one level whose keys are in `slot`.
    fn account_keys(&self, slot: &str, b: &Budget, now: i64) -> [String; 3] {
        let keys = &self.store.keys;
        [
            keys.reserved(slot, &b.account),
            keys.holds(slot, &b.account),
            keys.spend(slot, &b.account, period::start(b.period, now)),
        ]
    }

    /// On a Cluster, what a settlement writes outside its chain's slot once its script has
    /// applied it, one pipeline per key (so per slot): the record, the user's ranking and
    /// everyone's hour.
    /// `args` are the settle script's ([`scripts`]).
    fn outside_the_slot(&self, args: &[String], ranking: String, hour: i64) -> Vec<redis::Pipeline> {
        let keys = &self.store.keys;
        let arg = |i: usize| args.get(i).map_or("", String::as_str);
        let mut records = redis::pipe();
        records.cmd("LPUSH").arg(keys.records()).arg(arg(6)).ignore();
        records.cmd("LTRIM").arg(keys.records()).arg(0).arg(MAX_RECORDS - 1).ignore();
        // Unconditional, a cost of 0 too: a user whose requests were all free is still ranked.
        let mut rank = redis::pipe();
        rank.cmd("ZADD").arg(&ranking).arg("NX").arg(0).arg(arg(9)).ignore();
        if !arg(10).is_empty() {
            rank.cmd("EXPIREAT").arg(&ranking).arg(arg(10)).ignore();
        }
        let everyone = keys.hour(hour);
        let backend = arg(5);
        let mut sums = redis::pipe();
        let mut add = |name: &str, value: &str| {
            sums.cmd("HINCRBY").arg(&everyone).arg(format!("{backend}/{name}")).arg(value).ignore();
        };
        add("requests", "1");
        if arg(11) == "1" {
            add("errors", "1");
        }
        add("spent", arg(2));
        add("prompt_tokens", arg(3));
        add("completion_tokens", arg(4));
        add("latency_ms", arg(12));
        sums.cmd("EXPIREAT").arg(&everyone).arg(arg(14)).ignore();
        vec![records, rank, sums]
    }

    fn retention_s(&self) -> i64 {
        i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX)
    }

    /// When a period's spend may be forgotten: the retention after the period ends.
    fn spend_expires_at(&self, period: BudgetPeriod, now: i64) -> String {
        let retention = self.retention_s();
        period::end(period, now).map(|end| end.saturating_add(retention).to_string()).unwrap_or_default()
    }

    /// How long after its start an hour's rollup is kept: a user's as long as the records it
    /// sums (the last one is at the hour's end), everyone's [`rollup::BACKEND_ROWS_KEPT_S`].
    fn hour_kept_s(&self, per_user: bool) -> i64 {
        if per_user {
            self.retention_s().saturating_add(HOUR_S)
        } else {
            rollup::BACKEND_ROWS_KEPT_S
        }
    }

    fn hour_expires_at(&self, hour: i64, per_user: bool) -> String {
        hour.saturating_add(self.hour_kept_s(per_user)).min(MAX_EXPIRE_AT).to_string()
    }

    /// Every member of the sorted set `key`, a `ZSCAN` step per round trip: a day's ranking may
    /// hold a million users, too many for one answer within the operation timeout.
    async fn members(&self, key: &str) -> Result<Vec<String>, LedgerError> {
        let mut members = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut command = redis::cmd("ZSCAN");
            command.arg(key).arg(&cursor).arg("COUNT").arg(SCAN_COUNT);
            let (next, page): (String, Vec<String>) = self.store.command(Op::Read, command).await?;
            // Member, score, member, score...
            members.extend(page.into_iter().step_by(2));
            if next == "0" {
                return Ok(members);
            }
            cursor = next;
        }
    }

    fn reserve_locally(
        &self,
        budgets: &Budgets,
        amount: Usd,
        now: i64,
        error: LedgerError,
    ) -> Result<Reserve, LedgerError> {
        if self.store.policy == OnLedgerError::FailClosed || self.store.backlog_full() {
            return Err(error);
        }
        self.store.metrics.ledger_fail_open.inc();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | LOCAL;
        Ok(match self.store.local.reserve(budgets, amount, now) {
            Ok(remaining) => Reserve::Reserved { id, remaining },
            Err((scope, remaining)) => Reserve::Refused { scope, remaining },
        })
    }

    /// (reserved, spent) of every level, and the first level's spend fields when `all`;
    /// `keys` are the levels' [`Self::level_keys`].
    async fn read(&self, budgets: &Budgets, keys: &[String], now: i64, all: bool) -> Result<Vec<Account>, LedgerError> {
        let arg = if all { "all" } else { "" };
        let answer: Vec<redis::Value> =
            self.store.script(Op::Read, &self.store.scripts.read, keys, &[arg.to_owned()]).await?;
        let mut accounts = Vec::with_capacity(budgets.len());
        let mut fields: Vec<String> = Vec::new();
        for (i, value) in answer.into_iter().enumerate() {
            if i < budgets.len() {
                let (reserved, spent): (String, String) = redis::from_redis_value(value)
                    .map_err(|e| LedgerError::Storage(format!("unexpected read answer: {e}")))?;
                accounts.push((parse_usd(&reserved), parse_usd(&spent)));
            } else {
                fields = redis::from_redis_value(value)
                    .map_err(|e| LedgerError::Storage(format!("unexpected read answer: {e}")))?;
            }
        }
        Ok(budgets
            .iter()
            .zip(accounts)
            .enumerate()
            .map(|(i, (b, (reserved, spent)))| {
                let period_start = period::start(b.period, now);
                self.store.local.seen(&b.account, period_start, spent, reserved);
                let mut account =
                    if i == 0 { account(period_start, reserved, &fields) } else { Account::new(period_start) };
                account.reserved = reserved;
                account.totals.spent = spent;
                account
            })
            .collect())
    }
}

impl Ledger for RedisLedger {
    fn reserve<'a>(
        &'a self,
        budgets: &'a Budgets,
        amount: Usd,
        now: i64,
    ) -> BoxFuture<'a, Result<Reserve, LedgerError>> {
        Box::pin(async move {
            if let Err(e) = self.ensure_roots(budgets, now).await {
                return self.reserve_locally(budgets, amount, now, e);
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let keys = self.level_keys(budgets, now);
            let ttl = self.held.ttl_ms.load(Ordering::Relaxed).to_string();
            let member = self.member(id, amount);
            let mut args = vec![member.clone(), amount.pico().to_string(), ttl];
            args.extend(budgets.iter().map(|b| b.limit.map(|l| l.pico().to_string()).unwrap_or_default()));
            let answer = self.store.script::<Vec<String>>(Op::Reserve, &self.store.scripts.reserve, &keys, &args);
            let answer = match answer.await {
                Ok(answer) => answer,
                Err(e) => return self.reserve_locally(budgets, amount, now, e),
            };
            let granted = answer.first().is_some_and(|g| g == "1");
            let refusing: usize = answer.get(1).map_or(0, |r| parse_u64(r).try_into().unwrap_or(0));
            let mut left: SmallVec<[Option<Usd>; 3]> = SmallVec::new();
            for (i, b) in budgets.iter().enumerate() {
                let spent = answer.get(2 + 2 * i).map_or(Usd::ZERO, |v| parse_usd(v));
                let mut reserved = answer.get(3 + 2 * i).map_or(Usd::ZERO, |v| parse_usd(v));
                let used = spent.saturating_add(reserved);
                let after = if granted { amount } else { Usd::ZERO };
                if granted {
                    reserved = reserved.saturating_add(amount);
                }
                self.store.local.seen(&b.account, period::start(b.period, now), spent, reserved);
                left.push(b.limit.map(|l| l.saturating_sub(used).saturating_sub(after).max(Usd::ZERO)));
            }
            if granted {
                let accounts =
                    budgets.iter().map(|b| (Arc::clone(self.slot(budgets, b)), Arc::clone(&b.account))).collect();
                self.held.open.insert(id, (accounts, member));
                return Ok(Reserve::Reserved { id, remaining: budgets.smallest(left) });
            }
            let index = refusing.saturating_sub(1).min(budgets.len().saturating_sub(1));
            let scope = budgets.iter().nth(index).map_or(super::Scope::User, |b| b.scope);
            let remaining = left.get(index).copied().flatten().unwrap_or(Usd::ZERO);
            Ok(Reserve::Refused { scope, remaining })
        })
    }

    fn release(&self, budgets: &Budgets, id: u64, amount: Usd, _now: i64) {
        if id & LOCAL != 0 {
            self.store.local.release_held(budgets, amount);
            return;
        }
        self.held.open.remove(&id);
        let keys = budgets
            .iter()
            .flat_map(|b| {
                let slot = self.slot(budgets, b);
                [self.store.keys.reserved(slot, &b.account), self.store.keys.holds(slot, &b.account)]
            })
            .collect();
        let write = Write {
            script: WriteScript::Release,
            keys,
            args: vec![self.member(id, amount)],
            accounts: budgets.iter().map(|b| Arc::clone(&b.account)).collect(),
            cost: Usd::ZERO,
            must_land: true,
            replayed: false,
            then: Vec::new(),
        };
        self.store.submit(write);
    }

    fn record_free(&self, budgets: &Budgets, record: RequestRecord, now: i64) {
        // A local id: no reservation to remove in Redis, and a settlement id of its own.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) | LOCAL;
        self.settle(budgets, id, Usd::ZERO, record, now);
    }

    fn settle(&self, budgets: &Budgets, id: u64, reserved: Usd, record: RequestRecord, now: i64) {
        let local = id & LOCAL != 0;
        if !local {
            self.held.open.remove(&id);
        }
        self.store.local.settled(budgets, local.then_some(reserved), record.cost);
        let keys = &self.store.keys;
        let member = if local { String::new() } else { self.member(id, reserved) };
        let record_json = serde_json::to_string(&StoredRecord::from(&record)).unwrap_or_default();
        let hour = rollup::hour_of(record.at_ms);
        let mut args = vec![
            member,
            format!("{}:{id}", self.replica),
            record.cost.pico().to_string(),
            record.prompt_tokens.to_string(),
            record.completion_tokens.to_string(),
            record.backend.to_string(),
            record_json,
            MAX_RECORDS.to_string(),
            DEDUPE_WINDOW_MS.to_string(),
            budgets.user().account.to_string(),
            self.spend_expires_at(budgets.user().period, now),
            if record.status >= 400 { "1" } else { "0" }.to_owned(),
            // HINCRBY takes a signed 64-bit integer.
            i64::try_from(record.latency_ms).unwrap_or(i64::MAX).to_string(),
            self.hour_expires_at(hour, true),
            self.hour_expires_at(hour, false),
        ];
        args.extend(budgets.iter().map(|b| self.spend_expires_at(b.period, now)));
        let user = budgets.user();
        let user_slot = self.slot(budgets, user);
        let ranking = keys.ranking(period::name(user.period), period::start(user.period, now));
        let mut write_keys =
            vec![keys.settled(user_slot, &user.account), keys.user_hour(user_slot, &user.account, hour)];
        write_keys.extend(self.level_keys(budgets, now));
        let then = match &self.cluster {
            // In other slots than the chain's: written once the script says it applied.
            Some(_) => self.outside_the_slot(&args, ranking, hour),
            None => {
                write_keys.extend([keys.records(), ranking, keys.hour(hour)]);
                Vec::new()
            }
        };
        let write = Write {
            script: WriteScript::Settle,
            keys: write_keys,
            args,
            accounts: budgets.iter().map(|b| Arc::clone(&b.account)).collect(),
            cost: record.cost,
            must_land: true,
            replayed: false,
            then,
        };
        self.store.submit(write);
    }

    fn remaining<'a>(&'a self, budgets: &'a Budgets, now: i64) -> BoxFuture<'a, Result<Option<Left>, LedgerError>> {
        Box::pin(async move {
            // No budget at any level, nothing to ask Redis.
            if !budgets.any_limit() {
                return Ok(None);
            }
            match self.read(budgets, &self.level_keys(budgets, now), now, false).await {
                Ok(accounts) => {
                    Ok(budgets.smallest(budgets.iter().zip(&accounts).map(|(b, a)| b.limit.map(|l| a.remaining(l)))))
                }
                Err(e) if self.store.policy == OnLedgerError::FailOpen => {
                    let _ = e;
                    Ok(self.store.local.remaining(budgets, now))
                }
                Err(e) => Err(e),
            }
        })
    }

    fn usage<'a>(&'a self, budget: &'a Budget, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>> {
        Box::pin(async move {
            let one = Budgets::from_levels([budget.clone()]);
            let slots = self.slots_of(&[&budget.account]).await?;
            let slot = slots.first().map_or(&budget.account, |s| s);
            let keys = self.account_keys(slot, budget, now);
            let mut accounts = self.read(&one, &keys, now, true).await?;
            accounts.pop().ok_or_else(|| LedgerError::Storage("empty read answer".into()))
        })
    }

    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let last = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
            let mut command = redis::cmd("LRANGE");
            command.arg(self.store.keys.records()).arg(0).arg(last);
            let texts: Vec<String> = self.store.command(Op::Records, command).await?;
            let retention_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
            let oldest = crate::clock::unix_now_ms().saturating_sub(retention_ms);
            // Stored newest first; answered oldest first, like the other stores.
            let mut records: Vec<RequestRecord> = texts
                .iter()
                .filter_map(|t| serde_json::from_str::<StoredRecord>(t).ok())
                .filter(|r| r.at_ms >= oldest)
                .map(RequestRecord::from)
                .collect();
            records.reverse();
            Ok(records)
        })
    }

    fn hourly(&self, query: HourQuery) -> BoxFuture<'_, Result<Vec<HourRow>, LedgerError>> {
        Box::pin(async move {
            let kept = self.hour_kept_s(query.user.is_some());
            let hours = hours_in(query.from, query.to, crate::clock::unix_now().saturating_sub(kept));
            let keys = &self.store.keys;
            let user_slot = match &query.user {
                Some(user) => self.slots_of(&[user]).await?.pop(),
                None => None,
            };
            let mut rows = std::collections::HashMap::new();
            for batch in hours.chunks(KEYS_PER_TRIP) {
                let mut pipeline = redis::pipe();
                for &hour in batch {
                    let key = match (&query.user, &user_slot) {
                        (Some(user), Some(slot)) => keys.user_hour(slot, user, hour),
                        _ => keys.hour(hour),
                    };
                    pipeline.cmd("HGETALL").arg(key);
                }
                let answers: Vec<Vec<String>> = self.store.pipeline(Op::Read, pipeline).await?;
                if answers.len() != batch.len() {
                    return Err(LedgerError::Storage(format!(
                        "hourly rollups: {} answers to {} reads",
                        answers.len(),
                        batch.len()
                    )));
                }
                for (&hour, fields) in batch.iter().zip(&answers) {
                    add_hour(&mut rows, hour, fields);
                }
            }
            Ok(rollup::sorted(rows))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(self.store.flush())
    }

    fn ready(&self) -> bool {
        self.store.policy == OnLedgerError::FailOpen || self.store.reachable()
    }

    fn standings(&self, now: i64) -> BoxFuture<'_, Result<Vec<Standing>, LedgerError>> {
        Box::pin(async move {
            let keys = &self.store.keys;
            // The rankings say who has a spend hash in each period holding `now`. A set: on the
            // 1st the day and the month start together (one hash), and a scan may repeat.
            let mut wanted: std::collections::BTreeSet<(String, i64)> = std::collections::BTreeSet::new();
            for kind in [BudgetPeriod::Day, BudgetPeriod::Month, BudgetPeriod::Total] {
                let start = period::start(kind, now);
                let members = self.members(&keys.ranking(period::name(kind), start)).await?;
                wanted.extend(members.into_iter().filter(|m| super::budgets::is_user_account(m)).map(|m| (m, start)));
            }
            let wanted: Vec<(String, i64)> = wanted.into_iter().collect();
            let mut standings = Vec::with_capacity(wanted.len());
            for batch in wanted.chunks(KEYS_PER_TRIP) {
                let users: Vec<&str> = batch.iter().map(|(user, _)| user.as_str()).collect();
                let slots = self.slots_of(&users).await?;
                let mut pipeline = redis::pipe();
                for ((user, start), slot) in batch.iter().zip(&slots) {
                    pipeline.cmd("HGETALL").arg(keys.spend(slot, user, *start));
                }
                let answers: Vec<Vec<String>> = self.store.pipeline(Op::Read, pipeline).await?;
                if answers.len() != batch.len() {
                    return Err(LedgerError::Storage(format!(
                        "standings: {} answers to {} reads",
                        answers.len(),
                        batch.len()
                    )));
                }
                for ((user, start), fields) in batch.iter().zip(&answers) {
                    let account = account(*start, Usd::ZERO, fields);
                    // A hash that expired since the scan: nothing in that period any more.
                    if account.totals.requests > 0 {
                        standings.push(Standing { user: user.as_str().into(), account });
                    }
                }
            }
            Ok(standings)
        })
    }

    fn requests_last_at_most(&self, longest: Duration) {
        if !self.fixed_ttl {
            let ttl = longest.saturating_add(TTL_MARGIN);
            self.held.ttl_ms.store(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spend_hash_reads_back_as_an_account_with_its_backends() {
        let fields: Vec<String> = [
            ("spent", "1500000000000000000"),
            ("requests", "3"),
            ("prompt_tokens", "30"),
            ("completion_tokens", "12"),
            ("b/gpu.a/spent", "1000000000000000000"),
            ("b/gpu.a/requests", "2"),
            ("b/cpu/spent", "500000000000000000"),
        ]
        .iter()
        .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
        .collect();
        let a = account(86_400, Usd::from_pico(7), &fields);
        assert_eq!(a.totals.spent, Usd::from_pico(1_500_000_000_000_000_000));
        assert_eq!((a.totals.requests, a.totals.prompt_tokens, a.totals.completion_tokens), (3, 30, 12));
        assert_eq!(a.by_backend["gpu.a"].spent, Usd::from_pico(1_000_000_000_000_000_000));
        assert_eq!(a.by_backend["gpu.a"].requests, 2);
        assert_eq!(a.by_backend["cpu"].spent, Usd::from_pico(500_000_000_000_000_000));
        assert_eq!(a.reserved, Usd::from_pico(7));
        assert_eq!(a.period_start, 86_400);
    }

    #[test]
    fn an_hour_hash_reads_back_as_rows_per_backend_whatever_its_name() {
        let fields: Vec<String> = [
            ("gpu/a/requests", "2"),
            ("gpu/a/errors", "1"),
            ("gpu/a/spent", "9007199254740993"),
            ("gpu/a/latency_ms", "250"),
            ("cpu/requests", "1"),
            ("cpu/completion_tokens", "7"),
            ("stale/spent", "5"),
        ]
        .iter()
        .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
        .collect();
        let mut rows = std::collections::HashMap::new();
        add_hour(&mut rows, 7200, &fields);
        let rows = rollup::sorted(rows);
        let gpu = Sums {
            requests: 2,
            errors: 1,
            spent: Usd::from_pico(9_007_199_254_740_993),
            latency_ms: 250,
            ..Sums::default()
        };
        let cpu = Sums { requests: 1, completion_tokens: 7, ..Sums::default() };
        let expected = [
            HourRow { hour: 7200, backend: "cpu".into(), sums: cpu },
            HourRow { hour: 7200, backend: "gpu/a".into(), sums: gpu },
        ];
        assert_eq!(rows, expected, "a backend without requests is no row");
    }

    #[test]
    fn the_hours_read_start_in_the_window_and_are_bounded_even_for_an_endless_one() {
        assert_eq!(hours_in(3600, 3 * 3600, i64::MIN), [3600, 7200]);
        assert_eq!(hours_in(3601, 3 * 3600 + 1, i64::MIN), [7200, 10_800]);
        assert_eq!(hours_in(0, 5 * 3600, 2 * 3600 - 5), [7200, 10_800, 14_400], "those before `oldest` expired");
        assert_eq!(hours_in(-3600, 1, i64::MIN), [-3600, 0]);
        assert!(hours_in(5, 5, i64::MIN).is_empty());
        let endless = hours_in(i64::MIN, i64::MAX, i64::MIN);
        assert!(endless.len() <= usize::try_from(MAX_WINDOW_S / HOUR_S).unwrap_or(0), "{}", endless.len());
        assert!(endless.len() > 1000);
    }
}
