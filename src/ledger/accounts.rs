//! The live accounts of every user, key and team, shared by the in-process stores: a sharded
//! map of accounts, each behind a lock of its own.
//!
//! A request's levels (key, user, team) are locked together, always in that order, so that
//! their check and their reservation are one atomic step. The order is what keeps two
//! requests from waiting on each other: nobody holding a team's lock waits for a user's.
//!
//! Each level remembers its account's cell ([`CellRef`]), so a principal's requests reach
//! their accounts without a look-up by name: with thousands of users in use the map's entries
//! are cold, and four look-ups per request (the budget read before the decision, the
//! reservation, the settlement, the read after) were the gateway's largest per-user cost. A
//! remembered cell is only trusted under its lock: one that was evicted, or belongs to
//! another ledger, sends the level back to the map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use smallvec::SmallVec;

use super::budgets::{Budget, Budgets, Left};
use super::{period, Account, RequestRecord, Reserve};
use crate::config::BudgetPeriod;
use crate::cost::Usd;

type Guards<'a> = SmallVec<[MutexGuard<'a, Cell>; 3]>;

/// One account and the period it was last used with (what ranking by spend needs to tell a
/// current period's spend from a past one's).
///
/// Laid out (`repr(C)`) in the order a request reads it once locked: whose it is, its period,
/// then the account's figures (and those read first), so that with thousands of accounts in
/// use, all cold, a request misses on as few cache lines of it as can be.
#[derive(Debug)]
#[repr(C)]
struct Cell {
    /// The [`Accounts`] it belongs to, and whether it is still theirs: an evicted cell is out
    /// of the map, and whoever still holds it must look the account up again.
    owner: u64,
    evicted: bool,
    period: BudgetPeriod,
    /// When it was last locked (Unix seconds): what eviction goes by.
    used_at: i64,
    account: Account,
}

impl std::ops::Deref for Cell {
    type Target = Account;
    fn deref(&self) -> &Account {
        &self.account
    }
}

impl std::ops::DerefMut for Cell {
    fn deref_mut(&mut self) -> &mut Account {
        &mut self.account
    }
}

/// A level's account cell as last found (empty until its first use).
#[derive(Default)]
pub struct CellRef(ArcSwapOption<Mutex<Cell>>);

impl Clone for CellRef {
    fn clone(&self) -> Self {
        Self(ArcSwapOption::new(self.0.load_full()))
    }
}

impl CellRef {
    /// Loads the cell's first line (its lock and figures) without locking it: see
    /// [`Budgets::warm`].
    pub(super) fn warm(&self) {
        if let Some(cell) = &*self.0.load() {
            std::hint::black_box(cell.is_poisoned());
        }
    }
}

/// Where a level's account lives says nothing about which account it is.
impl PartialEq for CellRef {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CellRef {}

impl std::fmt::Debug for CellRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.load().is_some() { "CellRef(found)" } else { "CellRef(empty)" })
    }
}

/// Reads an account's spend in one period back from storage (the SQLite ledger's file).
pub type Loader = Box<dyn Fn(&str, i64) -> Option<Account> + Send + Sync>;

/// Tells one [`Accounts`] from another (tests hold several; a level may meet more than one).
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

pub struct Accounts {
    live: DashMap<Arc<str>, Arc<Mutex<Cell>>>,
    /// Where an account's spend comes from the first time it is used in a period: memory
    /// starts empty; SQLite reads the account's rows, so a start reads nothing and memory
    /// holds the accounts in use, not every account ever stored.
    loader: Option<Loader>,
    id: u64,
}

impl Default for Accounts {
    fn default() -> Self {
        Self { live: DashMap::new(), loader: None, id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed) }
    }
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").field("live", &self.live.len()).finish_non_exhaustive()
    }
}

impl Accounts {
    /// Accounts whose spend is read back through `loader` on first use.
    pub fn with_loader(loader: Loader) -> Self {
        Self { loader: Some(loader), ..Self::default() }
    }

    fn cell(&self, name: &Arc<str>) -> Arc<Mutex<Cell>> {
        // The common case, an account already seen: a shared lock on its shard, no key copied.
        if let Some(cell) = self.live.get(&**name) {
            return Arc::clone(&cell);
        }
        // A new cell's period is before every period: its first use loads what was restored.
        let cell = self.live.entry(Arc::clone(name)).or_insert_with(|| {
            Arc::new(Mutex::new(Cell {
                account: Account::new(i64::MIN),
                period: BudgetPeriod::Total,
                used_at: i64::MIN,
                owner: self.id,
                evicted: false,
            }))
        });
        Arc::clone(&cell)
    }

