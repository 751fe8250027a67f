//! The ledger: spend, reservations and per-request records. Budgets are enforced here, exactly
//! under concurrency: reserving is one atomic check-and-add of `spent + reserved + estimate <=
//! budget`.
//!
//! The in-process stores keep the live accounts in memory (a sharded map: the reservation is a
//! lock on one user's entry, not on the whole ledger). `memory` keeps nothing across restarts;
//! `sqlite` persists every settlement with group commit (see [`sqlite`]). Their reservations
//! are never persisted: a crash drops them, as it drops the requests they were for.
//!
//! `redis` keeps everything in one Redis shared by every replica (see [`redis`]): each
//! operation is one atomic server-side script, and reservations expire on their own.

pub mod account;
pub mod accounts;
pub mod budgets;
pub mod memory;
pub mod period;
pub mod redis;
pub mod rollup;
pub mod sqlite;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use account::{Account, Totals};
pub use budgets::{Budget, Budgets, Left, Scope};

use crate::cost::Usd;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A user's account in its current period: what the users table sorts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub user: Arc<str>,
    pub account: Account,
}

/// A ledger that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
    /// The shared store (Redis) did not answer in time or refused; the failure policy decides.
    #[error("ledger store unavailable during {operation}: {reason}")]
    Unavailable { operation: &'static str, reason: String },
}

/// One request as the ledger keeps it: the raw material of reports and replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    /// The names are shared with the config snapshot, not copied: a settlement allocates
    /// nothing for them, and the SQLite writer frees nothing another thread allocated.
    pub user: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    /// A decision's label (static but for a fallback's, which names the backend).
    pub reason: Cow<'static, str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usd,
    pub status: u16,
    pub latency_ms: u64,
    /// The request's id (`x-request-id`); `None` in records written before ids existed.
    pub request_id: Option<crate::telemetry::RequestId>,
}

/// Spend of one account (a user's, a key's or a team's) in one budget period, as the SQLite
/// ledger's `spend` table keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSpend {
    pub user: String,
    pub period_start: i64,
    pub spent: Usd,
}

/// The atomic budget operations, each over every level of a request's [`Budgets`] at once.
/// `reserve` and `usage` may wait on a remote store (Redis); `settle` and `release` never make
/// the caller wait: a store that must do I/O does it on its own and reconciles failures
/// itself, because they run when a response ends or is dropped.
pub trait Ledger: Send + Sync + 'static {
    /// Reserves `amount` at every level if it fits every budget, else at none.
    fn reserve<'a>(
        &'a self,
        budgets: &'a Budgets,
        amount: Usd,
        now: i64,
    ) -> BoxFuture<'a, Result<Reserve, LedgerError>>;
    /// Frees reservation `id` (of `amount`) without charging anything.
    fn release(&self, budgets: &Budgets, id: u64, amount: Usd, now: i64);
    /// Replaces reservation `id` (of `reserved`) by the actual cost in `record`, at every level.
    fn settle(&self, budgets: &Budgets, id: u64, reserved: Usd, record: RequestRecord, now: i64);
    /// Records a request that reserved nothing and cost nothing (a cache hit): its record and
    /// tokens land like any settlement's. Never makes the caller wait.
    fn record_free(&self, budgets: &Budgets, record: RequestRecord, now: i64) {
        self.settle(budgets, 0, Usd::ZERO, record, now);
    }
    /// The smallest budget left now across levels; `None` when no level has a budget.
    fn remaining<'a>(&'a self, budgets: &'a Budgets, now: i64) -> BoxFuture<'a, Result<Option<Left>, LedgerError>>;
    /// One level's account for its current period.
    fn usage<'a>(&'a self, budget: &'a Budget, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>>;
    /// The most recent request records, newest last (at most `limit`).
    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>>;
    /// `user`'s most recent request records, newest last (at most `limit`). This default looks
    /// among the store's most recent [`USER_RECORDS_SCANNED`].
    fn user_records<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<RequestRecord>, LedgerError>> {
        Box::pin(async move { Ok(last_of_user(self.records(USER_RECORDS_SCANNED).await?, user, limit)) })
    }
    /// Hourly sums per backend ([`rollup`]): one user's, or everyone's, for the hours
    /// `query` names, by hour then backend.
    fn hourly(&self, query: rollup::HourQuery) -> BoxFuture<'_, Result<Vec<rollup::HourRow>, LedgerError>>;
    /// Users' accounts in the periods that hold `now` (the day's, the month's and `total`),
    /// those with any request in them; the caller keeps each user's row of its own period
    /// (`account.period_start`).
    fn standings(&self, now: i64) -> BoxFuture<'_, Result<Vec<Standing>, LedgerError>> {
        let standings = self.in_process().map(|a| a.standings(now)).unwrap_or_default();
        Box::pin(std::future::ready(Ok(standings)))
    }
    /// Waits until every settlement so far is durable (shutdown, tests).
    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>>;
    /// Whether requests can be metered now: false while a shared store that must be reached
    /// (`fail-closed`) is not (`/readyz`).
    fn ready(&self) -> bool {
        true
    }
    /// The longest a request can now live (the longest backend timeout): a store whose
    /// reservations expire keeps them longer than that. Called at start and on every reload.
    fn requests_last_at_most(&self, _longest: std::time::Duration) {}
    /// The accounts of a store that keeps them in this process: reserving and reading what is
    /// left then need no future (and no allocation for one) on every request.
    fn in_process(&self) -> Option<&accounts::Accounts> {
        None
    }
}

