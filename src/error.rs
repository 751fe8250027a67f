//! `ApiError`: every way a request can fail, mapped to an HTTP answer in one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::openai::{ErrorBody, ErrorDetail};
use crate::policy::Refusal;
use crate::upstream::UpstreamError;

/// A failed request, as the client will see it (OpenAI error shape).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<&'static str> },
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
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the admin API is disabled: set server.admin_key_env")]
    AdminDisabled,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest { message: message.into(), param }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } | Self::BodyUnreadable | Self::Refused(_) => StatusCode::BAD_REQUEST,
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::UnknownModel(_) | Self::NoSuchEndpoint(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::AdminDisabled => StatusCode::FORBIDDEN,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.code` field; also the bounded label of `tollgate_rejected_requests_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } | Self::BodyUnreadable => "invalid_request",
            Self::Auth(_) => "invalid_api_key",
            Self::UnknownModel(_) => "model_not_found",
            Self::NoSuchEndpoint(_) => "not_found",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::Refused(Refusal::ContextTooLong { .. }) => "context_length_exceeded",
            Self::Upstream(e) if e.is_timeout() => "upstream_timeout",
            Self::Upstream(_) => "upstream_error",
            Self::AdminDisabled => "admin_disabled",
            Self::Internal => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::BodyUnreadable
            | Self::UnknownModel(_)
            | Self::NoSuchEndpoint(_)
            | Self::BodyTooLarge { .. }
            | Self::Refused(_) => "invalid_request_error",
            Self::Auth(_) => "authentication_error",
            Self::AdminDisabled => "permission_error",
            Self::Upstream(_) | Self::Internal => "api_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::UnknownModel(_) => Some("model"),
            Self::Refused(Refusal::ContextTooLong { .. }) => Some("messages"),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let body = ErrorBody {
            error: ErrorDetail { message: &message, kind: self.kind(), param: self.param(), code: Some(self.code()) },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status(), bytes).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if matches!(self, Self::Auth(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
