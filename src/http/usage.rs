//! `/admin/usage`: what users spend, config and API users alike, with their plan's price and
//! the margin it leaves; `/admin/teams/{name}/usage`: a team's spend and its members'.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::admin::Admin;
use crate::app::AppState;
use crate::config::User;
use crate::error::ApiError;
use crate::ledger::{period, Account, Budgets, Totals};
use crate::snapshot::Snapshot;
use crate::tenancy::store::UserQuery;

mod ranked;
pub use ranked::RankedUsers;

/// Members listed in a team's usage at most.
const MAX_TEAM_MEMBERS: usize = 1000;

#[derive(Serialize)]
struct BackendUsage {
    spent_usd: f64,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl From<&Totals> for BackendUsage {
    fn from(t: &Totals) -> Self {
        Self {
            spent_usd: t.spent.as_f64(),
            requests: t.requests,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct UserUsage {
    user: String,
    plan: Option<String>,
    team: Option<String>,
    period: &'static str,
    period_start: String,
    budget_usd: Option<f64>,
    spent_usd: f64,
    reserved_usd: f64,
    remaining_usd: Option<f64>,
    /// What the user pays per period (its plan's price).
    price_usd: Option<f64>,
    /// `price_usd - spent_usd`: negative when the user costs more than it pays.
    margin_usd: Option<f64>,
    /// `spent_usd / budget_usd`.
    budget_used: Option<f64>,
    /// The period's spend at its pace so far, at the period's end (`None` for `total`).
    projection_usd: Option<f64>,
    /// Share of the period's requests served by the premium backends (`None` before any).
    premium_share: Option<f64>,
    period_end: Option<String>,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    by_backend: BTreeMap<String, BackendUsage>,
}

/// What the figures of a user's row need besides its account.
struct Figures {
    now: i64,
    /// The backends of the highest quality in the running config: a request served by one
    /// counts toward the premium share.
    premium: std::collections::HashSet<String>,
}

/// The backends of the highest quality in `config`: what the premium shares count.
pub fn premium_backends(config: &crate::config::Config) -> std::collections::HashSet<String> {
    let best = config.backends.iter().map(|b| b.quality).fold(f64::NEG_INFINITY, f64::max);
    config.backends.iter().filter(|b| b.quality >= best).map(|b| b.name.clone()).collect()
}

impl Figures {
    fn new(snapshot: &Snapshot, now: i64) -> Self {
        Self { now, premium: premium_backends(&snapshot.config) }
    }

    fn usage_of(&self, user: &User, account: &Account) -> UserUsage {
        let economics = self.economics(user, account);
        UserUsage {
            user: user.name.clone(),
            plan: user.plan.as_deref().map(str::to_owned),
            team: user.team.as_deref().map(str::to_owned),
            period: period::name(user.budget_period),
            period_start: period::rfc3339(account.period_start),
            budget_usd: user.budget_usd.map(|b| b.as_f64()),
            spent_usd: economics.spent,
            reserved_usd: account.reserved.as_f64(),
            remaining_usd: user.budget_usd.map(|b| account.remaining(b).as_f64()),
            price_usd: user.price_usd.map(|p| p.as_f64()),
            margin_usd: economics.margin,
            budget_used: economics.budget_used,
            projection_usd: economics.projection,
            premium_share: economics.premium_share,
            period_end: period::end(user.budget_period, account.period_start).map(period::rfc3339),
            requests: account.totals.requests,
            prompt_tokens: account.totals.prompt_tokens,
            completion_tokens: account.totals.completion_tokens,
            by_backend: account.by_backend.iter().map(|(name, t)| (name.to_owned(), t.into())).collect(),
        }
    }

    /// The figures of a user's period that the users table sorts by.
    fn economics(&self, user: &User, account: &Account) -> Economics {
        let spent = account.totals.spent.as_f64();
        let end = period::end(user.budget_period, account.period_start);
        let premium_requests: u64 =
            account.by_backend.iter().filter(|(name, _)| self.premium.contains(*name)).map(|(_, t)| t.requests).sum();
        Economics {
            spent,
            margin: user.price_usd.map(|p| p.as_f64() - spent),
            budget_used: user.budget_usd.filter(|b| b.pico() > 0).map(|b| spent / b.as_f64()),
            // As `tollgate report` projects it, so both say the same.
            projection: end
                .and_then(|end| crate::report::project(account.totals.spent, account.period_start, end, self.now))
                .map(crate::cost::Usd::as_f64),
            #[expect(clippy::cast_precision_loss, reason = "a share, not a count")]
            premium_share: (account.totals.requests > 0)
                .then(|| premium_requests as f64 / account.totals.requests as f64),
            requests: account.totals.requests,
        }
    }
}

/// A user's figures for its period that the users table sorts by (see [`UserUsage`]).
#[derive(Debug, Clone, Copy)]
struct Economics {
    spent: f64,
    margin: Option<f64>,
    budget_used: Option<f64>,
    projection: Option<f64>,
    premium_share: Option<f64>,
    requests: u64,
}

/// A user's effective limits by name: a config user's, or an API user's (its plan's with its
/// overrides; a plan the config no longer has leaves the defaults, named).
async fn effective_user_named(
    state: &AppState,
    snapshot: &Snapshot,
    name: &str,
) -> Result<Option<Arc<User>>, ApiError> {
    if let Some(principal) = snapshot.user(name) {
        return Ok(Some(Arc::clone(&principal.user)));
    }
    let Some(member) = state.tenants.directory.user(name).await? else { return Ok(None) };
    Ok(Some(Arc::new(crate::tenancy::reported_user(&member, &snapshot.config))))
}

async fn usage(state: &AppState, user: &User, figures: &Figures) -> Result<UserUsage, ApiError> {
    let account = state.ledger.usage(Budgets::of_user(user).user(), figures.now).await?;
    Ok(figures.usage_of(user, &account))
}

#[derive(serde::Deserialize)]
pub struct UsageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// `name` (default), or one of [`Sort`]'s figures.
    sort: Option<String>,
    /// `desc` (default) or `asc`, for a figure's sort.
    order: Option<String>,
    plan: Option<String>,
    team: Option<String>,
    /// `true`: only users whose spend this period is above their plan's price.
    over_price: Option<bool>,
}

/// The figures the users table sorts by, besides the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Spent,
    Margin,
    BudgetUsed,
    Projection,
    PremiumShare,
    Requests,
}

impl Sort {
    const NAMES: &'static str = "`name`, `spent`, `margin`, `budget_used`, `projection`, `premium_share` or `requests`";

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "spent" => Self::Spent,
            "margin" => Self::Margin,
            "budget_used" => Self::BudgetUsed,
            "projection" => Self::Projection,
            "premium_share" => Self::PremiumShare,
            "requests" => Self::Requests,
            _ => return None,
        })
    }

    /// Every sort, in the order [`Sort::index`] numbers them.
    const ALL: [Self; 6] =
        [Self::Spent, Self::Margin, Self::BudgetUsed, Self::Projection, Self::PremiumShare, Self::Requests];

    fn index(self) -> usize {
        self as usize
    }

    #[expect(clippy::cast_precision_loss, reason = "an order, not a count")]
    fn key(self, e: &Economics) -> Option<f64> {
        match self {
            Self::Spent => Some(e.spent),
            Self::Margin => e.margin,
            Self::BudgetUsed => e.budget_used,
            Self::Projection => e.projection,
            Self::PremiumShare => e.premium_share,
            Self::Requests => Some(e.requests as f64),
        }
    }
}

