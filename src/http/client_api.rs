//! The API a client speaks on the endpoint it called: Chat Completions (and the other OpenAI
//! endpoints) as they are, or the Responses and Messages APIs, translated to a chat request on
//! the way in and the chat answer translated back on the way out (`apis`).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use crate::apis::body::{Translated, WholeTranslator};
use crate::apis::{messages, responses, Dialect, Native};
use crate::body::{Response, ResponseBody};
use crate::error::ApiError;

/// The largest whole answer translated (a proxied answer is at most 64 MiB already).
const MAX_TRANSLATED_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientApi {
    OpenAi,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages`: Anthropic's API, errors in its shape, `x-api-key` as the key.
    Messages,
}

/// What turning the chat answer back into the client's API needs of its request.
pub enum Asked {
    OpenAi,
    Responses(Box<Value>),
    Messages { model: String, prompt_tokens_estimate: u64 },
}

impl Asked {
    /// With the gateway's estimate of the prompt's tokens (what a Messages stream reports as
    /// its input until the real count arrives at its end).
    pub fn estimated(self, prompt_tokens: u64) -> Self {
        match self {
            Self::Messages { model, .. } => Self::Messages { model, prompt_tokens_estimate: prompt_tokens },
            other => other,
        }
    }
}

impl ClientApi {
    /// Anthropic clients send their key as `x-api-key`; it is taken as the bearer key.
    pub fn adopt_key(self, headers: &mut HeaderMap) {
        if self != Self::Messages || headers.contains_key(header::AUTHORIZATION) {
            return;
        }
        if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            if let Ok(mut value) = HeaderValue::try_from(format!("Bearer {key}")) {
                value.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, value);
            }
        }
    }

    /// The client's body as a chat request's, what its answer will need, and the client's
    /// request itself for a backend serving its API natively. A request with no chat form is
    /// routed by an estimate of its size, and only such a backend can take it.
    pub fn to_chat(self, body: Bytes) -> Result<(Bytes, Asked, Option<Native>), ApiError> {
        let dialect = match self {
            Self::OpenAi => return Ok((body, Asked::OpenAi, None)),
            Self::Responses => Dialect::Responses,
            Self::Messages => Dialect::Messages,
        };
        let request: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
        if !request.is_object() {
            return Err(ApiError::bad_request("request body must be a JSON object", None));
        }
        let translated = match dialect {
            Dialect::Responses => responses::chat_request(&request),
            _ => messages::chat_request(&request),
        };
        let (chat, untranslatable) = match translated {
            Ok(chat) => (chat, None),
            Err(e) => (crate::apis::size_estimate(dialect, &request), Some(e)),
        };
        let asked = match dialect {
            Dialect::Responses => Asked::Responses(Box::new(request.clone())),
            _ => {
                let model = request.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
                Asked::Messages { model, prompt_tokens_estimate: 0 }
            }
        };
        let native = Native { dialect, request, untranslatable };
        Ok((Bytes::from(serde_json::to_vec(&chat).unwrap_or_default()), asked, Some(native)))
    }

    /// `response` (an answer or an error, the gateway's or a backend's) in the client's API.
    pub fn answer(self, asked: Option<Asked>, response: Response) -> Response {
        if self == Self::OpenAi {
            return response;
        }
        let (mut head, body) = response.into_parts();
        // A backend serving the client's API itself answered in it already (errors aside).
        let native = head.extensions.get::<Dialect>().is_some_and(|&d| d != Dialect::Chat);
        let is_sse = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let translated = match (head.status.is_success(), asked) {
            (true, _) if native => return Response::from_parts(head, body),
            (true, Some(Asked::Responses(request))) if is_sse => {
                Translated::stream(body, Box::new(responses::FromChatStream::new(&request)))
            }
            (true, Some(Asked::Messages { model, prompt_tokens_estimate })) if is_sse => {
                Translated::stream(body, Box::new(messages::FromChatStream::new(&model, prompt_tokens_estimate)))
            }
            (true, Some(Asked::Responses(request))) => {
                let translate: WholeTranslator =
                    Box::new(move |read: &[u8]| translate_json(read, |chat| responses::answer(chat, &request)));
                Translated::whole(body, translate, MAX_TRANSLATED_BYTES)
            }
            (true, Some(Asked::Messages { .. })) => Translated::whole(
                body,
                Box::new(|read: &[u8]| translate_json(read, messages::answer)),
                MAX_TRANSLATED_BYTES,
            ),
            // An error: the Responses API's are OpenAI's; Anthropic clients parse their own.
            (false, _) if self == Self::Messages => {
                let status = head.status;
                let translate: WholeTranslator = Box::new(move |read: &[u8]| anthropic_error(status, read));
                Translated::whole(body, translate, MAX_TRANSLATED_BYTES)
            }
            _ => return Response::from_parts(head, body),
        };
        head.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(head, ResponseBody::Translated(Box::new(translated)))
    }
}

fn translate_json(read: &[u8], translate: impl FnOnce(&Value) -> Value) -> Vec<u8> {
    match serde_json::from_slice::<Value>(read) {
        Ok(chat) => serde_json::to_vec(&translate(&chat)).unwrap_or_default(),
        Err(_) => read.to_vec(),
    }
}

/// An OpenAI-shaped error body (the gateway's, or a backend's) in Anthropic's shape.
fn anthropic_error(status: StatusCode, read: &[u8]) -> Vec<u8> {
    let parsed = serde_json::from_slice::<Value>(read).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.get("message")).and_then(Value::as_str))
        .map_or_else(|| String::from_utf8_lossy(read).into_owned(), str::to_owned);
    serde_json::to_vec(&messages::error_body(status.as_u16(), &message)).unwrap_or_default()
}
