//! Tenants: who a request is for, whether it came from the config file or the admin API.
//!
//! A request's key resolves to one [`Principal`]: the chain key → user → team, each level with
//! its effective limits (the plan's, with the user's overrides), its budgets and its rate
//! limits. Everything downstream (policy, ledger, limiter, metering) takes the principal and
//! knows nothing of where it came from.
//!
//! Config users are resolved from the snapshot's key table. API users live in the ledger's
//! store ([`store::Directory`]) and are read into a bounded in-memory cache as their keys show
//! up ([`cache`]); unknown keys are remembered for a minute, so a flood of random keys costs
//! one store lookup per key per minute. Every change made through the admin API drops what it
//! touched from the cache at once, and a reload (which may change plans) drops everything.

pub mod cache;
pub mod model;
pub mod overrides;
pub mod redis;
pub mod sqlite;
pub mod store;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::config::{Config, Plan, User};
use crate::ledger::budgets::{key_account, team_account, Budget, Budgets, Scope};
use crate::metering::meters::{MeterRow, PairMeters};
use crate::metrics::Metrics;
use crate::ratelimit::{user_allowance, Allowance};
use model::{ApiKey, Member, Team};

/// Who a request is for: its user's effective limits and every level's budget and rate
/// limits, resolved once and shared by the requests that present the same key.
///
/// One allocation, laid out (`repr(C)`) in the order a request reads it: with ten thousand
/// principals in use each one is cold, and every further allocation or cache line a request
/// reads is a miss. So what authentication reads sits next to the reference count it writes,
/// the budget levels are inline (a reservation holds the principal), the key's expiry and
/// whether it serves end users are copied in, and its use is noted here (its key's record was
/// read on every request for those; now once a second).
#[derive(Debug)]
#[repr(C)]
pub struct Principal {
    /// The last second (Unix) it admitted a request ([`Principal::last_use`]).
    seen_at: AtomicI64,
    /// Its key's expiry (`i64::MAX`: none), copied from the key.
    expires_at: i64,
    /// Whether its key serves end users (requests must name one), copied from the key.
    serves_end_users: bool,
    pub user: Arc<User>,
    /// The rate limits of its levels, key first; levels without limits are left out.
    pub allowances: Box<[Allowance]>,
    meters: MeterRow,
    pub budgets: Budgets,
    /// The API key presented (`None`: a config user's key).
    pub key: Option<Arc<KeyGrant>>,
    /// For an end user: the service user whose key named it.
    pub service: Option<Arc<str>>,
}

/// What a request needs to know of the API key it came with.
#[derive(Debug)]
pub struct KeyGrant {
    pub id: Arc<str>,
    pub sha256: [u8; 32],
    /// A service key's end users' plan: requests must name an end user.
    pub end_users: Option<Arc<str>>,
    /// Unix seconds after which the key is refused (an expiry, or a rotation's grace).
    pub expires_at: Option<i64>,
    /// When the store last had it used, or, for a service key, its end users were last seen
    /// on this replica (Unix seconds): with the principal's own uses, `last_used_at`.
    pub last_used: AtomicI64,
    /// The last use written to the store.
    pub reported: AtomicI64,
}

impl crate::ledger::HoldsBudgets for Principal {
    fn budgets(&self) -> &Budgets {
        &self.budgets
    }
}

impl Principal {
    /// Touches, right after authentication, what the rest of the request will read of this
    /// principal: its user's limits and each level's account. With thousands of principals in
    /// use each of those lines is a cache miss (~0.2-0.4 µs here); met one by one, between
    /// parsing, deciding and reserving, each stalled the worker, while loads issued together
    /// overlap and are ready by the time the body is parsed.
    pub fn warm(&self) {
        let user = &*self.user;
        std::hint::black_box((user.budget_usd, user.pacing.is_some(), user.plan.is_some()));
        self.meters.warm();
        self.budgets.warm();
    }

    /// A config user: its own budget and rate limits, no key or team levels.
    pub fn of_config_user(user: Arc<User>) -> Self {
        Self {
            budgets: Budgets::of_user(&user),
            allowances: user_allowance(&user).into_iter().collect(),
            user,
            seen_at: AtomicI64::new(0),
            expires_at: i64::MAX,
            serves_end_users: false,
            key: None,
            service: None,
            meters: MeterRow::default(),
        }
    }

    /// An API user on `plan`, presenting `key`, in `team` when it has one.
    pub fn of_member(member: &Member, plan: &Plan, team: Option<&Team>, key: &ApiKey) -> Self {
        let user = effective_user(member, plan);
        let key_budget = key
            .budget_usd
            .map(|limit| Budget::new(Scope::Key, key_account(&key.lineage), Some(limit), key.budget_period));
        let team_budget = team.map(team_budget);
        let key_allowance =
            key.rpm.map(|rpm| Allowance { account: key_account(&key.lineage), rpm: Some(rpm), tpm: None });
        Self {
            budgets: Budgets::new(key_budget, &user, team_budget),
            allowances: key_allowance.into_iter().chain(user_allowance(&user)).collect(),
            user: Arc::new(user),
            seen_at: AtomicI64::new(0),
            expires_at: key.expires_at.unwrap_or(i64::MAX),
            serves_end_users: key.end_users.is_some(),
            key: Some(Arc::new(KeyGrant {
                id: key.id.as_str().into(),
                sha256: key.sha256,
                end_users: key.end_users.as_deref().map(Into::into),
                expires_at: key.expires_at,
                last_used: AtomicI64::new(key.last_used_at.unwrap_or(0)),
                reported: AtomicI64::new(key.last_used_at.unwrap_or(0)),
            })),
            service: None,
            meters: MeterRow::default(),
        }
    }

