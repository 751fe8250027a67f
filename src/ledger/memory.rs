//! The in-memory ledger: exact budgets within one process, nothing kept across restarts.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::accounts::Accounts;
use super::rollup::{self, HourQuery, HourRow, Rollups};
use super::{Account, BoxFuture, Budget, Budgets, Ledger, LedgerError, Left, RequestRecord, Reserve};
use crate::cost::Usd;

/// Records, and rollup rows, kept at most whatever the retention: memory must stay bounded.
const MAX_RECORDS: usize = 100_000;

#[derive(Debug)]
pub struct MemoryLedger {
    accounts: Accounts,
    kept: Mutex<Kept>,
    retention_ms: i64,
}

/// The records and their hourly sums, under one lock: a settlement takes it once.
#[derive(Debug, Default)]
struct Kept {
    records: VecDeque<RequestRecord>,
    rollups: Rollups,
    /// The rollups hold no hour before this one.
    rollups_from: i64,
}

impl Kept {
    fn add(&mut self, record: RequestRecord, retention_ms: i64) {
        let oldest_kept = record.at_ms.saturating_sub(retention_ms);
        while self.records.front().is_some_and(|r| r.at_ms < oldest_kept) || self.records.len() >= MAX_RECORDS {
            self.records.pop_front();
        }
        let mut first_hour = rollup::hour_of(oldest_kept);
        if self.rollups.len() >= MAX_RECORDS {
            // Full: the oldest hour goes, whatever the retention.
            first_hour = first_hour.max(self.rollups_from.saturating_add(rollup::HOUR_S));
        }
        if first_hour > self.rollups_from {
            self.rollups.prune_before(first_hour);
            self.rollups_from = first_hour;
        }
        self.rollups.add(&record);
        self.records.push_back(record);
    }
}

impl MemoryLedger {
    pub fn new(retention: Duration) -> Self {
        Self {
            accounts: Accounts::default(),
            kept: Mutex::new(Kept { rollups_from: i64::MIN, ..Kept::default() }),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

impl Ledger for MemoryLedger {
    fn reserve<'a>(
        &'a self,
        budgets: &'a Budgets,
        amount: Usd,
        now: i64,
    ) -> BoxFuture<'a, Result<Reserve, LedgerError>> {
        let answer = self.accounts.reserve(budgets, amount, now);
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn release(&self, budgets: &Budgets, _id: u64, amount: Usd, now: i64) {
        self.accounts.release(budgets, amount, now);
    }

    fn settle(&self, budgets: &Budgets, _id: u64, reserved: Usd, record: RequestRecord, now: i64) {
        self.accounts.settle(budgets, reserved, &record, now);
        self.kept.lock().unwrap_or_else(PoisonError::into_inner).add(record, self.retention_ms);
    }

    fn remaining<'a>(&'a self, budgets: &'a Budgets, now: i64) -> BoxFuture<'a, Result<Option<Left>, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.remaining(budgets, now))))
    }

    fn usage<'a>(&'a self, budget: &'a Budget, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.snapshot(budget, now))))
    }

    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = kept.records.len().saturating_sub(limit);
        Box::pin(std::future::ready(Ok(kept.records.iter().skip(skip).cloned().collect())))
    }

    fn hourly(&self, query: HourQuery) -> BoxFuture<'_, Result<Vec<HourRow>, LedgerError>> {
        let rows = self.kept.lock().unwrap_or_else(PoisonError::into_inner).rollups.read(&query);
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn in_process(&self) -> Option<&Accounts> {
        Some(&self.accounts)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
