//! `ApiError`: every way a request can fail, mapped to an HTTP answer in one place.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::auth::AuthError;
use crate::cost::Usd;
use crate::dispatch::HEADER_BUDGET_REMAINING;
use crate::ledger::{LedgerError, Scope};
use crate::openai::{ErrorBody, ErrorDetail};
use crate::policy::Refusal;
use crate::ratelimit::{LimitError, RateLimited};
use crate::upstream::UpstreamError;

/// A failed request, as the client will see it (OpenAI error shape).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<&'static str> },
    /// A request in another API (`apis`) that cannot be put into the one it must go in.
    #[error(transparent)]
    Untranslatable(#[from] crate::apis::Untranslatable),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no such endpoint: {0}")]
    NoSuchEndpoint(String),
    #[error("the model `{0}` does not exist or you do not have access to it")]
    UnknownModel(String),
    #[error("request body is larger than the {limit} bytes this gateway accepts")]
    BodyTooLarge { limit: usize },
    #[error("request body could not be read")]
    BodyUnreadable,
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("a request header is larger than the {0} bytes this gateway accepts")]
    HeaderTooLarge(usize),
    /// The policy said no. `retry_after`: seconds until the budget period resets.
    /// `scope`: the budget level that is short (a budget refusal).
    #[error("{refusal}{}", scope_note(*.scope))]
    Refused { refusal: Refusal, retry_after: Option<u64>, remaining: Option<Usd>, scope: Option<Scope> },
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the backend answered 200 with a body that is not valid JSON (or is too large)")]
    UpstreamGarbage,
    #[error("the budget ledger is unavailable; no request is served unmetered")]
    Ledger(#[from] LedgerError),
    #[error("the admin API is disabled: set server.admin_key_env")]
    AdminDisabled,
    #[error("no user is named `{0}`")]
    UnknownUser(String),
    /// An admin call named a team, user or key that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An admin call would create what exists, or delete what is still in use.
    #[error("{0}")]
    Conflict(String),
    #[error("the config was not reloaded:\n{0}")]
    ReloadRefused(String),
    #[error("internal error")]
    Internal,
}

impl From<LimitError> for ApiError {
    fn from(error: LimitError) -> Self {
        match error {
            LimitError::Limited(limited) => Self::RateLimited(limited),
            LimitError::Unavailable(ledger) => Self::Ledger(ledger),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        Self::Refused { refusal, retry_after: None, remaining: None, scope: None }
    }
}

/// Which budget a refusal is about, in its message.
fn scope_note(scope: Option<Scope>) -> &'static str {
    match scope {
        Some(Scope::Key) => " (the API key's budget)",
        Some(Scope::User) => " (the user's budget)",
        Some(Scope::Team) => " (the team's budget)",
        None => "",
    }
}

/// `x-tollgate-budget-scope`: which level's budget refused a request.
pub const HEADER_BUDGET_SCOPE: http::HeaderName = http::HeaderName::from_static("x-tollgate-budget-scope");

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest { message: message.into(), param }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } | Self::BodyUnreadable | Self::ReloadRefused(_) => StatusCode::BAD_REQUEST,
            Self::Auth(AuthError::PlanGone(_)) => StatusCode::FORBIDDEN,
            Self::Auth(AuthError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::UnknownModel(_) | Self::NoSuchEndpoint(_) | Self::UnknownUser(_) | Self::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Refused { refusal, .. } => match refusal {
                Refusal::ContextTooLong { .. }
                | Refusal::QualityUnavailable { .. }
                | Refusal::OverRequestCap { .. } => StatusCode::BAD_REQUEST,
                Refusal::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
                Refusal::Unavailable | Refusal::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            Self::Untranslatable(_) | Self::Upstream(UpstreamError::Untranslatable { .. }) => StatusCode::BAD_REQUEST,
            Self::Upstream(_) | Self::UpstreamGarbage => StatusCode::BAD_GATEWAY,
            Self::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::AdminDisabled => StatusCode::FORBIDDEN,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The codes a client request can be refused with (`tollgate_rejected_requests_total`'s
    /// `code` label, which starts at 0 for each), `connection_limit` included.
    pub const REFUSAL_CODES: [&'static str; 20] = [
        "invalid_request",
        "invalid_api_key",
        "plan_unavailable",
        "tenant_store_unavailable",
        "model_not_found",
        "not_found",
        "request_too_large",
        "request_timeout",
        "header_too_large",
        "context_length_exceeded",
        "quality_unavailable",
        "max_request_cost_exceeded",
        "budget_exceeded",
        "backend_unavailable",
        "capacity_exceeded",
        "rate_limit_exceeded",
        "upstream_timeout",
        "upstream_error",
        "ledger_unavailable",
        "connection_limit",
    ];

    /// The `error.code` field; also the bounded label of `tollgate_rejected_requests_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::BodyUnreadable
            | Self::Untranslatable(_)
            | Self::Upstream(UpstreamError::Untranslatable { .. }) => "invalid_request",
            Self::Auth(AuthError::PlanGone(_)) => "plan_unavailable",
            Self::Auth(AuthError::Unavailable(_)) => "tenant_store_unavailable",
            Self::Auth(_) => "invalid_api_key",
            Self::UnknownModel(_) => "model_not_found",
            Self::NoSuchEndpoint(_) | Self::UnknownUser(_) | Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyTimeout(_) => "request_timeout",
            Self::HeaderTooLarge(_) => "header_too_large",
            Self::Refused { refusal, .. } => refusal.code(),
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::Upstream(e) if e.is_timeout() => "upstream_timeout",
            Self::Upstream(_) | Self::UpstreamGarbage => "upstream_error",
            Self::Ledger(_) => "ledger_unavailable",
            Self::AdminDisabled => "admin_disabled",
            Self::ReloadRefused(_) => "config_invalid",
            Self::Internal => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS if matches!(self, Self::Refused { .. }) => "insufficient_quota",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::Untranslatable(e) | Self::Upstream(UpstreamError::Untranslatable { reason: e, .. }) => {
                e.param.as_deref()
            }
            Self::UnknownModel(_) => Some("model"),
            Self::Refused { refusal: Refusal::ContextTooLong { .. } | Refusal::OverRequestCap { .. }, .. } => {
                Some("max_tokens")
            }
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Refused { retry_after, refusal, .. } => {
                retry_after.or_else(|| matches!(refusal, Refusal::AtCapacity | Refusal::Unavailable).then_some(1))
            }
            Self::RateLimited(limited) => Some(limited.retry_after.as_secs().saturating_add(1)),
            _ => None,
        }
    }
}

