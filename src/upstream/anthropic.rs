//! A backend that speaks the Anthropic Messages API (`api = "anthropic"`), behind the chat
//! completions the rest of the gateway speaks: the request is translated on its way out, the
//! answer (whole, streamed or an error) on its way back, usage included, so metering, the
//! cache and the client see a chat completion like any other.

use bytes::Bytes;
use http::{header, Response};
use serde_json::Value;

use super::{pool, UpstreamBody, UpstreamError};
use crate::apis::body::{Translated, WholeTranslator};
use crate::apis::messages;
use crate::request::Endpoint;

/// `max_tokens` is required by the Messages API; a chat request may leave it out. This is what
/// is asked for then (the same default as other gateways' Anthropic bridges).
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The largest whole answer translated; a larger one passes as it is and is refused as too
/// large where answers are read.
const MAX_TRANSLATED_BYTES: usize = 64 * 1024 * 1024;

/// The Messages request for the chat request `chat` (the bytes an OpenAI backend would get).
pub(super) fn request_body(backend: &str, endpoint: Endpoint, chat: &[u8]) -> Result<Bytes, UpstreamError> {
    let refuse = |reason| UpstreamError::Untranslatable { backend: backend.to_owned(), reason };
    if endpoint != Endpoint::ChatCompletions {
        let message = format!("the Messages API has no {} endpoint", endpoint.label());
        return Err(refuse(crate::apis::Untranslatable { message, param: None }));
    }
    // The gateway's own serialisation of a checked request: it parses.
    let chat: Value =
        serde_json::from_slice(chat).map_err(|_| UpstreamError::Broken { backend: backend.to_owned() })?;
    let request = messages::backend_request(&chat, DEFAULT_MAX_TOKENS).map_err(refuse)?;
    Ok(Bytes::from(serde_json::to_vec(&request).unwrap_or_default()))
}

/// The backend's answer as a chat completion's: a stream event by event, a whole answer or an
/// error body once read.
pub(super) fn answer(response: Response<pool::ConnBody>) -> Response<UpstreamBody> {
    let (mut head, body) = response.into_parts();
    // The translation changes the length.
    head.headers.remove(header::CONTENT_LENGTH);
    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let translated = if head.status.is_success() && is_sse {
        Translated::stream(body, Box::new(messages::ToChatStream::new()))
    } else {
        let translate: WholeTranslator = if head.status.is_success() {
            Box::new(|read: &[u8]| match serde_json::from_slice::<Value>(read) {
                Ok(answer) => serde_json::to_vec(&messages::backend_answer(&answer)).unwrap_or_default(),
                Err(_) => read.to_vec(),
            })
        } else {
            Box::new(|read: &[u8]| match messages::backend_error(read) {
                Some(error) => serde_json::to_vec(&error).unwrap_or_default(),
                None => read.to_vec(),
            })
        };
        Translated::whole(body, translate, MAX_TRANSLATED_BYTES)
    };
    Response::from_parts(head, UpstreamBody::Translated(Box::new(translated)))
}
