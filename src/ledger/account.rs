//! Budget arithmetic for one user's period: pure, and the one place that decides whether a
//! reservation fits.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::cost::Usd;

/// Spend and counts, for a user or one of its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub spent: Usd,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Totals {
    pub fn add(&mut self, cost: Usd, prompt_tokens: u64, completion_tokens: u64) {
        self.spent = self.spent.saturating_add(cost);
        self.requests += 1;
        self.prompt_tokens += prompt_tokens;
        self.completion_tokens += completion_tokens;
    }
}

/// One user's account for the current period. `repr(C)`: what a reservation reads first (see
/// `accounts::Cell`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Account {
    pub period_start: i64,
    /// Estimated cost of the requests admitted and not yet settled.
    pub reserved: Usd,
    pub totals: Totals,
    pub by_backend: ByBackend,
}

/// An account's totals per backend. A user reaches one or two backends, so they sit inline in
/// the account (in the cache lines its lock already brought in) and the backend is found by
/// its name's pointer first: with ten thousand users in use, a tree node and a name string of
/// their own per account were two more cache misses in every settlement.
#[derive(Debug, Clone, Default)]
pub struct ByBackend(SmallVec<[(Arc<str>, Totals); 2]>);

impl ByBackend {
    pub fn get(&self, backend: &str) -> Option<&Totals> {
        self.0.iter().find(|(name, _)| &**name == backend).map(|(_, totals)| totals)
    }

    /// `backend`'s totals, added at zero if missing.
    pub fn entry(&mut self, backend: &str) -> &mut Totals {
        match self.0.iter().position(|(name, _)| &**name == backend) {
            Some(at) => &mut self.0[at].1,
            None => self.push(backend.into()),
        }
    }

    /// [`Self::entry`] for a name the gateway shares (a backend's in the config): the same
    /// pointer is the same backend, without reading the name.
    pub fn entry_shared(&mut self, backend: &Arc<str>) -> &mut Totals {
        let at = self.0.iter().position(|(name, _)| Arc::ptr_eq(name, backend) || name == backend);
        match at {
            Some(at) => &mut self.0[at].1,
            None => self.push(Arc::clone(backend)),
        }
    }

    fn push(&mut self, backend: Arc<str>) -> &mut Totals {
        self.0.push((backend, Totals::default()));
        let last = self.0.len() - 1;
        &mut self.0[last].1
    }

    pub fn insert(&mut self, backend: &str, totals: Totals) {
        *self.entry(backend) = totals;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Totals)> {
        self.0.iter().map(|(name, totals)| (&**name, totals))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The same totals per backend, in any order.
impl PartialEq for ByBackend {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(name, totals)| other.get(name) == Some(totals))
    }
}

impl Eq for ByBackend {}

impl std::ops::Index<&str> for ByBackend {
    type Output = Totals;
    fn index(&self, backend: &str) -> &Totals {
        self.get(backend).unwrap_or_else(|| panic!("no totals for backend `{backend}`"))
    }
}

impl Account {
    pub fn new(period_start: i64) -> Self {
        Self { period_start, ..Self::default() }
    }

    /// Starts a new period when `period_start` is past the account's; reservations still out
    /// carry over (their requests settle into the new period).
    pub fn roll(&mut self, period_start: i64) {
        if period_start > self.period_start {
            let reserved = self.reserved;
            *self = Self::new(period_start);
            self.reserved = reserved;
        }
    }

    /// What is left of `budget` after spend and reservations (never below zero).
    pub fn remaining(&self, budget: Usd) -> Usd {
        budget.saturating_sub(self.totals.spent).saturating_sub(self.reserved).max(Usd::ZERO)
    }

    /// Reserves `amount` if `spent + reserved + amount <= budget`; otherwise returns what is left.
    pub fn reserve(&mut self, amount: Usd, budget: Option<Usd>) -> Result<(), Usd> {
        self.fits(amount, budget)?;
        self.hold(amount);
        Ok(())
    }

    /// Whether `amount` fits `budget` on top of spend and reservations; if not, what is left.
    pub fn fits(&self, amount: Usd, budget: Option<Usd>) -> Result<(), Usd> {
        match budget {
            Some(budget) if self.totals.spent.saturating_add(self.reserved).saturating_add(amount) > budget => {
                Err(self.remaining(budget))
            }
            _ => Ok(()),
        }
    }

    /// Adds `amount` to the reservations (checked by [`Self::fits`] first).
    pub fn hold(&mut self, amount: Usd) {
        self.reserved = self.reserved.saturating_add(amount);
    }

    pub fn release(&mut self, amount: Usd) {
        self.reserved = self.reserved.saturating_sub(amount).max(Usd::ZERO);
    }

