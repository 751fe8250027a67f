//! Liveness, readiness and the Prometheus scrape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;

/// The process is up and serving HTTP.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready for traffic: a config is loaded, the process is not draining for shutdown, and a
/// shared ledger that must be reached (`fail-closed`) answers, so a load balancer sends no
/// requests here that could only be refused while Redis has no primary.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !state.ledger.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

/// The scrape. Open by default (Prometheus convention on an internal network: it shows user
/// names and spend, never keys or key hashes); `server.metrics_key_env` puts it behind a key.
pub async fn metrics(State(state): State<Arc<AppState>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(key_sha256) = state.snapshot.load().metrics_key_sha256 {
        let presented = crate::auth::bearer(&headers).map(|k| crate::auth::sha256(k.as_bytes()));
        if presented.ok() != Some(key_sha256) {
            return crate::error::ApiError::from(crate::auth::AuthError::Unknown).into_response();
        }
    }
    refresh(&state).await;
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics could not be rendered");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Sets the backends' live gauges and books hourly backends' idle cost up to now: what a
/// scrape and the dashboard read at the same moment.
pub(super) fn refresh_backends(state: &AppState) {
    let snapshot = state.snapshot.load();
    let now = tokio::time::Instant::now();
    let m = &state.metrics;
    for upstream in &snapshot.upstreams {
        let name = upstream.backend.name.as_str();
        m.in_flight.with_label_values(&[name]).set(i64::from(upstream.state.in_flight()));
        m.backend_up.with_label_values(&[name]).set(i64::from(upstream.state.is_up()));
        if upstream.backend.pricing.is_per_hour() {
            m.idle_cost.with_label_values(&[name]).inc_by(upstream.state.occupancy.take_idle(now).as_f64());
        }
    }
}

/// Brings the gauges that mirror live state up to date, and books idle cost up to now.
async fn refresh(state: &AppState) {
    refresh_backends(state);
    let snapshot = state.snapshot.load_full();
    let m = &state.metrics;
    let unix = crate::clock::unix_now();
    for principal in snapshot.keys.principals() {
        if let Ok(Some(left)) = crate::ledger::remaining(&state.ledger, &principal.budgets, unix).await {
            m.budget_remaining.with_label_values(&[&principal.user.name]).set(left.usd.as_f64());
        }
    }
}