impl ApiError {
    /// The answer, in the OpenAI error shape, built straight into the gateway's response type:
    /// a refused request costs no boxed body, and a bad key (what a flood of random keys meets
    /// thousands of times a second) not even its body's rendering.
    pub fn response(self) -> crate::body::Response {
        let key_error = match &self {
            Self::Auth(AuthError::Missing) => Some(0),
            Self::Auth(AuthError::Malformed) => Some(1),
            Self::Auth(AuthError::Unknown) => Some(2),
            _ => None,
        };
        let body = key_error.map_or_else(|| self.render_body(), |i| AUTH_BODIES[i].clone());
        let mut response = http::Response::new(crate::body::ResponseBody::whole(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if key_error.is_some() {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Self::Refused { remaining, scope, .. } = &self {
            if let Some(value) = remaining.and_then(crate::dispatch::usd_value) {
                headers.insert(HEADER_BUDGET_REMAINING, value);
            }
            if let Some(scope) = scope {
                headers.insert(HEADER_BUDGET_SCOPE, HeaderValue::from_static(scope.as_str()));
            }
        }
        response
    }

    fn render_body(&self) -> Bytes {
        let message = self.to_string();
        let body = ErrorBody {
            error: ErrorDetail { message: &message, kind: self.kind(), param: self.param(), code: Some(self.code()) },
        };
        serde_json::to_vec(&body).unwrap_or_default().into()
    }
}

/// The bodies of the three key errors, whose messages never vary: missing, malformed, unknown
/// (the indices [`ApiError::response`] gives them).
static AUTH_BODIES: LazyLock<[Bytes; 3]> = LazyLock::new(|| {
    [AuthError::Missing, AuthError::Malformed, AuthError::Unknown].map(|e| ApiError::Auth(e).render_body())
});

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response().map(axum::body::Body::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key errors' bodies are made once; each answer is what rendering it would give.
    #[tokio::test]
    async fn key_errors_answer_their_rendered_body_with_a_bearer_challenge() {
        use http_body_util::BodyExt;
        let errors = || [AuthError::Missing, AuthError::Malformed, AuthError::Unknown].map(ApiError::Auth);
        for (error, fresh) in errors().into_iter().zip(errors()) {
            let response = error.response();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, fresh.render_body());
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"]["code"], "invalid_api_key");
            assert_eq!(json["error"]["type"], "authentication_error");
            assert_eq!(json["error"]["message"], fresh.to_string());
        }
    }

    /// What a proxied request can fail with: each code is in the list the metric starts with.
    #[test]
    fn every_refusal_of_a_client_request_has_a_series_from_the_start() {
        let usd = Usd::ZERO;
        let refused = |refusal| ApiError::Refused { refusal, retry_after: None, remaining: None, scope: None };
        let errors = [
            ApiError::bad_request("x", None),
            ApiError::BodyUnreadable,
            ApiError::Auth(AuthError::Missing),
            ApiError::Auth(AuthError::PlanGone("p".into())),
            ApiError::Auth(AuthError::Unavailable("down".into())),
            ApiError::UnknownModel("m".into()),
            ApiError::NoSuchEndpoint("/x".into()),
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::BodyTimeout(1),
            ApiError::HeaderTooLarge(1),
            refused(Refusal::ContextTooLong { needed: 2, largest: 1 }),
            refused(Refusal::QualityUnavailable { required: 0.9, best: 0.1 }),
            refused(Refusal::OverRequestCap { cheapest: usd, cap: usd }),
            refused(Refusal::BudgetExceeded { remaining: usd, cheapest: usd }),
            refused(Refusal::Unavailable),
            refused(Refusal::AtCapacity),
            ApiError::Upstream(UpstreamError::Timeout { backend: "b".into(), after: std::time::Duration::ZERO }),
            ApiError::Upstream(UpstreamError::Connect { backend: "b".into() }),
            ApiError::UpstreamGarbage,
            ApiError::Ledger(LedgerError::Storage("x".into())),
        ];
        for error in &errors {
            assert!(ApiError::REFUSAL_CODES.contains(&error.code()), "{}", error.code());
        }
    }
}