    /// Replaces a reservation by the actual cost.
    pub fn settle(&mut self, reserved: Usd, backend: &Arc<str>, cost: Usd, prompt_tokens: u64, completion_tokens: u64) {
        self.release(reserved);
        self.totals.add(cost, prompt_tokens, completion_tokens);
        self.by_backend.entry_shared(backend).add(cost, prompt_tokens, completion_tokens);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_reservation_that_does_not_fit_is_refused_with_what_is_left() {
        let budget = Some(Usd::from_pico(100));
        let mut a = Account::new(0);
        assert_eq!(a.reserve(Usd::from_pico(60), budget), Ok(()));
        assert_eq!(a.reserve(Usd::from_pico(60), budget), Err(Usd::from_pico(40)));
        a.settle(Usd::from_pico(60), &"b".into(), Usd::from_pico(30), 1, 2);
        assert_eq!(a.reserve(Usd::from_pico(60), budget), Ok(()));
        assert_eq!(a.remaining(Usd::from_pico(100)), Usd::from_pico(10));
        assert_eq!(a.by_backend["b"].spent, Usd::from_pico(30));
    }

    #[test]
    fn a_backends_totals_are_found_by_the_shared_name_or_by_another_copy_of_it() {
        let (gpu, cpu): (Arc<str>, Arc<str>) = ("gpu".into(), "cpu".into());
        let mut a = Account::new(0);
        a.settle(Usd::ZERO, &gpu, Usd::from_pico(3), 1, 1);
        a.settle(Usd::ZERO, &cpu, Usd::from_pico(5), 1, 1);
        // A reload's config names the same backend with a string of its own.
        a.settle(Usd::ZERO, &"gpu".into(), Usd::from_pico(4), 1, 1);
        assert_eq!(a.by_backend.len(), 2);
        assert_eq!(a.by_backend["gpu"].spent, Usd::from_pico(7));
        assert_eq!(a.by_backend["gpu"].requests, 2);
        assert_eq!(a.totals.spent, Usd::from_pico(12));
        let mut b = Account::new(0);
        b.by_backend.insert("cpu", a.by_backend["cpu"]);
        b.by_backend.entry("gpu").add(Usd::from_pico(3), 1, 1);
        b.by_backend.entry("gpu").add(Usd::from_pico(4), 1, 1);
        assert_eq!(a.by_backend, b.by_backend, "the same totals in another order");
        b.by_backend.entry("tpu");
        assert_ne!(a.by_backend, b.by_backend);
    }

    #[test]
    fn a_new_period_clears_spend_but_keeps_outstanding_reservations() {
        let mut a = Account::new(0);
        a.reserve(Usd::from_pico(5), None).unwrap();
        a.settle(Usd::from_pico(5), &"b".into(), Usd::from_pico(5), 1, 1);
        a.reserve(Usd::from_pico(7), None).unwrap();
        a.roll(86_400);
        assert_eq!(a.totals, Totals::default());
        assert_eq!(a.reserved, Usd::from_pico(7));
        a.roll(0);
        assert_eq!(a.period_start, 86_400, "never rolls back");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(i64),
        Settle(usize, i64),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..50).prop_map(Op::Reserve),
            (0usize..64, 0i64..50).prop_map(|(i, f)| Op::Settle(i, f)),
            (0usize..64).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Any interleaving of reserve, settle (at most the reserved amount: no estimation
        /// error) and release keeps spent + reserved within the budget, and reserved equals the
        /// sum of open reservations.
        #[test]
        fn spent_plus_reserved_never_exceeds_the_budget(budget in 0i64..500, ops in proptest::collection::vec(op(), 0..200)) {
            let budget_usd = Usd::from_pico(budget);
            let mut a = Account::new(0);
            let mut open: Vec<i64> = Vec::new();
            for op in ops {
                match op {
                    Op::Reserve(amount) if a.reserve(Usd::from_pico(amount), Some(budget_usd)).is_ok() => {
                        open.push(amount);
                    }
                    Op::Settle(i, fraction) if !open.is_empty() => {
                        let amount = open.swap_remove(i % open.len());
                        let cost = amount * fraction / 50;
                        a.settle(Usd::from_pico(amount), &"b".into(), Usd::from_pico(cost), 0, 0);
                    }
                    Op::Release(i) if !open.is_empty() => {
                        let amount = open.swap_remove(i % open.len());
                        a.release(Usd::from_pico(amount));
                    }
                    _ => {}
                }
                prop_assert!(a.totals.spent.saturating_add(a.reserved) <= budget_usd);
                prop_assert_eq!(a.reserved.pico(), open.iter().sum::<i64>());
            }
        }
    }
}