    fn take_restored(&self, account: &str, start: i64) -> Account {
        self.loader.as_ref().and_then(|load| load(account, start)).unwrap_or_else(|| Account::new(start))
    }

    /// Brings a locked account to the period holding `now`; reservations still out carry over.
    fn current(&self, cell: &mut Cell, budget: &Budget, now: i64) {
        cell.period = budget.period;
        // The real clock, not `now` (a request's start may be long past when it settles):
        // eviction compares this with when the writer last committed.
        cell.used_at = crate::clock::unix_now();
        let start = period::start(budget.period, now);
        if cell.account.period_start < start {
            let reserved = cell.account.reserved;
            cell.account = self.take_restored(&budget.account, start);
            cell.account.reserved = reserved;
        }
    }

    /// The level's cell as it last found it, else from the map (and remembered).
    fn found(&self, budget: &Budget) -> Arc<Mutex<Cell>> {
        if let Some(cell) = budget.cell.0.load_full() {
            return cell;
        }
        let cell = self.cell(&budget.account);
        budget.cell.0.store(Some(Arc::clone(&cell)));
        cell
    }

    /// Whether a locked cell is this ledger's live account; if not, the level forgets it.
    fn is_live(&self, cell: &Cell, budget: &Budget) -> bool {
        let live = cell.owner == self.id && !cell.evicted;
        if !live {
            budget.cell.0.store(None);
        }
        live
    }