/// Records [`Ledger::user_records`] looks among, in a store that cannot find a user's own.
pub const USER_RECORDS_SCANNED: usize = 10_000;

/// The last `limit` of `records` (oldest first) that are `user`'s.
fn last_of_user(records: Vec<RequestRecord>, user: &str, limit: usize) -> Vec<RequestRecord> {
    let mut mine: Vec<RequestRecord> = records.into_iter().filter(|r| &*r.user == user).collect();
    let excess = mine.len().saturating_sub(limit);
    mine.drain(..excess);
    mine
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Reserved as `id` (what settles or releases it); the smallest budget left after it
    /// (`None`: no level has a budget).
    Reserved { id: u64, remaining: Option<Left> },
    /// Does not fit at level `scope`, which has `remaining` left.
    Refused { scope: Scope, remaining: Usd },
}

/// What holds a request's budget levels for as long as its reservation is open: the request's
/// principal, whose levels sit in its own allocation (one cold allocation fewer per request).
pub trait HoldsBudgets: Send + Sync {
    fn budgets(&self) -> &Budgets;
}

/// A reservation held by a request. Dropping it unsettled releases it, so no failure path can
/// leak reserved budget.
pub struct Reservation {
    ledger: Arc<dyn Ledger>,
    holder: Arc<dyn HoldsBudgets>,
    id: u64,
    amount: Usd,
    open: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("account", &self.holder.budgets().user().account)
            .field("amount", &self.amount)
            .finish()
    }
}

impl Reservation {
    pub fn amount(&self) -> Usd {
        self.amount
    }

    pub fn settle(mut self, record: RequestRecord, now: i64) {
        self.open = false;
        self.ledger.settle(self.holder.budgets(), self.id, self.amount, record, now);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.open {
            self.ledger.release(self.holder.budgets(), self.id, self.amount, crate::clock::unix_now());
        }
    }
}

/// The smallest budget left now across levels, as [`Ledger::remaining`] says.
pub async fn remaining(ledger: &Arc<dyn Ledger>, budgets: &Budgets, now: i64) -> Result<Option<Left>, LedgerError> {
    match ledger.in_process() {
        Some(accounts) => Ok(accounts.remaining(budgets, now)),
        None => ledger.remaining(budgets, now).await,
    }
}

/// What is left once a request whose reservation of `estimate` left `left` turns out to cost
/// `cost`.
pub fn left_after(left: Usd, estimate: Usd, cost: Usd) -> Usd {
    left.saturating_add(estimate).saturating_sub(cost).max(Usd::ZERO)
}

