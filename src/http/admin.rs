//! `/admin/*`: the admin key's check, request records and config reload. Usage is in
//! [`super::usage`], tenants in [`super::tenants`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;

use crate::app::AppState;
use crate::auth::{bearer, sha256, AuthError};
use crate::error::ApiError;
use crate::ledger::period;
use crate::telemetry::RequestId;

/// A request that carries the admin key. As an extractor, an admin handler cannot leave the
/// check out, and it runs before the handler's body or path are read.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        authorize(state, &parts.headers).map(|()| Admin)
    }
}

/// Checks the admin key. Both sides are hashed before comparing, so the comparison time does
/// not depend on how much of a guess is right.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let snapshot = state.snapshot.load();
    let Some(admin_key_sha256) = snapshot.admin_key_sha256 else { return Err(ApiError::AdminDisabled) };
    let presented = bearer(headers)?;
    if sha256(presented.as_bytes()) == admin_key_sha256 {
        Ok(())
    } else {
        Err(AuthError::Unknown.into())
    }
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
    _: Admin,
    axum::extract::Query(query): axum::extract::Query<RecordsQuery>,
) -> Result<impl IntoResponse, ApiError> {
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
