//! The proxied OpenAI endpoints: authenticate, read and parse the body, then `dispatch`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use crate::app::AppState;
use crate::dispatch::{self, RequestContext};
use crate::error::ApiError;
use crate::request::{Endpoint, ProxyRequest};

pub async fn chat_completions(state: State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    proxy(state, Endpoint::ChatCompletions, headers, body).await
}

pub async fn completions(state: State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    proxy(state, Endpoint::Completions, headers, body).await
}

pub async fn embeddings(state: State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    proxy(state, Endpoint::Embeddings, headers, body).await
}

async fn proxy(State(state): State<Arc<AppState>>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let result = async {
        let snapshot = state.snapshot.load_full();
        let user = Arc::clone(snapshot.keys.authenticate(&headers)?);
        let limit = snapshot.config.server.max_body_bytes;
        let bytes = read_body(&headers, body, limit).await?;
        let request = ProxyRequest::parse(endpoint, &bytes)?;
        dispatch::run(RequestContext { snapshot, user, request, started }, &state.metrics).await
    }
    .await;
    result.unwrap_or_else(|error| {
        state.metrics.rejected.with_label_values(&[error.code()]).inc();
        error.into_response()
    })
}

/// The whole body, refused early when its declared length is over `limit`, and cut off at
/// `limit` when it is not declared.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit }),
        Err(_) => Err(ApiError::BodyUnreadable),
    }
}