/// `GET /admin/usage`: every user's usage, by name (config and API users merged; the cursor
/// is the last name) or by a figure of the period (`sort`, `order`; the cursor is then an
/// offset). `next_cursor` continues; `null` when there is no more.
pub async fn all_usage(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(q): Query<UsageQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = super::tenants::page_limit(q.limit)?;
    let snapshot = state.snapshot.load_full();
    let figures = Figures::new(&snapshot, crate::clock::unix_now());
    let over_price = q.over_price.unwrap_or(false);
    let costs_more = |margin: Option<f64>| !over_price || margin.is_some_and(|m| m < 0.0);
    let (data, next) = match q.sort.as_deref() {
        None | Some("name") => {
            let (users, next) = page_by_name(&state, &snapshot, &q, limit).await?;
            let mut data = Vec::with_capacity(users.len());
            for user in users.iter().filter(|u| wanted(&q, u.plan.as_deref(), u.team.as_deref())) {
                let entry = usage(&state, user, &figures).await?;
                if costs_more(entry.margin_usd) {
                    data.push(entry);
                }
            }
            (data, next)
        }
        Some(name) => {
            let sort = Sort::parse(name).ok_or_else(|| {
                ApiError::bad_request(format!("`sort` must be {}, not `{name}`", Sort::NAMES), Some("sort"))
            })?;
            let descending = match q.order.as_deref() {
                None | Some("desc") => true,
                Some("asc") => false,
                Some(other) => {
                    let message = format!("`order` must be `asc` or `desc`, not `{other}`");
                    return Err(ApiError::bad_request(message, Some("order")));
                }
            };
            let offset = match q.cursor.as_deref() {
                None => 0,
                Some(c) => c.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(
                        format!("with `sort={name}`, `cursor` is the offset `next_cursor` gave"),
                        Some("cursor"),
                    )
                })?,
            };
            let ranked = state.ranked_users.get(&state).await?;
            let mut matching = ranked
                .order(sort, descending)
                .iter()
                .filter_map(|&i| ranked.rows.get(i))
                .filter(|r| wanted(&q, r.plan.as_deref(), r.team.as_deref()) && costs_more(r.economics.margin));
            let page: Vec<&ranked::RankedRow> = matching.by_ref().skip(offset).take(limit).collect();
            let next = matching.next().is_some().then(|| offset.saturating_add(limit).to_string());
            // The order is kept a few seconds; the page's figures are read now.
            let mut data = Vec::with_capacity(limit);
            for row in page {
                if let Some(user) = effective_user_named(&state, &snapshot, &row.user).await? {
                    data.push(usage(&state, &user, &figures).await?);
                }
            }
            (data, next)
        }
    };
    Ok(Json(serde_json::json!({ "object": "list", "data": data, "next_cursor": next })))
}

