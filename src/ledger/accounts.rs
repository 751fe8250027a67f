//! The live accounts of every user, shared by the stores: one sharded map, one lock per user.

use dashmap::DashMap;

use super::{period, Account, RequestRecord, Reserve};
use crate::config::User;
use crate::cost::Usd;

#[derive(Debug, Default)]
pub struct Accounts {
    live: DashMap<String, Account>,
    /// Accounts read back from storage at start, by (user, period start): taken on first use.
    restored: DashMap<(String, i64), Account>,
}

impl Accounts {
    pub fn restore(&self, user: String, account: Account) {
        self.restored.insert((user, account.period_start), account);
    }

    /// Runs `f` on `user`'s account for the period holding `now`, under that user's lock.
    pub fn with<T>(&self, user: &User, now: i64, f: impl FnOnce(&mut Account) -> T) -> T {
        let start = period::start(user.budget_period, now);
        // The common case, a user already seen: looked up by `&str`, so the four calls a
        // request makes (remaining, reserve, settle, remaining) allocate no key.
        if let Some(mut entry) = self.live.get_mut(user.name.as_str()) {
            if entry.period_start >= start {
                return f(&mut entry);
            }
        }
        let mut entry = self.live.entry(user.name.clone()).or_insert_with(|| self.take_restored(&user.name, start));
        if entry.period_start < start {
            let reserved = entry.reserved;
            *entry = self.take_restored(&user.name, start);
            entry.reserved = reserved;
        }
        f(&mut entry)
    }

    fn take_restored(&self, user: &str, start: i64) -> Account {
        self.restored.remove(&(user.to_owned(), start)).map_or_else(|| Account::new(start), |(_, a)| a)
    }

    pub fn reserve(&self, user: &User, amount: Usd, now: i64) -> Reserve {
        self.with(user, now, |a| match a.reserve(amount, user.budget_usd) {
            Ok(()) => Reserve::Reserved { id: 0, remaining: user.budget_usd.map(|b| a.remaining(b)) },
            Err(remaining) => Reserve::Refused { remaining },
        })
    }

    /// Settles and returns the period start the cost was booked in.
    pub fn settle(&self, user: &User, reserved: Usd, record: &RequestRecord, now: i64) -> i64 {
        self.with(user, now, |a| {
            a.settle(reserved, &record.backend, record.cost, record.prompt_tokens, record.completion_tokens);
            a.period_start
        })
    }

    pub fn release(&self, user: &User, amount: Usd, now: i64) {
        self.with(user, now, |a| a.release(amount));
    }

    pub fn remaining(&self, user: &User, now: i64) -> Option<Usd> {
        let budget = user.budget_usd?;
        Some(self.with(user, now, |a| a.remaining(budget)))
    }

    pub fn snapshot(&self, user: &User, now: i64) -> Account {
        self.with(user, now, |a| a.clone())
    }
}