    /// End user `member` (on `plan`) of the service principal `service`: its own level after
    /// the service key's, then the service user's and its team's, so the service's budgets
    /// cap all of its end users together.
    pub fn of_end_user(member: &Member, plan: &Plan, service: &Principal) -> Self {
        let user = effective_user(member, plan);
        let own = Budget::new(Scope::User, Arc::from(member.name.as_str()), user.budget_usd, user.budget_period);
        let mut levels: Vec<Budget> = Vec::with_capacity(service.budgets.len() + 1);
        for level in service.budgets.iter() {
            if level.scope == Scope::User {
                levels.push(own.clone());
            }
            levels.push(level.clone());
        }
        let key_allowances = service.allowances.iter().filter(|a| a.account.starts_with("~key:")).cloned();
        let service_allowances = service.allowances.iter().filter(|a| !a.account.starts_with("~key:")).cloned();
        let mut user = user;
        user.team.clone_from(&service.user.team);
        Self {
            budgets: Budgets::from_levels(levels),
            allowances: key_allowances.chain(user_allowance(&user)).chain(service_allowances).collect(),
            user: Arc::new(user),
            seen_at: AtomicI64::new(0),
            expires_at: service.expires_at,
            // Named by its service's requests; never authenticated itself.
            serves_end_users: false,
            key: service.key.clone(),
            service: Some(service.user.name.as_str().into()),
            meters: MeterRow::default(),
        }
    }

    /// The metric series of this principal on backend `index` (named `backend`) of a config
    /// with `backends` backends.
    pub fn pair(&self, metrics: &Metrics, backend: (usize, &str), backends: usize) -> Arc<PairMeters> {
        self.meters.pair(metrics, &self.user, backend, backends)
    }

    /// Whether requests with its key must name an end user (a service key's).
    pub fn serves_end_users(&self) -> bool {
        self.serves_end_users
    }

    /// The user's name, as request records carry it (its own budget level's account).
    pub fn name(&self) -> &Arc<str> {
        &self.budgets.user().account
    }

    /// Whether its key may be used at `now` (Unix seconds); notes the use.
    ///
    /// The use is noted in the principal, whose line the request reads anyway, and in the key
    /// only for an end user, whose key is its service's: writing the key's record once a
    /// second cost a cold line on a third of the requests of a key in steady use (10,000 keys
    /// at 30,000 requests a second).
    pub fn admits(&self, now: i64) -> bool {
        if self.seen_at.load(Ordering::Relaxed) < now {
            self.seen_at.store(now, Ordering::Relaxed);
            if let Some(key) = self.key.as_ref().filter(|_| self.service.is_some()) {
                key.last_used.fetch_max(now, Ordering::Relaxed);
            }
        }
        now < self.expires_at
    }

    /// When its key was last used (Unix seconds; 0: never): by this principal, its end users,
    /// or, before this replica resolved it, as the store had it.
    pub fn last_use(&self) -> i64 {
        let own = self.seen_at.load(Ordering::Relaxed);
        self.key.as_ref().map_or(own, |key| own.max(key.last_used.load(Ordering::Relaxed)))
    }
}

/// The directory that goes with the ledger: in memory beside the `memory` ledger, tables in
/// the ledger's file beside `sqlite`, and the ledger's Redis (`shared`) beside `redis`.
pub fn open(
    ledger: &crate::config::Ledger,
    shared: Option<&Arc<crate::ledger::redis::Store>>,
) -> Result<Arc<dyn store::Directory>, store::StoreError> {
    Ok(match (&ledger.store, shared) {
        (crate::config::LedgerStore::Sqlite { path }, _) => Arc::new(sqlite::SqliteDirectory::open(path.as_ref())?),
        (_, Some(store)) => Arc::new(redis::RedisDirectory::new(Arc::clone(store))),
        _ => Arc::new(store::MemoryDirectory::default()),
    })
}

/// An API user's effective limits: its plan's, with its overrides.
pub fn effective_user(member: &Member, plan: &Plan) -> User {
    let limits = member.overrides.apply(&plan.limits);
    let mut user = User::new(member.name.clone(), &limits);
    user.plan = Some(plan.name.as_str().into());
    user.price_usd = Some(plan.price_usd);
    user.team = member.team.as_deref().map(Into::into);
    user.series = member.metrics;
    user
}

/// A team's budget level.
pub fn team_budget(team: &Team) -> Budget {
    Budget::new(Scope::Team, team_account(&team.name), team.budget_usd, team.budget_period)
}

/// An API user as usage and reports show it: its effective limits, or, when `config` no longer
/// has its plan, the default limits under that plan's name.
pub fn reported_user(member: &Member, config: &Config) -> User {
    match config.plan(&member.plan) {
        Some(plan) => effective_user(member, plan),
        None => {
            let mut user = User::new(member.name.clone(), &crate::config::Limits::default());
            user.plan = Some(member.plan.as_str().into());
            user
        }
    }
}