/// Whether the query's plan and team filters keep a user on `plan` and `team`.
fn wanted(q: &UsageQuery, plan: Option<&str>, team: Option<&str>) -> bool {
    q.plan.as_deref().is_none_or(|p| plan == Some(p)) && q.team.as_deref().is_none_or(|t| team == Some(t))
}

/// One page of users by name after the cursor: config users and API users merged.
async fn page_by_name(
    state: &AppState,
    snapshot: &Snapshot,
    q: &UsageQuery,
    limit: usize,
) -> Result<(Vec<Arc<User>>, Option<String>), ApiError> {
    let after = q.cursor.as_deref().unwrap_or("");
    let mut config_users: Vec<Arc<User>> =
        snapshot.config.users.iter().filter(|u| u.name.as_str() > after).cloned().collect();
    config_users.sort_by(|a, b| a.name.cmp(&b.name));
    let query = UserQuery { after: q.cursor.clone(), limit: limit + 1, plan: q.plan.clone(), team: q.team.clone() };
    let api_users: Vec<Arc<User>> = {
        let mut out = Vec::new();
        for member in state.tenants.directory.users(&query).await? {
            if let Some(user) = effective_user_named(state, snapshot, &member.name).await? {
                out.push(user);
            }
        }
        out
    };
    let mut merged: Vec<Arc<User>> = config_users.into_iter().chain(api_users).collect();
    merged.sort_by(|a, b| a.name.cmp(&b.name));
    let more = merged.len() > limit;
    merged.truncate(limit);
    let next = if more { merged.last().map(|u| u.name.clone()) } else { None };
    Ok((merged, next))
}

pub async fn user_usage(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let snapshot = state.snapshot.load_full();
    let user = effective_user_named(&state, &snapshot, &name).await?.ok_or(ApiError::UnknownUser(name))?;
    let figures = Figures::new(&snapshot, crate::clock::unix_now());
    Ok::<_, ApiError>(Json(usage(&state, &user, &figures).await?))
}

/// `GET /admin/teams/{name}/usage`: the team's spend against its budget, and its members'.
pub async fn team_usage(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let team = state
        .tenants
        .directory
        .team(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no team is named `{name}`")))?;
    let now = crate::clock::unix_now();
    let account = state.ledger.usage(&crate::tenancy::team_budget(&team), now).await?;
    let query = UserQuery { team: Some(name.clone()), limit: MAX_TEAM_MEMBERS, ..Default::default() };
    let snapshot = state.snapshot.load_full();
    let figures = Figures::new(&snapshot, now);
    let mut members = Vec::new();
    for member in state.tenants.directory.users(&query).await? {
        if let Some(user) = effective_user_named(&state, &snapshot, &member.name).await? {
            members.push(usage(&state, &user, &figures).await?);
        }
    }
    Ok::<_, ApiError>(Json(serde_json::json!({
        "team": team.name,
        "period": period::name(team.budget_period),
        "period_start": period::rfc3339(account.period_start),
        "budget_usd": team.budget_usd.map(|b| b.as_f64()),
        "spent_usd": account.totals.spent.as_f64(),
        "reserved_usd": account.reserved.as_f64(),
        "remaining_usd": team.budget_usd.map(|b| account.remaining(b).as_f64()),
        "requests": account.totals.requests,
        "prompt_tokens": account.totals.prompt_tokens,
        "completion_tokens": account.totals.completion_tokens,
        "members": members,
    })))
}
