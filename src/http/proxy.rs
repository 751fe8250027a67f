//! The proxied OpenAI endpoints: authenticate, read and parse the body, then `dispatch`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use super::client_api::ClientApi;
use crate::app::AppState;
use crate::body::Response;
use crate::config::Policy;
use crate::dispatch::{self, Dispatched, Hints, RequestContext};
use crate::error::ApiError;
use crate::request::{Endpoint, ProxyRequest};
use crate::telemetry::{Entry, RequestId, Trail, HEADER_REQUEST_ID};
use crate::tenancy::Principal;

// The router's routes for the proxied endpoints; `super::handle` serves them ahead of it.
pub async fn chat_completions(state: State<Arc<AppState>>, request: Request) -> axum::response::Response {
    proxy(state, ClientApi::OpenAi, Endpoint::ChatCompletions, request).await.map(axum::body::Body::new)
}

pub async fn completions(state: State<Arc<AppState>>, request: Request) -> axum::response::Response {
    proxy(state, ClientApi::OpenAi, Endpoint::Completions, request).await.map(axum::body::Body::new)
}

pub async fn embeddings(state: State<Arc<AppState>>, request: Request) -> axum::response::Response {
    proxy(state, ClientApi::OpenAi, Endpoint::Embeddings, request).await.map(axum::body::Body::new)
}

pub async fn responses(state: State<Arc<AppState>>, request: Request) -> axum::response::Response {
    proxy(state, ClientApi::Responses, Endpoint::ChatCompletions, request).await.map(axum::body::Body::new)
}

pub async fn messages(state: State<Arc<AppState>>, request: Request) -> axum::response::Response {
    proxy(state, ClientApi::Messages, Endpoint::ChatCompletions, request).await.map(axum::body::Body::new)
}

/// `POST /v1/messages/count_tokens`: the prompt's size as the gateway estimates it for routing
/// and budgets (characters / 4, plus each message's template), for Anthropic clients that size
/// their context with it. No backend is called and nothing is charged.
pub async fn count_tokens(State(state): State<Arc<AppState>>, request: Request) -> axum::response::Response {
    let api = ClientApi::Messages;
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    api.adopt_key(&mut headers);
    let counted = async {
        let started = Instant::now();
        let snapshot = state.snapshot.load_full();
        state.authenticate(&snapshot, &headers, started).await?;
        let server = &snapshot.config.server;
        let bytes = tokio::time::timeout_at(
            started + server.body_read_timeout,
            read_body(&headers, body, server.max_body_bytes),
        )
        .await
        .map_err(|_| ApiError::BodyTimeout(server.body_read_timeout.as_secs()))??;
        // The endpoint takes a Messages request without `max_tokens`.
        let mut request: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
        if let Some(fields) = request.as_object_mut() {
            fields.entry("max_tokens").or_insert(serde_json::Value::from(1));
        }
        let (chat, _, _) = api.to_chat(Bytes::from(serde_json::to_vec(&request).unwrap_or_default()))?;
        let parsed = ProxyRequest::parse(Endpoint::ChatCompletions, chat)?;
        Ok::<_, ApiError>(serde_json::json!({ "input_tokens": parsed.prompt_tokens_estimate }))
    }
    .await;
    match counted {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(error) => api.answer(None, error.response()).map(axum::body::Body::new),
    }
}

/// Takes the whole request rather than axum's `HeaderMap` extractor, which clones every header,
/// and its body as the server gave it (boxing it would cost an allocation). A client speaking
/// another API (`api`) is served through chat completions (`endpoint`), translated both ways.
pub(super) async fn proxy<B>(
    State(state): State<Arc<AppState>>,
    api: ClientApi,
    endpoint: Endpoint,
    request: http::Request<B>,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let started = Instant::now();
    // The same moment on the wall clock: the request's later wall times derive from the two.
    let arrived_ms = crate::clock::unix_now_ms();
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    api.adopt_key(&mut headers);
    let mut asked = None;
    let request_id = RequestId::from_headers(&headers);
    let mut trail = Trail {
        log: state.access_log.enabled().then(|| Arc::clone(&state.access_log)),
        span: state.tracing.as_ref().map(|t| t.server_span(&headers, endpoint)),
    };
    let summarize = trail.is_on();
    let trace = trail.span.as_ref().map(|s| s.context().clone());
    let mut seen = Seen::default();
    let dispatched = async {
        let snapshot = state.snapshot.load_full();
        let principal = state.authenticate(&snapshot, &headers, started).await?;
        principal.warm();
        if summarize {
            seen.principal = Some(Arc::clone(&principal));
        }
        let server = &snapshot.config.server;
        let read_by = started + server.body_read_timeout;
        let bytes = tokio::time::timeout_at(read_by, read_body(&headers, body, server.max_body_bytes))
            .await
            .map_err(|_| ApiError::BodyTimeout(server.body_read_timeout.as_secs()))??;
        let (bytes, client_asked, native) = api.to_chat(bytes)?;
        let mut request = ProxyRequest::parse(endpoint, bytes)?;
        request.native = native.map(Box::new);
        asked = Some(client_asked.estimated(request.prompt_tokens_estimate));
        if summarize {
            seen.model = Some(request.model().into());
        }
        let hints = hints(&headers)?;
        let principal = if principal.serves_end_users() {
            let id = end_user(&headers, &request)?;
            let end_user =
                state.tenants.end_user(&snapshot.config, &principal, &id, arrived_ms.div_euclid(1000)).await?;
            if summarize {
                seen.principal = Some(Arc::clone(&end_user));
            }
            end_user
        } else {
            principal
        };
        Ok(dispatch::run(
            &state,
            RequestContext {
                snapshot,
                principal,
                spare_headers: Some(headers),
                request,
                hints,
                started,
                arrived_ms,
                clamped: None,
                prior_cost: crate::cost::Usd::ZERO,
                request_id: request_id.clone(),
                trail: std::sync::Mutex::new(Some(std::mem::take(&mut trail))),
                summarize,
                trace,
                answered: std::sync::Mutex::new(None),
                cache: None,
                cache_verdict: None,
                flight: std::sync::Mutex::new(None),
            },
        )
        .await)
    }
    .await;
    let (result, settled) = match dispatched {
        Ok(Dispatched { result, settled, trail: back }) => {
            // A stream took the trail, to finish it when it ends.
            trail = back.unwrap_or_default();
            (result, settled)
        }
        Err(error) => (Err(error), None),
    };
    let mut error_code = None;
    let mut response = result.unwrap_or_else(|error| {
        state.metrics.count_rejected(error.code());
        error_code = Some(error.code());
        error.response()
    });
    response = api.answer(asked, response);
    response.headers_mut().insert(HEADER_REQUEST_ID, request_id.header_value());
    // A stream's trail is finished by its meter when it ends; every other request's, here.
    if trail.is_on() {
        let mut entry = match settled {
            Some(settled) => settled.entry(arrived_ms, &request_id),
            None => seen.entry(arrived_ms, request_id),
        };
        entry.status = response.status().as_u16();
        entry.error = error_code.or(entry.error);
        entry.latency = started.elapsed();
        trail.finish(entry);
    }
    response
}

