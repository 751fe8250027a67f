//! The budgets one request is reserved against: its key's, its user's and its team's, each an
//! account of its own with its own period. Reserving checks every level in one atomic step
//! (all reserve or none does); what is left is the smallest remaining across levels.

use std::sync::Arc;

use smallvec::SmallVec;

use super::accounts::CellRef;
use super::period;
use crate::config::{BudgetPeriod, User};
use crate::cost::Usd;

/// A level of the principal chain, as `x-tollgate-budget-scope` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Key,
    User,
    Team,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::User => "user",
            Self::Team => "team",
        }
    }
}

/// One level's account: its ledger name, budget and period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub scope: Scope,
    /// The account's name in the ledger: the user's name (as before levels existed), or
    /// [`key_account`] / [`team_account`], whose `~` no principal name can hold.
    pub account: Arc<str>,
    /// `None`: spend is recorded, nothing is refused.
    pub limit: Option<Usd>,
    pub period: BudgetPeriod,
    /// Where an in-process ledger keeps this account, found on the level's first use: a
    /// principal's later requests go straight to it instead of looking it up by name.
    pub(super) cell: CellRef,
}

impl Budget {
    pub fn new(scope: Scope, account: Arc<str>, limit: Option<Usd>, period: BudgetPeriod) -> Self {
        Self { scope, account, limit, period, cell: CellRef::default() }
    }
}

/// The ledger account of API key `id`.
pub fn key_account(id: &str) -> Arc<str> {
    format!("~key:{id}").into()
}

/// The ledger account of team `name`.
pub fn team_account(name: &str) -> Arc<str> {
    format!("~team:{name}").into()
}

/// Whether a ledger account is a user's (reports list users, not keys or teams).
pub fn is_user_account(account: &str) -> bool {
    !account.starts_with('~')
}

/// What is left across levels: the smallest remaining, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    pub usd: Usd,
    pub scope: Scope,
    pub period: BudgetPeriod,
}

impl Left {
    /// Seconds until the level that is short starts a new period (`None`: it never does).
    pub fn resets_in(&self, now: i64) -> Option<u64> {
        period::end(self.period, now).map(|end| u64::try_from(end - now).unwrap_or(0))
    }
}

/// The levels of one request, in lock order: key, user, team. The user level is always there
/// (its spend is what reports show); the key level only when the key has a budget of its own;
/// the team level whenever the user is in a team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    levels: SmallVec<[Budget; 3]>,
}

impl Budgets {
    /// A user alone: its own budget, as before principals had keys and teams. Built once per
    /// principal (it allocates), never per request.
    pub fn of_user(user: &User) -> Self {
        Self::new(None, user, None)
    }

    pub fn new(key: Option<Budget>, user: &User, team: Option<Budget>) -> Self {
        let user_level = Budget::new(Scope::User, Arc::from(user.name.as_str()), user.budget_usd, user.budget_period);
        let mut levels = SmallVec::new();
        levels.extend(key);
        levels.push(user_level);
        levels.extend(team);
        Self { levels }
    }

    /// Levels given in lock order (key, user, team), as a store reads them back.
    pub fn from_levels(levels: impl IntoIterator<Item = Budget>) -> Self {
        Self { levels: levels.into_iter().collect() }
    }

    /// Touches what the reservation and the settlement will read of each level (its account
    /// cell and its name, which records carry), so those loads start now, together: see
    /// [`Principal::warm`](crate::tenancy::Principal::warm).
    pub fn warm(&self) {
        for level in &self.levels {
            std::hint::black_box(level.account.as_bytes().first().copied());
            level.cell.warm();
        }
    }

    /// The levels in lock order.
    pub fn levels(&self) -> &[Budget] {
        &self.levels
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Budget> {
        self.levels.iter()
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// The chain's root: its last level (the team's when there is one, else the top user's).
    /// On a Redis Cluster every level's keys share its hash slot, so that one script reserves
    /// or settles all of them.
    pub fn root(&self) -> &Arc<str> {
        &self.levels[self.levels.len() - 1].account
    }

    /// The user's level.
    pub fn user(&self) -> &Budget {
        self.levels.iter().find(|b| b.scope == Scope::User).unwrap_or(&self.levels[0])
    }

    /// Whether any level has a budget (else nothing needs reading before a decision).
    pub fn any_limit(&self) -> bool {
        self.levels.iter().any(|b| b.limit.is_some())
    }

    /// The smallest of `remaining`, given per level in [`Self::iter`] order (`None`: no
    /// budget at that level).
    pub fn smallest(&self, remaining: impl IntoIterator<Item = Option<Usd>>) -> Option<Left> {
        self.levels
            .iter()
            .zip(remaining)
            .filter_map(|(b, left)| left.map(|usd| Left { usd, scope: b.scope, period: b.period }))
            .min_by_key(|l| l.usd)
    }
}

impl<'a> IntoIterator for &'a Budgets {
    type Item = &'a Budget;
    type IntoIter = std::slice::Iter<'a, Budget>;
    fn into_iter(self) -> Self::IntoIter {
        self.levels.iter()
    }
}
