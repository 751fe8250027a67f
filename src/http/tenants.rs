//! `/admin/teams`, `/admin/users` and `/admin/keys`: tenants managed through the API, behind
//! the admin key. Bodies are JSON objects whose unknown fields are refused (a typo must not be
//! silently ignored); every change drops what it touched from the key cache at once.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::admin::Admin;
use crate::app::AppState;
use crate::config::BudgetPeriod;
use crate::cost::Usd;
use crate::error::ApiError;
use crate::ledger::period::{self, rfc3339};
use crate::tenancy::model::{generate_key, generate_key_id, valid_name, ApiKey, Member, Team};
use crate::tenancy::overrides;
use crate::tenancy::store::{StoreError, TeamDeletion, UserQuery};

/// Users per page by default, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A list call's page size: `limit`, or the default; 400 outside 1..=1000.
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad(format!("`limit` must be between 1 and {MAX_PAGE}"), "limit"));
    }
    Ok(limit)
}
/// The longest a rotated key may keep working.
const MAX_GRACE_S: u64 = 30 * 86_400;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(name) => ApiError::Conflict(format!("`{name}` already exists")),
            StoreError::Storage(reason) => {
                tracing::error!(%reason, "tenant store failed");
                ApiError::Internal
            }
            // The 503 a key lookup gets when the store is away (`tenant_store_unavailable`).
            StoreError::Unavailable(e) => ApiError::Auth(crate::auth::AuthError::Unavailable(e.to_string())),
        }
    }
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// A JSON object body with only `allowed` fields.
fn object(body: &Bytes, allowed: &[&'static str]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = if body.is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), None))?
    };
    let Value::Object(map) = value else { return Err(ApiError::bad_request("the body must be a JSON object", None)) };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let message = format!("unknown field `{unknown}` (expected one of: {})", allowed.join(", "));
        return Err(ApiError::bad_request(message, None));
    }
    Ok(map)
}

fn name_field(map: &Map<String, Value>, field: &'static str) -> Result<String, ApiError> {
    match map.get(field).and_then(Value::as_str) {
        Some(name) if valid_name(name) => Ok(name.to_owned()),
        Some(_) => Err(bad(format!("`{field}` must match [A-Za-z0-9._-]{{1,64}}"), field)),
        None => Err(bad(format!("`{field}` is required (a string)"), field)),
    }
}

/// `Some(None)` when the field is `null` (to clear it), `None` when absent.
fn amount_field(map: &Map<String, Value>, field: &'static str) -> Result<Option<Option<Usd>>, ApiError> {
    match map.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => overrides::usd(v)
            .map(|u| Some(Some(u)))
            .ok_or_else(|| bad(format!("`{field}` must be a number of USD from 0 to 1000000"), field)),
    }
}

fn period_field(map: &Map<String, Value>, field: &'static str) -> Result<Option<BudgetPeriod>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(BudgetPeriod::parse)
            .map(Some)
            .ok_or_else(|| bad(format!("`{field}` must be \"day\", \"month\" or \"total\""), field)),
    }
}

fn team_json(t: &Team) -> Value {
    json!({
        "name": t.name,
        "budget_usd": t.budget_usd.map(Usd::as_f64),
        "budget_period": period::name(t.budget_period),
        "created_at": rfc3339(t.created_at),
    })
}

/// A user as the API shows it, with its effective limits under `config`'s plans.
fn user_json(config: &crate::config::Config, u: &Member) -> Value {
    let plan = config.plan(&u.plan);
    let effective = plan.map(|plan| {
        let user = crate::tenancy::effective_user(u, plan);
        json!({
            "policy": user.policy.as_str(),
            "budget_usd": user.budget_usd.map(Usd::as_f64),
            "budget_period": period::name(user.budget_period),
            "max_request_usd": user.max_request_usd.map(Usd::as_f64),
            "min_quality": user.min_quality,
            "rpm": user.rpm,
            "tpm": user.tpm,
            "pacing": user.pacing.is_some(),
            "clamp_max_tokens": user.clamp_max_tokens,
        })
    });
    json!({
        "name": u.name,
        "plan": u.plan,
        "team": u.team,
        "overrides": overrides::to_json(&u.overrides),
        "metrics": u.metrics,
        "price_usd": plan.map(|p| p.price_usd.as_f64()),
        "limits": effective,
        "created_at": rfc3339(u.created_at),
    })
}

fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "label": k.label,
        "prefix": k.prefix,
        "created_at": rfc3339(k.created_at),
        "last_used_at": k.last_used_at.map(rfc3339),
        "expires_at": k.expires_at.map(rfc3339),
        "revoked": k.revoked_at.is_some(),
        "budget_usd": k.budget_usd.map(Usd::as_f64),
        "budget_period": period::name(k.budget_period),
        "rpm": k.rpm,
        "end_users": k.end_users.as_ref().map(|plan| json!({ "plan": plan })),
    })
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

// ---- teams --------------------------------------------------------------------------------

pub async fn create_team(State(state): State<Arc<AppState>>, _: Admin, body: Bytes) -> Result<Response, ApiError> {
    let map = object(&body, &["name", "budget_usd", "budget_period"])?;
    let team = Team {
        name: name_field(&map, "name")?,
        budget_usd: amount_field(&map, "budget_usd")?.flatten(),
        budget_period: period_field(&map, "budget_period")?.unwrap_or(BudgetPeriod::Month),
        created_at: crate::clock::unix_now(),
    };
    state.tenants.directory.insert_team(team.clone()).await?;
    Ok(created(team_json(&team)))
}

async fn team_named(state: &AppState, name: &str) -> Result<Team, ApiError> {
    state.tenants.directory.team(name).await?.ok_or_else(|| ApiError::NotFound(format!("no team is named `{name}`")))
}

pub async fn get_team(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(team_json(&team_named(&state, &name).await?)).into_response())
}

pub async fn update_team(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body, &["budget_usd", "budget_period"])?;
    let mut team = team_named(&state, &name).await?;
    if let Some(budget) = amount_field(&map, "budget_usd")? {
        team.budget_usd = budget;
    }
    if let Some(period) = period_field(&map, "budget_period")? {
        team.budget_period = period;
    }
    if !state.tenants.directory.replace_team(team.clone()).await? {
        return Err(ApiError::NotFound(format!("no team is named `{name}`")));
    }
    state.tenants.forget_team(&name);
    Ok(Json(team_json(&team)).into_response())
}

pub async fn delete_team(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match state.tenants.directory.delete_team(&name).await? {
        TeamDeletion::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        TeamDeletion::Absent => Err(ApiError::NotFound(format!("no team is named `{name}`"))),
        TeamDeletion::HasMembers(n) => {
            Err(ApiError::Conflict(format!("team `{name}` still has {n} members: move or delete them first")))
        }
    }
}

// ---- users --------------------------------------------------------------------------------

/// Checks a user's `plan`, `team` and `metrics` against the config and the store.
async fn check_membership(state: &AppState, user: &Member, metrics_was: bool) -> Result<(), ApiError> {
    if state.snapshot.load().config.plan(&user.plan).is_none() {
        return Err(bad(format!("no plan is named `{}`", user.plan), "plan"));
    }
    if let Some(team) = &user.team {
        if state.tenants.directory.team(team).await?.is_none() {
            return Err(bad(format!("no team is named `{team}`"), "team"));
        }
    }
    if user.metrics && !metrics_was {
        let max = u64::from(state.snapshot.load().config.metrics.max_user_series);
        if state.tenants.directory.count_metrics_users().await? >= max {
            let message = format!("`[metrics] max_user_series` ({max}) users already have per-user series");
            return Err(bad(message, "metrics"));
        }
    }
    Ok(())
}

fn team_of(map: &Map<String, Value>) -> Result<Option<Option<String>>, ApiError> {
    match map.get("team") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(_) => name_field(map, "team").map(|t| Some(Some(t))),
    }
}

fn bool_field(map: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, ApiError> {
    match map.get(field) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(format!("`{field}` must be true or false"), field)),
    }
}

fn overrides_of(map: &Map<String, Value>) -> Result<Option<crate::config::LimitOverrides>, ApiError> {
    map.get("overrides")
        .map(|v| {
            overrides::from_json(v)
                .map_err(|(field, message)| ApiError::bad_request(format!("`{field}` {message}"), Some("overrides")))
        })
        .transpose()
}

