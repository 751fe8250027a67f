//! The route table: paths to handlers. The proxied endpoints are also matched directly, ahead
//! of the router (see [`handle`]).

mod admin;
mod client_api;
pub mod dashboard;
mod health;
mod key;
mod models;
mod proxy;
mod tenants;
mod usage;

pub use usage::RankedUsers;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{delete, get, post};
use axum::Router;
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::app::AppState;
use crate::body::{from_axum, Response};
use crate::error::ApiError;
use crate::request::Endpoint;
use client_api::ClientApi;

pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/responses", post(proxy::responses))
        .route("/v1/messages", post(proxy::messages))
        .route("/v1/messages/count_tokens", post(proxy::count_tokens))
        .route("/v1/models", get(models::list))
        .route("/v1/key", get(key::show))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/admin/usage", get(usage::all_usage))
        .route("/admin/usage/{user}", get(usage::user_usage))
        .route("/admin/requests", get(admin::requests))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/teams", post(tenants::create_team))
        .route("/admin/teams/{name}", get(tenants::get_team).patch(tenants::update_team).delete(tenants::delete_team))
        .route("/admin/teams/{name}/usage", get(usage::team_usage))
        .route("/admin/users", post(tenants::create_user).get(tenants::list_users))
        .route("/admin/users/{name}", get(tenants::get_user).patch(tenants::update_user).delete(tenants::delete_user))
        .route("/admin/users/{name}/keys", post(tenants::create_key).get(tenants::list_keys))
        .route("/admin/keys/{id}", delete(tenants::revoke_key))
        .route("/admin/keys/{id}/rotate", post(tenants::rotate_key))
        .route("/admin/dashboard/overview", get(dashboard::overview::overview))
        .route("/admin/dashboard/spend", get(dashboard::spend::spend))
        .route("/admin/dashboard/backends", get(dashboard::backends::backends))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/login", post(dashboard::login))
        .route("/dashboard/logout", post(dashboard::logout))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::stylesheet))
        .route("/dashboard/login.css", get(dashboard::login_stylesheet))
        .fallback(not_found)
        .with_state(state)
}

/// One request from the server: the per-header limit, then the proxied endpoints directly,
/// then the router for the rest. The proxied endpoints are most of the traffic, and the
/// router's match costs each request a boxed handler future and parameters stored in its
/// extensions (three allocations even when there are none).
pub async fn handle(router: Router, state: &Arc<AppState>, request: http::Request<Incoming>) -> Response {
    if let Some(refused) = refuse_oversized_header(state, &request) {
        return refused;
    }
    if request.method() == http::Method::POST {
        let endpoint = match request.uri().path() {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        };
        if let Some(endpoint) = endpoint {
            return proxy::proxy(State(Arc::clone(state)), ClientApi::OpenAi, endpoint, request).await;
        }
    }
    match router.oneshot(request).await {
        Ok(response) => from_axum(response),
        Err(never) => match never {},
    }
}

/// hyper bounds the whole head and the header count; this bounds each header, as a careful
/// edge proxy does (431). Checked before routing: as an axum `from_fn` layer it cost every
/// request a clone of the routing stack and a boxed future, 8% of its CPU.
fn refuse_oversized_header<B>(state: &AppState, request: &http::Request<B>) -> Option<Response> {
    let limit = state.snapshot.load().config.server.max_header_bytes;
    if request.headers().iter().any(|(name, value)| name.as_str().len() + value.len() > limit) {
        state.metrics.count_rejected("header_too_large");
        return Some(ApiError::HeaderTooLarge(limit).response());
    }
    None
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NoSuchEndpoint(uri.path().to_owned())
}
