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

pub fn routes() -> Router<Arc<AppState>> {
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
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NoSuchEndpoint(uri.path().to_owned())
}