/// Who asked for what, as far as a request got (when its trail is on): what the access log
/// line and the span of a request refused before any answer say.
#[derive(Default)]
struct Seen {
    principal: Option<Arc<Principal>>,
    model: Option<Arc<str>>,
}

impl Seen {
    fn entry(self, at_ms: i64, id: RequestId) -> Entry {
        let user = self.principal.map(|p| Arc::from(p.user.name.as_str()));
        Entry { user, route: self.model, ..Entry::new(at_ms, id) }
    }
}

/// The most a body's declared length makes us allocate before its bytes arrive.
const PREALLOCATED_BODY_BYTES: u64 = 64 * 1024;

/// The whole body, refused early when its declared length is over `limit`, and cut off at
/// `limit` when it is not declared.
///
/// Copied into a buffer of its own, even when it came in one piece: that piece is a view into
/// the connection's read buffer, and the request keeps its body for as long as it runs (a
/// stream, minutes): it would keep kilobytes of read buffer alive per open stream.
async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut body = std::pin::pin!(Limited::new(body, limit));
    // Sized by the declared length, up to a bound: a declared length is only a promise.
    let mut bytes = Vec::with_capacity(declared.map_or(0, |len| len.min(PREALLOCATED_BODY_BYTES) as usize));
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    bytes.extend_from_slice(data);
                }
            }
            Err(e) if e.is::<LengthLimitError>() => return Err(ApiError::BodyTooLarge { limit }),
            Err(_) => return Err(ApiError::BodyUnreadable),
        }
    }
    Ok(Bytes::from(bytes))
}

pub const HEADER_END_USER: &str = "x-tollgate-end-user";

/// The end user a service key's request is for: `x-tollgate-end-user`, else the body's `user`.
fn end_user(headers: &HeaderMap, request: &ProxyRequest) -> Result<String, ApiError> {
    let named = match headers.get(HEADER_END_USER) {
        Some(value) => value.to_str().ok().map(str::to_owned),
        None => request.member_value("user").and_then(|v| v.as_str().map(str::to_owned)),
    };
    match named {
        Some(id) if crate::tenancy::model::valid_end_user(&id) => Ok(id),
        Some(_) => Err(ApiError::bad_request(
            format!("`{HEADER_END_USER}` (or the body's `user`) must be 1 to 64 of letters, digits and `._@+-`"),
            Some(HEADER_END_USER),
        )),
        None => Err(ApiError::bad_request(
            format!(
                "this key serves end users: name one with the `{HEADER_END_USER}` header or the body's `user` field"
            ),
            Some(HEADER_END_USER),
        )),
    }
}

pub const HEADER_POLICY_HINT: &str = "x-tollgate-policy";
pub const HEADER_MIN_QUALITY_HINT: &str = "x-tollgate-min-quality";

/// Routing hints a client may send: another policy, or a higher quality floor than its own.
fn hints(headers: &HeaderMap) -> Result<Hints, ApiError> {
    let text = |name: &'static str| -> Result<Option<&str>, ApiError> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| ApiError::bad_request(format!("`{name}` is not text"), Some(name))))
            .transpose()
    };
    let policy = match text(HEADER_POLICY_HINT)? {
        None => None,
        Some("quality-first") => Some(Policy::QualityFirst),
        Some("cost-first") => Some(Policy::CostFirst),
        Some(_) => {
            let message = format!("`{HEADER_POLICY_HINT}` must be `quality-first` or `cost-first`");
            return Err(ApiError::bad_request(message, Some(HEADER_POLICY_HINT)));
        }
    };
    let min_quality = match text(HEADER_MIN_QUALITY_HINT)? {
        None => None,
        Some(value) => match value.parse::<f64>() {
            Ok(q) if (0.0..=1.0).contains(&q) => Some(q),
            _ => {
                let message = format!("`{HEADER_MIN_QUALITY_HINT}` must be a number between 0 and 1");
                return Err(ApiError::bad_request(message, Some(HEADER_MIN_QUALITY_HINT)));
            }
        },
    };
    Ok(Hints { policy, min_quality })
}
