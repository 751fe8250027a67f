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

/// Members listed in a team's usage at most.
const MAX_TEAM_MEMBERS: usize = 1000;
/// Users ranked by spend at most (`sort=spent`).
const MAX_RANKED: usize = 10_000;

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
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    by_backend: BTreeMap<String, BackendUsage>,
}

fn usage_of(user: &User, account: &Account) -> UserUsage {
    UserUsage {
        user: user.name.clone(),
        plan: user.plan.as_deref().map(str::to_owned),
        team: user.team.as_deref().map(str::to_owned),
        period: period::name(user.budget_period),
        period_start: period::rfc3339(account.period_start),
        budget_usd: user.budget_usd.map(|b| b.as_f64()),
        spent_usd: account.totals.spent.as_f64(),
        reserved_usd: account.reserved.as_f64(),
        remaining_usd: user.budget_usd.map(|b| account.remaining(b).as_f64()),
        price_usd: user.price_usd.map(|p| p.as_f64()),
        margin_usd: user.price_usd.map(|p| p.as_f64() - account.totals.spent.as_f64()),
        requests: account.totals.requests,
        prompt_tokens: account.totals.prompt_tokens,
        completion_tokens: account.totals.completion_tokens,
        by_backend: account.by_backend.iter().map(|(name, t)| (name.clone(), t.into())).collect(),
    }
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

async fn usage(state: &AppState, user: &User, now: i64) -> Result<UserUsage, ApiError> {
    let account = state.ledger.usage(Budgets::of_user(user).user(), now).await?;
    Ok(usage_of(user, &account))
}

#[derive(serde::Deserialize)]
pub struct UsageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// `name` (default) or `spent`.
    sort: Option<String>,
    plan: Option<String>,
    team: Option<String>,
    /// `true`: only users whose spend this period is above their plan's price.
    over_price: Option<bool>,
}

/// `GET /admin/usage`: every user's usage, by name (config and API users merged) or by spend
/// this period (`sort=spent`, most first; the cursor is then an offset). `next_cursor`
/// continues; `null` when there is no more.
pub async fn all_usage(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(q): Query<UsageQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = super::tenants::page_limit(q.limit)?;
    let snapshot = state.snapshot.load_full();
    let now = crate::clock::unix_now();
    let wanted = |u: &User| {
        q.plan.as_deref().is_none_or(|p| u.plan.as_deref() == Some(p))
            && q.team.as_deref().is_none_or(|t| u.team.as_deref() == Some(t))
    };
    let over_price = q.over_price.unwrap_or(false);
    let (data, next) = match q.sort.as_deref() {
        None | Some("name") => {
            let (users, next) = page_by_name(&state, &snapshot, &q, limit).await?;
            let mut data = Vec::with_capacity(users.len());
            for user in users.iter().filter(|u| wanted(u)) {
                let entry = usage(&state, user, now).await?;
                if !over_price || entry.margin_usd.is_some_and(|m| m < 0.0) {
                    data.push(entry);
                }
            }
            (data, next)
        }
        Some("spent") => {
            let offset = match q.cursor.as_deref() {
                None => 0,
                Some(c) => c.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(
                        "with `sort=spent`, `cursor` is the offset `next_cursor` gave",
                        Some("cursor"),
                    )
                })?,
            };
            let ranked = state.ledger.ranking(now, MAX_RANKED).await?;
            let mut data = Vec::with_capacity(limit);
            let mut position = offset;
            for (name, _) in ranked.iter().skip(offset) {
                if data.len() == limit {
                    break;
                }
                position += 1;
                let Some(user) = effective_user_named(&state, &snapshot, name).await? else { continue };
                if !wanted(&user) {
                    continue;
                }
                let entry = usage(&state, &user, now).await?;
                if !over_price || entry.margin_usd.is_some_and(|m| m < 0.0) {
                    data.push(entry);
                }
            }
            let next = (position < ranked.len()).then(|| position.to_string());
            (data, next)
        }
        Some(other) => {
            let message = format!("`sort` must be `name` or `spent`, not `{other}`");
            return Err(ApiError::bad_request(message, Some("sort")));
        }
    };
    Ok(Json(serde_json::json!({ "object": "list", "data": data, "next_cursor": next })))
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
    Ok::<_, ApiError>(Json(usage(&state, &user, crate::clock::unix_now()).await?))
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
    let mut members = Vec::new();
    for member in state.tenants.directory.users(&query).await? {
        if let Some(user) = effective_user_named(&state, &snapshot, &member.name).await? {
            members.push(usage(&state, &user, now).await?);
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