pub async fn create_user(State(state): State<Arc<AppState>>, _: Admin, body: Bytes) -> Result<Response, ApiError> {
    let map = object(&body, &["name", "plan", "team", "overrides", "metrics"])?;
    let user = Member {
        name: name_field(&map, "name")?,
        plan: name_field(&map, "plan")?,
        team: team_of(&map)?.flatten(),
        overrides: overrides_of(&map)?.unwrap_or_default(),
        metrics: bool_field(&map, "metrics")?.unwrap_or(false),
        created_at: crate::clock::unix_now(),
    };
    if state.snapshot.load().user(&user.name).is_some() {
        return Err(ApiError::Conflict(format!("`{}` is a user of the config file", user.name)));
    }
    check_membership(&state, &user, false).await?;
    state.tenants.directory.insert_user(user.clone()).await?;
    Ok(created(user_json(&state.snapshot.load().config, &user)))
}

async fn user_named(state: &AppState, name: &str) -> Result<Member, ApiError> {
    state
        .tenants
        .directory
        .user(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no API user is named `{name}`")))
}

pub async fn get_user(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let user = user_named(&state, &name).await?;
    Ok(Json(user_json(&state.snapshot.load().config, &user)).into_response())
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    plan: Option<String>,
    team: Option<String>,
}

/// `GET /admin/users`: by name; `next_cursor` continues after the last one (`null`: no more).
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = page_limit(q.limit)?;
    // One more than asked says whether there is a next page without another query.
    let query = UserQuery { after: q.cursor, limit: limit + 1, plan: q.plan, team: q.team };
    let mut users = state.tenants.directory.users(&query).await?;
    let more = users.len() > limit;
    users.truncate(limit);
    let next = if more { users.last().map(|u| u.name.clone()) } else { None };
    let snapshot = state.snapshot.load();
    let data: Vec<Value> = users.iter().map(|u| user_json(&snapshot.config, u)).collect();
    Ok(Json(json!({ "object": "list", "data": data, "next_cursor": next })).into_response())
}

pub async fn update_user(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body, &["plan", "team", "overrides", "metrics"])?;
    let mut user = user_named(&state, &name).await?;
    let metrics_was = user.metrics;
    if map.contains_key("plan") {
        user.plan = name_field(&map, "plan")?;
    }
    if let Some(team) = team_of(&map)? {
        user.team = team;
    }
    if let Some(o) = overrides_of(&map)? {
        user.overrides = o;
    }
    if let Some(metrics) = bool_field(&map, "metrics")? {
        user.metrics = metrics;
    }
    check_membership(&state, &user, metrics_was).await?;
    if !state.tenants.directory.replace_user(user.clone()).await? {
        return Err(ApiError::NotFound(format!("no API user is named `{name}`")));
    }
    state.tenants.forget_user(&name);
    Ok(Json(user_json(&state.snapshot.load().config, &user)).into_response())
}

pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let revoked = state.tenants.directory.delete_user(&name, crate::clock::unix_now()).await?;
    let Some(revoked) = revoked else {
        return Err(ApiError::NotFound(format!("no API user is named `{name}`")));
    };
    for sha in &revoked {
        state.tenants.forget_key(sha);
    }
    state.tenants.forget_user(&name);
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- keys ---------------------------------------------------------------------------------

/// `expires_at`: an RFC 3339 time or Unix seconds, in the future.
fn expiry_field(map: &Map<String, Value>, now: i64) -> Result<Option<i64>, ApiError> {
    let at = match map.get("expires_at") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => period::parse_rfc3339(text).map(|ms| ms.div_euclid(1000)),
        Some(v) => v.as_i64(),
    };
    match at {
        Some(at) if at > now => Ok(Some(at)),
        Some(_) => Err(bad("`expires_at` is in the past", "expires_at")),
        None => Err(bad("`expires_at` must be an RFC 3339 time or Unix seconds", "expires_at")),
    }
}

