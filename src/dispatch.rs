//! One request's life after authentication and parsing: decide → send (falling back on
//! failure before the first byte) → wrap the answer for metering → `x-tollgate-*` headers.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::config::User;
use crate::error::ApiError;
use crate::metering::{BodyKind, Meter, MeterStart, MeteredBody};
use crate::metrics::Metrics;
use crate::policy::{self, Estimate};
use crate::request::ProxyRequest;
use crate::snapshot::{ModelTarget, Snapshot};
use crate::upstream::UpstreamError;

pub const HEADER_BACKEND: &str = "x-tollgate-backend";
pub const HEADER_TIER: &str = "x-tollgate-tier";
pub const HEADER_REASON: &str = "x-tollgate-reason";

/// The request's context as it goes through: who asks, for what, and where it went.
pub struct RequestContext {
    pub snapshot: Arc<Snapshot>,
    pub user: Arc<User>,
    pub request: ProxyRequest,
    /// When the gateway received the request (for durations and deadlines).
    pub started: Instant,
}

pub async fn run(ctx: RequestContext, metrics: &Arc<Metrics>) -> Result<Response, ApiError> {
    let snapshot = &ctx.snapshot;
    let request = &ctx.request;
    let (candidates, default_max_tokens, pinned) = match snapshot.resolve(&request.model) {
        Some(ModelTarget::Route(i)) => {
            let route = &snapshot.config.routes[i];
            (route.backends.clone(), u64::from(route.default_max_tokens), false)
        }
        Some(ModelTarget::Backend(i)) => (vec![i], 0, true),
        None => return Err(ApiError::UnknownModel(request.model.clone())),
    };
    let estimate = Estimate {
        prompt_tokens: request.prompt_tokens_estimate,
        completion_tokens: request.max_tokens.unwrap_or(default_max_tokens),
    };
    let decision = policy::decide(&snapshot.backends(), &candidates, pinned, &ctx.user, estimate)?;

    let mut reason = decision.reason.as_str().to_owned();
    let mut last_error = None;
    for (attempt, &index) in decision.order.iter().enumerate() {
        let upstream = &snapshot.upstreams[index];
        let backend = &upstream.backend;
        let is_last = attempt + 1 == decision.order.len();
        let failure = match upstream.send(request).await {
            Ok(answer) if retryable(answer.status()) && !is_last => {
                UpstreamError::Status { backend: backend.name.clone(), status: answer.status().as_u16() }
            }
            Ok(answer) if answer.status().is_server_error() => {
                UpstreamError::Status { backend: backend.name.clone(), status: answer.status().as_u16() }
            }
            Ok(answer) => {
                let (head, body) = answer.into_parts();
                let meter = Meter::new(MeterStart {
                    metrics: Arc::clone(metrics),
                    user: Arc::clone(&ctx.user),
                    backend: Arc::clone(backend),
                    reason: reason.clone(),
                    started: ctx.started,
                    prompt_estimate: request.prompt_tokens_estimate,
                    status: head.status.as_u16(),
                });
                let kind = body_kind(head.status, &head.headers, request);
                let body = MeteredBody::new(body, meter, kind, ctx.started + backend.timeout);
                let mut response = Response::new(Body::new(body));
                *response.status_mut() = head.status;
                let headers = response.headers_mut();
                for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
                    if let Some(value) = head.headers.get(&name) {
                        headers.insert(name, value.clone());
                    }
                }
                for (name, value) in
                    [(HEADER_BACKEND, &backend.name), (HEADER_TIER, &backend.tier), (HEADER_REASON, &reason)]
                {
                    if let Ok(value) = HeaderValue::from_str(value) {
                        headers.insert(name, value);
                    }
                }
                return Ok(response);
            }
            Err(e) => e,
        };
        metrics.upstream_failures.with_label_values(&[&backend.name, failure.kind()]).inc();
        tracing::warn!(backend = %backend.name, error = %failure, "backend attempt failed");
        reason = format!("fallback:{}", backend.name);
        last_error = Some(failure);
    }
    Err(last_error.map_or(ApiError::Internal, ApiError::Upstream))
}

/// Statuses another backend may well answer better: overload and server faults.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn body_kind(status: StatusCode, headers: &http::HeaderMap, request: &ProxyRequest) -> BodyKind {
    if !status.is_success() {
        return BodyKind::Opaque;
    }
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if request.stream && is_sse {
        BodyKind::Sse { hide_usage: !request.client_wants_usage }
    } else {
        BodyKind::Json
    }
}