/// The smallest budget left once an answered request is charged (`left_at_reserve`: what its
/// reservation left). An in-process ledger is read again: no I/O, and it counts what other
/// requests did meanwhile. A shared store (Redis) answers with the reservation's figure
/// corrected by the cost: a read would cost every request one more round trip, and could
/// reach Redis before the request's own settlement anyway.
pub fn remaining_after_answer(
    ledger: &Arc<dyn Ledger>,
    budgets: &Budgets,
    now: i64,
    left_at_reserve: Option<Usd>,
    estimate: Usd,
    cost: Usd,
) -> Option<Usd> {
    match ledger.in_process() {
        Some(accounts) => accounts.remaining(budgets, now).map(|l| l.usd),
        None => left_at_reserve.map(|left| left_after(left, estimate, cost)),
    }
}

/// Why a reservation was refused: the level that is short and what it has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub scope: Scope,
    pub remaining: Usd,
}

/// Reserves at the levels `holder` holds through `ledger` and wraps a success in a
/// [`Reservation`] guard.
pub async fn reserve<H: HoldsBudgets + 'static>(
    ledger: &Arc<dyn Ledger>,
    holder: &Arc<H>,
    amount: Usd,
    now: i64,
) -> Result<Result<(Reservation, Option<Left>), Short>, LedgerError> {
    let budgets = holder.budgets();
    let answer = match ledger.in_process() {
        Some(accounts) => accounts.reserve(budgets, amount, now),
        None => ledger.reserve(budgets, amount, now).await?,
    };
    Ok(match answer {
        Reserve::Reserved { id, remaining } => {
            let holder: Arc<dyn HoldsBudgets> = Arc::clone(holder) as Arc<dyn HoldsBudgets>;
            let reservation = Reservation { ledger: Arc::clone(ledger), holder, id, amount, open: true };
            Ok((reservation, remaining))
        }
        Reserve::Refused { scope, remaining } => Err(Short { scope, remaining }),
    })
}

/// Opens the store the config names, with the rate limiter that goes with it: in-process
/// buckets beside an in-process ledger, buckets in Redis beside a Redis ledger (so that every
/// replica draws from one allowance).
pub fn open(
    config: &crate::config::Ledger,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<(Arc<dyn Ledger>, crate::ratelimit::Limiter), LedgerError> {
    use crate::ratelimit::{Limiter, RateLimiter};
    match &config.store {
        crate::config::LedgerStore::Memory => {
            Ok((Arc::new(memory::MemoryLedger::new(config.retention)), Limiter::Local(RateLimiter::default())))
        }
        crate::config::LedgerStore::Sqlite { path } => Ok((
            Arc::new(sqlite::SqliteLedger::open(path.as_ref(), config.retention)?),
            Limiter::Local(RateLimiter::default()),
        )),
        crate::config::LedgerStore::Redis(settings) => {
            let store = redis::Store::open(settings, config.on_ledger_error, Arc::clone(metrics))?;
            let ledger = redis::RedisLedger::new(Arc::clone(&store), config.retention, settings.reservation_ttl);
            Ok((Arc::new(ledger), Limiter::Redis(redis::RedisLimiter::new(store))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str, at_ms: i64) -> RequestRecord {
        RequestRecord {
            at_ms,
            user: user.into(),
            route: "auto".into(),
            backend: "b".into(),
            reason: "cost-first".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cost: Usd::default(),
            status: 200,
            latency_ms: 1,
            request_id: None,
        }
    }

    #[test]
    fn a_users_records_are_its_last_ones_oldest_first() {
        let records = vec![record("ann", 1), record("bob", 2), record("ann", 3), record("ann", 4), record("bob", 5)];
        let at = |rs: Vec<RequestRecord>| rs.iter().map(|r| r.at_ms).collect::<Vec<_>>();
        assert_eq!(at(last_of_user(records.clone(), "ann", 2)), [3, 4]);
        assert_eq!(at(last_of_user(records.clone(), "bob", 100)), [2, 5]);
        assert!(last_of_user(records, "cat", 10).is_empty());
    }
}
