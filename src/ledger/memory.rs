//! The in-memory ledger: exact budgets within one process, nothing kept across restarts.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::accounts::Accounts;
use super::{Account, BoxFuture, Budget, Budgets, Ledger, LedgerError, Left, RequestRecord, Reserve};
use crate::cost::Usd;

/// Records kept at most, whatever the retention: memory must stay bounded.
const MAX_RECORDS: usize = 100_000;

#[derive(Debug)]
pub struct MemoryLedger {
    accounts: Accounts,
    records: Mutex<VecDeque<RequestRecord>>,
    retention_ms: i64,
}

impl MemoryLedger {
    pub fn new(retention: Duration) -> Self {
        Self {
            accounts: Accounts::default(),
            records: Mutex::new(VecDeque::new()),
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
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest_kept = record.at_ms.saturating_sub(self.retention_ms);
        while records.front().is_some_and(|r| r.at_ms < oldest_kept) || records.len() >= MAX_RECORDS {
            records.pop_front();
        }
        records.push_back(record);
    }

    fn remaining<'a>(&'a self, budgets: &'a Budgets, now: i64) -> BoxFuture<'a, Result<Option<Left>, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.remaining(budgets, now))))
    }

    fn usage<'a>(&'a self, budget: &'a Budget, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.snapshot(budget, now))))
    }

    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>> {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = records.len().saturating_sub(limit);
        Box::pin(std::future::ready(Ok(records.iter().skip(skip).cloned().collect())))
    }

    fn in_process(&self) -> Option<&Accounts> {
        Some(&self.accounts)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
