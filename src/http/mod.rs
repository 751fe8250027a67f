//! The route table: paths to handlers, nothing else.

mod admin;
mod health;
mod models;
mod proxy;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::app::AppState;
use crate::error::ApiError;

pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(models::list))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/admin/usage", get(admin::all_usage))
        .route("/admin/usage/{user}", get(admin::user_usage))
        .route("/admin/requests", get(admin::requests))
        .route("/admin/reload", post(admin::reload))
        .fallback(not_found)
        .with_state(state)
}

/// hyper bounds the whole head and the header count; this bounds each header, as a careful
/// edge proxy does (431). Called by the server before routing: as an axum `from_fn` layer it
/// cost every request a clone of the routing stack and a boxed future, 8% of its CPU.
pub fn refuse_oversized_header<B>(state: &AppState, request: &http::Request<B>) -> Option<axum::response::Response> {
    let limit = state.snapshot.load().config.server.max_header_bytes;
    if request.headers().iter().any(|(name, value)| name.as_str().len() + value.len() > limit) {
        state.metrics.rejected.with_label_values(&["header_too_large"]).inc();
        return Some(axum::response::IntoResponse::into_response(ApiError::HeaderTooLarge(limit)));
    }
    None
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NoSuchEndpoint(uri.path().to_owned())
}
