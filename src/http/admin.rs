//! `/admin/*`: the admin key's check, request records and config reload. Usage is in
//! [`super::usage`], tenants in [`super::tenants`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::IntoResponse;
use axum::Json;

use crate::app::AppState;
use crate::auth::{bearer, sha256, AuthError};
use crate::error::ApiError;
use crate::ledger::period;
use crate::telemetry::RequestId;

/// A request that carries the admin key (or, for reading, a dashboard session begun with it).
/// As an extractor, an admin handler cannot leave the check out, and it runs before the
/// handler's body or path are read.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        authorize(state, &parts.method, &parts.headers).map(|()| Admin)
    }
}

/// Checks the admin key. Both sides are hashed before comparing, so the comparison time does
/// not depend on how much of a guess is right.
///
/// A bearer header, when there is one, decides. Without one, a GET (or HEAD) may present the
/// dashboard's session cookie instead. Only reads: a browser attaches a cookie to requests
/// other pages make, and SameSite=Strict stops other *sites* but not other origins of the same
/// site (a sibling subdomain, another port on this host), which could then post admin writes
/// (create keys, reload) with it. A cross-origin read gets nothing: the answer carries no CORS
/// header, so the other page cannot see it.
fn authorize(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let snapshot = state.snapshot.load();
    let Some(admin_key_sha256) = snapshot.admin_key_sha256 else { return Err(ApiError::AdminDisabled) };
    let presented = match bearer(headers) {
        Ok(presented) => presented,
        Err(AuthError::Missing)
            if matches!(*method, Method::GET | Method::HEAD)
                && super::dashboard::has_session(state, headers, &admin_key_sha256) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if sha256(presented.as_bytes()) == admin_key_sha256 {
        Ok(())
    } else {
        Err(AuthError::Unknown.into())
    }
}

#[derive(serde::Deserialize)]
pub struct RecordsQuery {
    limit: Option<usize>,
    /// Only this user's records ([`crate::ledger::Ledger::user_records`]).
    user: Option<String>,
}

/// Records kept per request at most in one answer.
const MAX_RECORDS_PER_ANSWER: usize = 10_000;

/// `GET /admin/requests?limit=N[&user=NAME]`: the most recent request records, oldest first;
/// with `user`, only that user's.
pub async fn requests(
    State(state): State<Arc<AppState>>,
    _: Admin,
    axum::extract::Query(query): axum::extract::Query<RecordsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = query.limit.unwrap_or(100).min(MAX_RECORDS_PER_ANSWER);
    let records = match query.user.as_deref() {
        None => state.ledger.records(limit).await?,
        Some(user) => state.ledger.user_records(user, limit).await?,
    };
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
                "request_id": r.request_id.as_ref().map(RequestId::as_str),
            })
        })
        .collect();
    Ok::<_, ApiError>(Json(serde_json::json!({ "object": "list", "data": data })))
}

pub async fn reload(State(state): State<Arc<AppState>>, _: Admin) -> Result<impl IntoResponse, ApiError> {
    let applied = crate::reload::reload(&state, "admin").await.map_err(|e| ApiError::ReloadRefused(e.to_string()))?;
    Ok::<_, ApiError>(Json(serde_json::json!({ "status": "reloaded", "applied": applied })))
}
