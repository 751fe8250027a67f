//! `GET /v1/models`: the route aliases and backend models a caller may ask for.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::app::AppState;
use crate::error::ApiError;
use crate::openai::{ModelEntry, ModelList};

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snapshot = state.snapshot.load_full();
    if let Err(e) = state.authenticate(&snapshot, &headers, tokio::time::Instant::now()).await {
        let error = ApiError::from(e);
        state.metrics.count_rejected(error.code());
        return error.into_response();
    }
    let data = snapshot
        .model_ids
        .iter()
        .map(|id| ModelEntry { id, object: "model", created: 0, owned_by: "tollgate" })
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}
