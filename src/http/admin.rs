//! `/admin/*`: per-user usage and config reload, behind the admin key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::app::AppState;
use crate::auth::{bearer, sha256, AuthError};
use crate::config::User;
use crate::error::ApiError;
use crate::ledger::{period, Account, Budgets, Totals};
use crate::tenancy::Principal;

/// Checks the admin key. Both sides are hashed before comparing, so the comparison time does
/// not depend on how much of a guess is right.
pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let snapshot = state.snapshot.load();
    let Some(admin_key_sha256) = snapshot.admin_key_sha256 else { return Err(ApiError::AdminDisabled) };
    let presented = bearer(headers)?;
    if sha256(presented.as_bytes()) == admin_key_sha256 {
        Ok(())
    } else {
        Err(AuthError::Unknown.into())
    }
}

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
    period: &'static str,
    period_start: String,
    budget_usd: Option<f64>,
    spent_usd: f64,
    reserved_usd: f64,
    remaining_usd: Option<f64>,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    by_backend: BTreeMap<String, BackendUsage>,
}

fn usage_of(user: &User, account: &Account) -> UserUsage {
    UserUsage {
        user: user.name.clone(),
        period: period::name(user.budget_period),
        period_start: period::rfc3339(account.period_start),
        budget_usd: user.budget_usd.map(|b| b.as_f64()),
        spent_usd: account.totals.spent.as_f64(),
        reserved_usd: account.reserved.as_f64(),
        remaining_usd: user.budget_usd.map(|b| account.remaining(b).as_f64()),
        requests: account.totals.requests,
        prompt_tokens: account.totals.prompt_tokens,
        completion_tokens: account.totals.completion_tokens,
        by_backend: account.by_backend.iter().map(|(name, t)| (name.clone(), t.into())).collect(),
    }
}

async fn report(state: &AppState, principal: &Principal) -> Result<UserUsage, ApiError> {
    let account = state.ledger.usage(principal.budgets.user(), crate::clock::unix_now()).await?;
    Ok(usage_of(&principal.user, &account))
}

pub async fn all_usage(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let snapshot = state.snapshot.load_full();
        let mut data = Vec::with_capacity(snapshot.config.users.len());
        for user in &snapshot.config.users {
            if let Some(principal) = snapshot.keys.get(&user.key_sha256) {
                data.push(report(&state, principal).await?);
            }
        }
        Ok::<_, ApiError>(Json(serde_json::json!({ "object": "list", "data": data })))
    }
    .await;
    result.into_response()
}

pub async fn user_usage(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let snapshot = state.snapshot.load_full();
        if let Some(principal) = snapshot.user(&name) {
            return Ok(Json(report(&state, principal).await?));
        }
        let member = state.tenants.directory.user(&name).await?.ok_or(ApiError::UnknownUser(name))?;
        let plan = snapshot.config.plan(&member.plan).ok_or_else(|| {
            ApiError::Conflict(format!("the plan `{}` of this user is not in the config", member.plan))
        })?;
        let user = crate::tenancy::effective_user(&member, plan);
        let account = state.ledger.usage(Budgets::of_user(&user).user(), crate::clock::unix_now()).await?;
        Ok::<_, ApiError>(Json(usage_of(&user, &account)))
    }
    .await;
    result.into_response()
}

/// Members listed in a team's usage at most.
const MAX_TEAM_MEMBERS: usize = 1000;

/// `GET /admin/teams/{name}/usage`: the team's spend against its budget, and its members'.
pub async fn team_usage(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let team = state
            .tenants
            .directory
            .team(&name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no team is named `{name}`")))?;
        let now = crate::clock::unix_now();
        let budget = crate::tenancy::team_budget(&team);
        let account = state.ledger.usage(&budget, now).await?;
        let query = crate::tenancy::store::UserQuery {
            team: Some(name.clone()),
            limit: MAX_TEAM_MEMBERS,
            ..Default::default()
        };
        let snapshot = state.snapshot.load_full();
        let mut members = Vec::new();
        for member in state.tenants.directory.users(&query).await? {
            if let Some(plan) = snapshot.config.plan(&member.plan) {
                let user = crate::tenancy::effective_user(&member, plan);
                let spend = state.ledger.usage(Budgets::of_user(&user).user(), now).await?;
                members.push(usage_of(&user, &spend));
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
    .await;
    result.into_response()
}

#[derive(serde::Deserialize)]
pub struct RecordsQuery {
    limit: Option<usize>,
}

/// Records kept per request at most in one answer.
const MAX_RECORDS_PER_ANSWER: usize = 10_000;

/// `GET /admin/requests?limit=N`: the most recent request records, oldest first.
pub async fn requests(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<RecordsQuery>,
) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let limit = query.limit.unwrap_or(100).min(MAX_RECORDS_PER_ANSWER);
        let records = state.ledger.records(limit).await?;
        let data: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "at": period::rfc3339(r.at_ms.div_euclid(1000)),
                    "at_ms": r.at_ms,
                    "user": &*r.user,
                    "route": &*r.route,
                    "backend": &*r.backend,
                    "reason": r.reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "cost_usd": r.cost.as_f64(),
                    "status": r.status,
                    "latency_ms": r.latency_ms,
                })
            })
            .collect();
        Ok::<_, ApiError>(Json(serde_json::json!({ "object": "list", "data": data })))
    }
    .await;
    result.into_response()
}

pub async fn reload(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let applied =
            crate::reload::reload(&state, "admin").await.map_err(|e| ApiError::ReloadRefused(e.to_string()))?;
        Ok::<_, ApiError>(Json(serde_json::json!({ "status": "reloaded", "applied": applied })))
    }
    .await;
    result.into_response()
}
