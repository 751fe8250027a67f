//! `GET /v1/key`: a client's own limits with its own key: who it is, its plan and team, and
//! for each budget level what is spent, reserved and left, and when the period resets. No
//! admin key needed, so a client can see why it is refused before it is.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::cost::Usd;
use crate::error::ApiError;
use crate::ledger::{period, Budget, Scope};
use crate::tenancy::Principal;

/// What a level is called: the key's id, the user's or the team's name.
fn level_name<'a>(level: &'a Budget, principal: &'a Principal) -> &'a str {
    match level.scope {
        Scope::Key => principal.key.as_ref().map_or("", |k| &*k.id),
        Scope::User => &level.account,
        Scope::Team => level.account.trim_start_matches("~team:"),
    }
}

pub async fn show(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let result = async {
        let snapshot = state.snapshot.load_full();
        let mut principal = state.authenticate(&snapshot, &headers, tokio::time::Instant::now()).await?;
        let now = crate::clock::unix_now();
        // A service key answers for one of its end users when the request names one.
        let end_user = headers.get(super::proxy::HEADER_END_USER).and_then(|v| v.to_str().ok());
        if let (Some(id), Some(_)) = (end_user, principal.key.as_ref().and_then(|k| k.end_users.as_ref())) {
            if !crate::tenancy::model::valid_end_user(id) {
                let message =
                    format!("`{}` must be 1 to 64 of letters, digits and `._@+-`", super::proxy::HEADER_END_USER);
                return Err(ApiError::bad_request(message, Some(super::proxy::HEADER_END_USER)));
            }
            principal = state.tenants.end_user(&snapshot.config, &principal, id, now).await?;
        }
        let mut levels = Vec::new();
        for level in principal.budgets.iter() {
            let account = state.ledger.usage(level, now).await?;
            levels.push(json!({
                "scope": level.scope.as_str(),
                "name": level_name(level, &principal),
                "budget_usd": level.limit.map(Usd::as_f64),
                "period": period::name(level.period),
                "period_start": period::rfc3339(account.period_start),
                "resets_at": period::end(level.period, now).map(period::rfc3339),
                "spent_usd": account.totals.spent.as_f64(),
                "reserved_usd": account.reserved.as_f64(),
                "remaining_usd": level.limit.map(|l| account.remaining(l).as_f64()),
            }));
        }
        let left = crate::ledger::remaining(&state.ledger, &principal.budgets, now).await?;
        let user = &principal.user;
        let key = principal.key.as_ref().map(|k| {
            json!({
                "id": &*k.id,
                "expires_at": k.expires_at.map(period::rfc3339),
                "end_users": k.end_users.as_deref().map(|plan| json!({ "plan": plan })),
            })
        });
        Ok::<Value, ApiError>(json!({
            "user": user.name,
            "plan": user.plan.as_deref(),
            "team": user.team.as_deref(),
            "key": key,
            "limits": {
                "policy": user.policy.as_str(),
                "min_quality": user.min_quality,
                "max_request_usd": user.max_request_usd.map(Usd::as_f64),
                "rpm": user.rpm,
                "tpm": user.tpm,
            },
            "budgets": levels,
            "remaining_usd": left.map(|l| l.usd.as_f64()),
            "limited_by": left.map(|l| l.scope.as_str()),
        }))
    }
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => {
            state.metrics.count_rejected(error.code());
            error.into_response()
        }
    }
}
