//! Fail-open accounting: what a replica knows of each user's budget while Redis cannot be
//! reached. The last figures Redis gave, plus what this replica reserved and spent since then,
//! bound what it admits on its own; other replicas' spend during the outage is unseen, so
//! fail-open trades exactness for availability (the operator's choice, `on_ledger_error`).

use dashmap::DashMap;

use crate::cost::Usd;
use crate::ledger::{period, Budgets, Left, Scope};

/// One user's budget as this replica sees it. Pure arithmetic; [`Local`] keeps one per user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shadow {
    pub period_start: i64,
    /// Spent in the period, as Redis last said.
    pub spent: Usd,
    /// Reserved by every replica, as Redis last said.
    pub reserved: Usd,
    /// Reservations this replica made locally (Redis unreachable).
    pub held: Usd,
    /// Costs this replica settled that Redis has not yet confirmed.
    pub pending: Usd,
}

impl Shadow {
    fn roll(&mut self, period_start: i64) {
        if period_start > self.period_start {
            self.period_start = period_start;
            self.spent = Usd::ZERO;
        }
    }

    fn used(&self) -> Usd {
        self.spent.saturating_add(self.reserved).saturating_add(self.held).saturating_add(self.pending)
    }

    pub fn remaining(&self, budget: Usd) -> Usd {
        budget.saturating_sub(self.used()).max(Usd::ZERO)
    }

    /// Holds `amount` locally if everything known still fits the budget.
    #[cfg(test)]
    fn reserve(&mut self, amount: Usd, budget: Option<Usd>) -> Result<Option<Usd>, Usd> {
        if let Some(budget) = budget {
            if self.used().saturating_add(amount) > budget {
                return Err(self.remaining(budget));
            }
        }
        self.held = self.held.saturating_add(amount);
        Ok(budget.map(|b| self.remaining(b)))
    }
}

#[derive(Debug)]
pub struct Local {
    users: DashMap<String, Shadow>,
    /// Only a fail-open ledger admits on these figures: a fail-closed one keeps none (each
    /// request would update its accounts' shadows several times for nothing).
    kept: bool,
}

impl Local {
    pub fn new(policy: crate::config::OnLedgerError) -> Self {
        Self { users: DashMap::new(), kept: policy == crate::config::OnLedgerError::FailOpen }
    }

    fn with<T>(&self, user: &str, f: impl FnOnce(&mut Shadow) -> T) -> T {
        // Every request passes here several times: the name is copied only on an account's
        // first visit.
        if let Some(mut shadow) = self.users.get_mut(user) {
            return f(&mut shadow);
        }
        f(&mut self.users.entry(user.to_owned()).or_default())
    }

    /// Updates `user`'s shadow with what Redis said or confirmed, when shadows are kept.
    fn track(&self, user: &str, f: impl FnOnce(&mut Shadow)) {
        if self.kept {
            self.with(user, f);
        }
    }

    /// Records what Redis just said about `user`.
    pub fn seen(&self, user: &str, period_start: i64, spent: Usd, reserved: Usd) {
        self.track(user, |s| {
            s.roll(period_start);
            if period_start == s.period_start {
                s.spent = spent;
            }
            s.reserved = reserved;
        });
    }

    /// Holds `amount` locally at every level if everything known still fits every budget.
    pub fn reserve(&self, budgets: &Budgets, amount: Usd, now: i64) -> Result<Option<Left>, (Scope, Usd)> {
        for b in budgets {
            let fits = self.with(&b.account, |s| {
                s.roll(period::start(b.period, now));
                match b.limit {
                    Some(limit) if s.used().saturating_add(amount) > limit => Err(s.remaining(limit)),
                    _ => Ok(()),
                }
            });
            fits.map_err(|remaining| (b.scope, remaining))?;
        }
        for b in budgets {
            self.with(&b.account, |s| s.held = s.held.saturating_add(amount));
        }
        Ok(self.remaining(budgets, now))
    }

    pub fn remaining(&self, budgets: &Budgets, now: i64) -> Option<Left> {
        let per_level: Vec<Option<Usd>> = budgets
            .iter()
            .map(|b| {
                b.limit.map(|limit| {
                    self.with(&b.account, |s| {
                        s.roll(period::start(b.period, now));
                        s.remaining(limit)
                    })
                })
            })
            .collect();
        budgets.smallest(per_level)
    }

    pub fn release_held(&self, budgets: &Budgets, amount: Usd) {
        for b in budgets {
            self.with(&b.account, |s| s.held = s.held.saturating_sub(amount).max(Usd::ZERO));
        }
    }

    /// A local reservation (if `held`) or a Redis one turned into `cost` not yet in Redis.
    pub fn settled(&self, budgets: &Budgets, held: Option<Usd>, cost: Usd) {
        for b in budgets {
            self.track(&b.account, |s| {
                if let Some(amount) = held {
                    s.held = s.held.saturating_sub(amount).max(Usd::ZERO);
                }
                s.pending = s.pending.saturating_add(cost);
            });
        }
    }

    /// Redis confirmed a settlement of `cost`.
    pub fn confirmed(&self, user: &str, cost: Usd) {
        self.track(user, |s| s.pending = s.pending.saturating_sub(cost).max(Usd::ZERO));
    }

    pub fn shadow(&self, user: &str) -> Shadow {
        self.users.get(user).map(|s| *s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reservations_count_what_redis_last_said_and_what_is_not_confirmed_yet() {
        let budget = Some(Usd::from_pico(100));
        let mut s =
            Shadow { period_start: 0, spent: Usd::from_pico(50), reserved: Usd::from_pico(20), ..Shadow::default() };
        assert_eq!(s.reserve(Usd::from_pico(20), budget), Ok(Some(Usd::from_pico(10))));
        s.pending = Usd::from_pico(5);
        assert_eq!(s.reserve(Usd::from_pico(10), budget), Err(Usd::from_pico(5)));
        assert_eq!(s.reserve(Usd::from_pico(1000), None), Ok(None));
    }

    #[test]
    fn a_new_period_forgets_the_old_spend_but_not_open_reservations() {
        let mut s =
            Shadow { period_start: 0, spent: Usd::from_pico(90), reserved: Usd::from_pico(5), ..Shadow::default() };
        s.roll(86_400);
        assert_eq!((s.spent, s.reserved, s.period_start), (Usd::ZERO, Usd::from_pico(5), 86_400));
        s.roll(0);
        assert_eq!(s.period_start, 86_400, "never rolls back");
    }
}