/// A new key for `user` with the given settings; answers with the plaintext, once.
async fn issue(state: &AppState, mut key: ApiKey) -> Result<Response, ApiError> {
    let (plaintext, sha256, prefix) = generate_key().map_err(|e| {
        tracing::error!(error = %e, "the OS random generator failed");
        ApiError::Internal
    })?;
    key.id = generate_key_id().map_err(|_| ApiError::Internal)?;
    if key.lineage.is_empty() {
        key.lineage.clone_from(&key.id);
    }
    key.sha256 = sha256;
    key.prefix = prefix;
    state.tenants.directory.insert_key(key.clone()).await?;
    // A lookup of this key made a moment ago (a client trying it early) must not be refused.
    state.tenants.forget_unknown(&sha256);
    Ok(created(json!({
        "id": key.id,
        "key": plaintext,
        "label": key.label,
        "prefix": key.prefix,
        "created_at": rfc3339(key.created_at),
        "expires_at": key.expires_at.map(rfc3339),
        "budget_usd": key.budget_usd.map(Usd::as_f64),
        "budget_period": period::name(key.budget_period),
        "rpm": key.rpm,
        "end_users": key.end_users.as_ref().map(|plan| json!({ "plan": plan })),
    })))
}

pub async fn create_key(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body, &["label", "expires_at", "budget_usd", "budget_period", "rpm", "end_users"])?;
    user_named(&state, &name).await?;
    let now = crate::clock::unix_now();
    let label = match map.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 128 && !s.chars().any(char::is_control) => Some(s.clone()),
        Some(_) => return Err(bad("`label` must be a string of at most 128 printable characters", "label")),
    };
    let rpm = match map.get("rpm") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("`rpm` must be a whole number above 0", "rpm"))?,
        ),
    };
    let key = ApiKey {
        id: String::new(),
        user: name,
        sha256: [0; 32],
        prefix: String::new(),
        label,
        created_at: now,
        expires_at: expiry_field(&map, now)?,
        revoked_at: None,
        last_used_at: None,
        budget_usd: amount_field(&map, "budget_usd")?.flatten(),
        budget_period: period_field(&map, "budget_period")?.unwrap_or(BudgetPeriod::Total),
        rpm,
        end_users: end_users_field(&state, &map)?,
        lineage: String::new(),
    };
    issue(&state, key).await
}

/// `end_users: {"plan": "<plan>"}`: a service key whose requests name end users on that plan.
fn end_users_field(state: &AppState, map: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    let plan = match map.get("end_users") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) if o.len() == 1 => o.get("plan").and_then(Value::as_str),
        Some(_) => None,
    };
    let plan = plan.ok_or_else(|| bad("`end_users` must be {\"plan\": \"<plan>\"}", "end_users"))?;
    if state.snapshot.load().config.plan(plan).is_none() {
        return Err(bad(format!("no plan is named `{plan}`"), "end_users"));
    }
    Ok(Some(plan.to_owned()))
}

pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    user_named(&state, &name).await?;
    let keys = state.tenants.keys_of(&name).await?;
    let data: Vec<Value> = keys.iter().map(key_json).collect();
    Ok(Json(json!({ "object": "list", "data": data })).into_response())
}

async fn key_with_id(state: &AppState, id: &str) -> Result<ApiKey, ApiError> {
    state.tenants.directory.key(id).await?.ok_or_else(|| ApiError::NotFound(format!("no key has the id `{id}`")))
}

pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut key = key_with_id(&state, &id).await?;
    if key.revoked_at.is_none() {
        key.revoked_at = Some(crate::clock::unix_now());
        state.tenants.directory.replace_key(key.clone()).await?;
    }
    state.tenants.forget_key(&key.sha256);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /admin/keys/{id}/rotate`: a new key with the old one's settings; the old one keeps
/// working for `grace_s` seconds (0: revoked now).
pub async fn rotate_key(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body, &["grace_s"])?;
    let grace = match map.get("grace_s") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .filter(|g| *g <= MAX_GRACE_S)
            .ok_or_else(|| bad(format!("`grace_s` must be a whole number from 0 to {MAX_GRACE_S}"), "grace_s"))?,
    };
    let mut old = key_with_id(&state, &id).await?;
    let now = crate::clock::unix_now();
    if !old.usable(now) {
        return Err(ApiError::Conflict(format!("key `{id}` is revoked or expired: create a new key instead")));
    }
    let fresh = ApiKey { created_at: now, last_used_at: None, ..old.clone() };
    let response = issue(&state, fresh).await?;
    if grace == 0 {
        old.revoked_at = Some(now);
    } else {
        let until = now.saturating_add(i64::try_from(grace).unwrap_or(i64::MAX));
        old.expires_at = Some(old.expires_at.map_or(until, |at| at.min(until)));
    }
    state.tenants.directory.replace_key(old.clone()).await?;
    state.tenants.forget_key(&old.sha256);
    Ok(response)
}