    /// Runs `f` on the accounts of `levels`, locked together in level order.
    fn with_all<T>(&self, levels: &[Budget], now: i64, f: impl FnOnce(&mut Guards<'_>) -> T) -> T {
        loop {
            let cells: SmallVec<[Arc<Mutex<Cell>>; 3]> = levels.iter().map(|b| self.found(b)).collect();
            let mut guards: Guards<'_> = SmallVec::new();
            for (cell, budget) in cells.iter().zip(levels) {
                let guard = cell.lock().unwrap_or_else(PoisonError::into_inner);
                if !self.is_live(&guard, budget) {
                    break;
                }
                guards.push(guard);
            }
            // A level's remembered cell was evicted meanwhile (rare): all over again, from the map.
            if guards.len() < cells.len() {
                continue;
            }
            for (guard, budget) in guards.iter_mut().zip(levels) {
                self.current(guard, budget, now);
            }
            return f(&mut guards);
        }
    }

    /// Runs `f` on one level's account.
    pub fn with<T>(&self, budget: &Budget, now: i64, f: impl FnOnce(&mut Account) -> T) -> T {
        self.with_all(std::slice::from_ref(budget), now, |guards| f(&mut guards[0].account))
    }

    /// Reserves `amount` at every level, or at none: the first level it does not fit refuses.
    pub fn reserve(&self, budgets: &Budgets, amount: Usd, now: i64) -> Reserve {
        self.with_all(budgets.levels(), now, |accounts| {
            for (account, budget) in accounts.iter().zip(budgets) {
                if let Err(remaining) = account.fits(amount, budget.limit) {
                    return Reserve::Refused { scope: budget.scope, remaining };
                }
            }
            for account in accounts.iter_mut() {
                account.hold(amount);
            }
            let left = budgets.smallest(accounts.iter().zip(budgets).map(|(a, b)| b.limit.map(|l| a.remaining(l))));
            Reserve::Reserved { id: 0, remaining: left }
        })
    }

    /// Settles at every level; returns the period start each level booked the cost in.
    pub fn settle(&self, budgets: &Budgets, reserved: Usd, record: &RequestRecord, now: i64) -> SmallVec<[i64; 3]> {
        self.with_all(budgets.levels(), now, |accounts| {
            accounts
                .iter_mut()
                .map(|a| {
                    a.settle(reserved, &record.backend, record.cost, record.prompt_tokens, record.completion_tokens);
                    a.period_start
                })
                .collect()
        })
    }

    pub fn release(&self, budgets: &Budgets, amount: Usd, now: i64) {
        self.with_all(budgets.levels(), now, |accounts| accounts.iter_mut().for_each(|a| a.release(amount)));
    }

    /// The smallest remaining across levels (`None`: no level has a budget).
    pub fn remaining(&self, budgets: &Budgets, now: i64) -> Option<Left> {
        if !budgets.any_limit() {
            return None;
        }
        let per_level: SmallVec<[Option<Usd>; 3]> =
            budgets.iter().map(|b| b.limit.map(|limit| self.with(b, now, |a| a.remaining(limit)))).collect();
        budgets.smallest(per_level)
    }

    pub fn snapshot(&self, budget: &Budget, now: i64) -> Account {
        self.with(budget, now, |a| a.clone())
    }

    /// Drops the accounts last used before `idle_before` that hold no reservation and that no
    /// request holds right now, and says how many. Only where the spend can be read back (a
    /// loader): the next use of a dropped account reads it from storage. The caller makes sure
    /// that everything settled before `idle_before` is in storage.
    pub fn evict_idle(&self, idle_before: i64) -> usize {
        if self.loader.is_none() {
            return 0;
        }
        let before = self.live.len();
        // A dropped cell is marked under its lock: a request that found it before (levels
        // remember their cells) sees the mark when it locks it, and goes back to the map. A
        // cell locked right now is in use: kept (waiting for it here, under the shard's lock,
        // could deadlock with a request looking up its next level).
        self.live.retain(|_, cell| {
            let mut cell = match cell.try_lock() {
                Ok(cell) => cell,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return true,
            };
            let keep = cell.used_at >= idle_before || cell.account.reserved > Usd::ZERO;
            cell.evicted = !keep;
            keep
        });
        before - self.live.len()
    }

    /// Accounts in memory.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Users' accounts in their current period at `now`, among the accounts used since the
    /// start (users with no request in it are left out). A scan of the live accounts: an
    /// admin's read, not a request's.
    pub fn standings(&self, now: i64) -> Vec<super::Standing> {
        self.live
            .iter()
            .filter(|entry| super::budgets::is_user_account(entry.key()))
            .filter_map(|entry| {
                let cell = entry.value().lock().unwrap_or_else(PoisonError::into_inner);
                let current = cell.account.period_start == period::start(cell.period, now);
                (current && cell.account.totals.requests > 0)
                    .then(|| super::Standing { user: Arc::clone(entry.key()), account: cell.account.clone() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::config::BudgetPeriod;
    use crate::ledger::budgets::Scope;

    fn level(scope: Scope, account: &str, limit: Option<i64>) -> Budget {
        Budget::new(scope, account.into(), limit.map(Usd::from_pico), BudgetPeriod::Total)
    }

    fn chain(key: Option<i64>, user: Option<i64>, team: Option<i64>, user_name: &str) -> Budgets {
        Budgets::from_levels(
            [
                key.map(|k| level(Scope::Key, &format!("~key:{user_name}"), Some(k))),
                Some(level(Scope::User, user_name, user)),
                team.map(|t| level(Scope::Team, "~team:t", Some(t))),
            ]
            .into_iter()
            .flatten(),
        )
    }

    #[test]
    fn a_level_that_is_short_refuses_and_nothing_is_reserved_anywhere() {
        let accounts = Accounts::default();
        let ann = chain(Some(100), Some(1000), Some(150), "ann");
        let bob = chain(None, Some(1000), Some(150), "bob");
        assert!(matches!(accounts.reserve(&ann, Usd::from_pico(90), 0), Reserve::Reserved { .. }));
        // Bob's own budget fits; the team's does not.
        let refused = accounts.reserve(&bob, Usd::from_pico(70), 0);
        assert_eq!(refused, Reserve::Refused { scope: Scope::Team, remaining: Usd::from_pico(60) });
        assert_eq!(accounts.snapshot(bob.user(), 0).reserved, Usd::ZERO, "all or none");
        // Ann's key is the shortest level now.
        let left = accounts.remaining(&ann, 0).unwrap();
        assert_eq!((left.scope, left.usd), (Scope::Key, Usd::from_pico(10)));
        let refused = accounts.reserve(&ann, Usd::from_pico(20), 0);
        assert_eq!(refused, Reserve::Refused { scope: Scope::Key, remaining: Usd::from_pico(10) });
    }

    #[test]
    fn accounts_without_storage_behind_them_never_leave_memory() {
        let accounts = Accounts::default();
        let ann = chain(None, Some(1000), None, "ann");
        accounts.snapshot(ann.user(), 0);
        assert_eq!(accounts.evict_idle(i64::MAX), 0, "the memory ledger's spend exists only here");
        assert_eq!(accounts.live_count(), 1);
    }

    fn record(cost: i64) -> RequestRecord {
        RequestRecord {
            at_ms: 0,
            user: "x".into(),
            route: "r".into(),
            backend: "b".into(),
            reason: "cost-first".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: Usd::from_pico(cost),
            status: 200,
            latency_ms: 0,
            request_id: None,
        }
    }

    #[test]
    fn a_level_that_remembered_an_evicted_account_books_into_the_one_read_back() {
        // The file's spend, as the writer would have left it.
        let stored = Arc::new(Mutex::new(100i64));
        let file = Arc::clone(&stored);
        let accounts = Accounts::with_loader(Box::new(move |_, start| {
            let mut account = Account::new(start);
            account.totals.spent = Usd::from_pico(*file.lock().unwrap());
            Some(account)
        }));
        let earlier = chain(None, Some(1000), None, "ann");
        accounts.settle(&earlier, Usd::ZERO, &record(10), 0);
        *stored.lock().unwrap() = 110;
        assert_eq!(accounts.evict_idle(i64::MAX), 1);
        // `earlier` still remembers the dropped cell; a principal resolved later does not.
        let later = chain(None, Some(1000), None, "ann");
        accounts.settle(&earlier, Usd::ZERO, &record(5), 0);
        accounts.settle(&later, Usd::ZERO, &record(7), 0);
        let fresh = chain(None, Some(1000), None, "ann");
        assert_eq!(accounts.snapshot(fresh.user(), 0).totals.spent, Usd::from_pico(122), "one account, not two");
        assert_eq!(accounts.remaining(&earlier, 0).unwrap().usd, Usd::from_pico(878));
    }

    #[test]
    fn a_level_used_with_two_ledgers_books_into_each_its_own() {
        let (first, second) = (Accounts::default(), Accounts::default());
        let ann = chain(None, Some(1000), None, "ann");
        first.settle(&ann, Usd::ZERO, &record(10), 0);
        second.settle(&ann, Usd::ZERO, &record(3), 0);
        first.settle(&ann, Usd::ZERO, &record(1), 0);
        assert_eq!(first.snapshot(ann.user(), 0).totals.spent, Usd::from_pico(11));
        assert_eq!(second.snapshot(ann.user(), 0).totals.spent, Usd::from_pico(3));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(usize, i64),
        Settle(usize, i64),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3, 1i64..50).prop_map(|(who, amount)| Op::Reserve(who, amount)),
            (0usize..64, 0i64..50).prop_map(|(i, f)| Op::Settle(i, f)),
            (0usize..64).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Three users of one team, one of them on a key with a budget of its own: any
        /// interleaving of reserve, settle (at most what was reserved) and release keeps every
        /// level's spent + reserved within its budget, and leaves nothing reserved once every
        /// reservation is settled or released.
        #[test]
        fn no_level_ever_exceeds_its_budget_and_no_reservation_is_left_behind(
            key in 0i64..300, user in 0i64..300, team in 0i64..500,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let accounts = Accounts::default();
            let chains = [
                chain(Some(key), Some(user), Some(team), "a"),
                chain(None, Some(user), Some(team), "b"),
                chain(None, None, Some(team), "c"),
            ];
            let mut open: Vec<(usize, i64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Reserve(who, amount) => {
                        if let Reserve::Reserved { .. } = accounts.reserve(&chains[who], Usd::from_pico(amount), 0) {
                            open.push((who, amount));
                        }
                    }
                    Op::Settle(i, fraction) if !open.is_empty() => {
                        let (who, amount) = open.swap_remove(i % open.len());
                        accounts.settle(&chains[who], Usd::from_pico(amount), &record(amount * fraction / 50), 0);
                    }
                    Op::Release(i) if !open.is_empty() => {
                        let (who, amount) = open.swap_remove(i % open.len());
                        accounts.release(&chains[who], Usd::from_pico(amount), 0);
                    }
                    _ => {}
                }
                for budgets in &chains {
                    for level in budgets {
                        let a = accounts.snapshot(level, 0);
                        if let Some(limit) = level.limit {
                            prop_assert!(a.totals.spent.saturating_add(a.reserved) <= limit, "{level:?}: {a:?}");
                        }
                    }
                }
            }
            for (who, amount) in open.drain(..) {
                accounts.release(&chains[who], Usd::from_pico(amount), 0);
            }
            for budgets in &chains {
                for level in budgets {
                    prop_assert_eq!(accounts.snapshot(level, 0).reserved, Usd::ZERO);
                }
            }
        }
    }

    #[test]
    fn concurrent_reservations_across_shared_levels_never_deadlock_or_overspend() {
        let accounts = Arc::new(Accounts::default());
        let chains: Arc<Vec<Budgets>> =
            Arc::new((0..6).map(|i| chain(Some(40), Some(60), Some(200), &format!("u{i}"))).collect());
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let (accounts, chains) = (Arc::clone(&accounts), Arc::clone(&chains));
                std::thread::spawn(move || {
                    let mut granted = 0;
                    for i in 0..2000 {
                        let budgets = &chains[(t + i) % chains.len()];
                        if let Reserve::Reserved { .. } = accounts.reserve(budgets, Usd::from_pico(1), 0) {
                            granted += 1;
                        }
                    }
                    granted
                })
            })
            .collect();
        let granted: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 200, "the team's budget, exactly");
        assert_eq!(accounts.snapshot(chains[0].iter().last().unwrap(), 0).reserved, Usd::from_pico(200));
    }
}
