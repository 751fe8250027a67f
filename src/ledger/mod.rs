//! The ledger: spend, reservations and per-request records. Budgets are enforced here, exactly
//! under concurrency: reserving is one atomic check-and-add of `spent + reserved + estimate <=
//! budget`.
//!
//! Both stores keep the live accounts in memory (a sharded map: the reservation is a lock on
//! one user's entry, not on the whole ledger). `memory` keeps nothing across restarts;
//! `sqlite` persists every settlement with group commit (see [`sqlite`]). Reservations are
//! never persisted: a crash drops them, as it drops the requests they were for.

pub mod account;
mod accounts;
pub mod memory;
pub mod period;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use account::{Account, Totals};

use crate::config::User;
use crate::cost::Usd;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A ledger that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
}

/// One request as the ledger keeps it: the raw material of reports and replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub user: String,
    pub route: String,
    pub backend: String,
    pub reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usd,
    pub status: u16,
    pub latency_ms: u64,
}

/// Spend of one user in one budget period, as the SQLite ledger's `spend` table keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodSpend {
    pub user: String,
    pub period_start: i64,
    pub spent: Usd,
}

/// The atomic budget operations. `reserve` and `usage` may wait on a remote store (Redis);
/// `settle` and `release` never make the caller wait: a store that must do I/O does it on its
/// own and reconciles failures itself, because they run when a response ends or is dropped.
pub trait Ledger: Send + Sync + 'static {
    /// Reserves `amount` for `user` if it fits the budget; `Err(Refused)` carries what is left.
    fn reserve<'a>(&'a self, user: &'a User, amount: Usd, now: i64) -> BoxFuture<'a, Result<Reserve, LedgerError>>;
    fn release(&self, user: &User, amount: Usd, now: i64);
    /// Replaces the reservation `reserved` by the actual cost in `record`.
    fn settle(&self, user: &User, reserved: Usd, record: RequestRecord, now: i64);
    /// Budget left for `user` now (budget − spent − reserved); `None` when it has no budget.
    fn remaining<'a>(&'a self, user: &'a User, now: i64) -> BoxFuture<'a, Result<Option<Usd>, LedgerError>>;
    /// The user's account for the current period.
    fn usage<'a>(&'a self, user: &'a User, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>>;
    /// The most recent request records, newest last (at most `limit`).
    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>>;
    /// Waits until every settlement so far is durable (shutdown, tests).
    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>>;
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Reserved; the budget left after it (`None`: no budget).
    Reserved { remaining: Option<Usd> },
    /// Does not fit; what is left.
    Refused { remaining: Usd },
}

/// A reservation held by a request. Dropping it unsettled releases it, so no failure path can
/// leak reserved budget.
pub struct Reservation {
    ledger: Arc<dyn Ledger>,
    user: Arc<User>,
    amount: Usd,
    open: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("user", &self.user.name).field("amount", &self.amount).finish()
    }
}

impl Reservation {
    pub fn amount(&self) -> Usd {
        self.amount
    }

    pub fn settle(mut self, record: RequestRecord, now: i64) {
        self.open = false;
        self.ledger.settle(&self.user, self.amount, record, now);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.open {
            self.ledger.release(&self.user, self.amount, crate::clock::unix_now());
        }
    }
}

/// Reserves through `ledger` and wraps a success in a [`Reservation`] guard.
pub async fn reserve(
    ledger: &Arc<dyn Ledger>,
    user: &Arc<User>,
    amount: Usd,
    now: i64,
) -> Result<Result<(Reservation, Option<Usd>), Usd>, LedgerError> {
    Ok(match ledger.reserve(user, amount, now).await? {
        Reserve::Reserved { remaining } => {
            let reservation = Reservation { ledger: Arc::clone(ledger), user: Arc::clone(user), amount, open: true };
            Ok((reservation, remaining))
        }
        Reserve::Refused { remaining } => Err(remaining),
    })
}

/// Opens the store the config names.
pub fn open(config: &crate::config::Ledger) -> Result<Arc<dyn Ledger>, LedgerError> {
    match &config.store {
        crate::config::LedgerStore::Memory => Ok(Arc::new(memory::MemoryLedger::new(config.retention))),
        crate::config::LedgerStore::Sqlite { path } => {
            Ok(Arc::new(sqlite::SqliteLedger::open(path.as_ref(), config.retention)?))
        }
        crate::config::LedgerStore::Redis { .. } => Err(LedgerError::Storage(
            "the redis ledger is not available in this build; use \"memory\" or \"sqlite\"".into(),
        )),
    }
}
