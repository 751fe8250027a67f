//! The order of every user by a figure of its period, for `/admin/usage?sort=...`: built from
//! the ledger's standings joined to the directory (a few hundred milliseconds with 100,000
//! users), so it is kept and shared rather than rebuilt for each page. A page is cut from the
//! kept order; its rows' figures are read live, so a page is exact, and the order is at most
//! [`FRESH`] old plus one rebuild: an older one is answered at once and rebuilt in the
//! background.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::{Economics, Figures, Sort};
use crate::app::AppState;
use crate::config::User;
use crate::error::ApiError;
use crate::ledger::{period, Account};
use crate::snapshot::Snapshot;
use crate::tenancy::store::UserQuery;

/// Users read from the directory per call while the rows are built.
const DIRECTORY_CHUNK: usize = 10_000;

/// How long an order is used before a request for it starts a rebuild.
pub const FRESH: Duration = Duration::from_secs(5);

/// Every user's figures as of `built_at`, and its orders, each sorted when first asked for.
pub(super) struct Ranked {
    pub(super) built_at: Instant,
    pub(super) rows: Vec<RankedRow>,
    /// Indices into `rows` by (sort, descending): see [`Ranked::order`].
    orders: [OnceLock<Vec<usize>>; 2 * Sort::ALL.len()],
}

/// What ordering and filtering a user needs; a page's figures are read live.
pub(super) struct RankedRow {
    pub(super) user: String,
    pub(super) plan: Option<Arc<str>>,
    pub(super) team: Option<Arc<str>>,
    pub(super) economics: Economics,
}

impl Ranked {
    /// The rows by `sort` (`descending` or not), rows without the figure last whatever the
    /// order, then by name: every page of a walk is disjoint from the others. Sorted once per
    /// kept order.
    pub(super) fn order(&self, sort: Sort, descending: bool) -> &[usize] {
        self.orders[2 * sort.index() + usize::from(descending)].get_or_init(|| {
            let mut order: Vec<usize> = (0..self.rows.len()).collect();
            order.sort_by(|&a, &b| {
                let (a, b) = (&self.rows[a], &self.rows[b]);
                let by_figure = match (sort.key(&a.economics), sort.key(&b.economics)) {
                    (Some(x), Some(y)) if descending => y.total_cmp(&x),
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                };
                by_figure.then_with(|| a.user.cmp(&b.user))
            });
            order
        })
    }
}

/// The kept order, and whether a rebuild is under way.
#[derive(Default)]
pub struct RankedUsers {
    current: ArcSwapOption<Ranked>,
    /// One build at a time: a stampede of first pages waits for the same one.
    building: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
}

impl RankedUsers {
    /// The kept order; built now when there is none, rebuilt in the background when stale.
    pub(super) async fn get(&self, state: &Arc<AppState>) -> Result<Arc<Ranked>, ApiError> {
        if let Some(ranked) = self.current.load_full() {
            if ranked.built_at.elapsed() > FRESH {
                Self::refresh_in_background(state);
            }
            return Ok(ranked);
        }
        let _one = self.building.lock().await;
        if let Some(ranked) = self.current.load_full() {
            return Ok(ranked);
        }
        self.rebuild(state).await
    }

    /// Starts a rebuild when there is no order or a stale one: at sign-in to the dashboard and
    /// when its page loads, so that the page's first sorted table finds the order (nearly)
    /// ready after a restart.
    pub fn warm_up(state: &Arc<AppState>) {
        let stale = state.ranked_users.current.load().as_ref().is_none_or(|r| r.built_at.elapsed() > FRESH);
        if stale {
            Self::refresh_in_background(state);
        }
    }

    /// Starts a rebuild unless one is under way.
    fn refresh_in_background(state: &Arc<AppState>) {
        if state.ranked_users.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let ranked_users = &state.ranked_users;
            let _one = ranked_users.building.lock().await;
            if let Err(e) = ranked_users.rebuild(&state).await {
                tracing::warn!(error = %e, "ranking users for the dashboard failed");
            }
            ranked_users.refreshing.store(false, Ordering::Release);
        });
    }

    async fn rebuild(&self, state: &AppState) -> Result<Arc<Ranked>, ApiError> {
        let snapshot = state.snapshot.load_full();
        let figures = Figures::new(&snapshot, crate::clock::unix_now());
        let started = Instant::now();
        let rows = rows(state, &snapshot, &figures).await?;
        tracing::debug!(users = rows.len(), took_ms = started.elapsed().as_millis(), "users ranked");
        let ranked = Arc::new(Ranked { built_at: started, rows, orders: Default::default() });
        self.current.store(Some(Arc::clone(&ranked)));
        Ok(ranked)
    }
}

/// Every user (config and API users) with its figures for the period: the ledger's standings
/// joined to the directory, no per-user read.
async fn rows(state: &AppState, snapshot: &Snapshot, figures: &Figures) -> Result<Vec<RankedRow>, ApiError> {
    let mut accounts: HashMap<Arc<str>, Vec<Account>> = HashMap::new();
    for standing in state.ledger.standings(figures.now).await? {
        accounts.entry(standing.user).or_default().push(standing.account);
    }
    let mut rows = Vec::new();
    let mut add = |user: &User| {
        let start = period::start(user.budget_period, figures.now);
        let found = accounts.get(user.name.as_str()).and_then(|list| list.iter().find(|a| a.period_start == start));
        let economics = figures.economics(user, found.unwrap_or(&Account::new(start)));
        rows.push(RankedRow { user: user.name.clone(), plan: user.plan.clone(), team: user.team.clone(), economics });
    };
    for user in &snapshot.config.users {
        add(user);
    }
    let mut query = UserQuery { after: None, limit: DIRECTORY_CHUNK, ..UserQuery::default() };
    loop {
        let members = state.tenants.directory.users(&query).await?;
        for member in &members {
            if snapshot.user(&member.name).is_none() {
                add(&crate::tenancy::reported_user(member, &snapshot.config));
            }
        }
        if members.len() < DIRECTORY_CHUNK {
            break;
        }
        query.after = members.last().map(|m| m.name.clone());
    }
    Ok(rows)
}
