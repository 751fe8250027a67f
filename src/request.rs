//! A client's request body, parsed and checked before anything goes upstream.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The OpenAI endpoints Tollgate proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// Path under the backend's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// The field that carries the input and must be present.
    fn input_field(self) -> &'static str {
        match self {
            Self::ChatCompletions => "messages",
            Self::Completions => "prompt",
            Self::Embeddings => "input",
        }
    }
}

/// A validated request: the JSON object as the client sent it, plus what routing and metering
/// need from it.
#[derive(Debug)]
pub struct ProxyRequest {
    pub endpoint: Endpoint,
    /// The client's object; only `model` and `stream_options` are changed before forwarding.
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage: true`).
    pub client_wants_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`) when the client set it.
    pub max_tokens: Option<u64>,
    /// Prompt tokens estimated from the input text (see [`estimate_prompt_tokens`]).
    pub prompt_tokens_estimate: u64,
}

impl ProxyRequest {
    /// Parses and checks `bytes` for `endpoint`; every refusal names the field at fault.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Self, ApiError> {
        let value = crate::strict_json::parse(bytes)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
        let Value::Object(body) = value else {
            return Err(ApiError::bad_request("request body must be a JSON object", None));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => return Err(ApiError::bad_request("`model` must be a non-empty string", Some("model"))),
            None => return Err(ApiError::bad_request("missing required field `model`", Some("model"))),
        };
        let input = endpoint.input_field();
        match (endpoint, body.get(input)) {
            (_, None | Some(Value::Null)) => {
                return Err(ApiError::bad_request(format!("missing required field `{input}`"), Some(input)));
            }
            (Endpoint::ChatCompletions, Some(Value::Array(messages))) if !messages.is_empty() => {
                let malformed = messages.iter().position(|m| !m.get("role").is_some_and(Value::is_string));
                if let Some(i) = malformed {
                    let message = format!("`messages[{i}]` must be an object with a string `role`");
                    return Err(ApiError::bad_request(message, Some("messages")));
                }
            }
            (Endpoint::ChatCompletions, Some(_)) => {
                return Err(ApiError::bad_request("`messages` must be a non-empty array", Some("messages")));
            }
            _ => {}
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::bad_request("`stream` must be a boolean", Some("stream"))),
        };
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ApiError::bad_request("embeddings cannot be streamed", Some("stream")));
        }
        let client_wants_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    let message = "`stream_options.include_usage` must be a boolean";
                    return Err(ApiError::bad_request(message, Some("stream_options")));
                }
            },
            Some(_) => return Err(ApiError::bad_request("`stream_options` must be an object", Some("stream_options"))),
        };
        let max_tokens = max_tokens(&body)?;
        let prompt_tokens_estimate = estimate_prompt_tokens(body.get(input).unwrap_or(&Value::Null));
        Ok(Self { endpoint, body, model, stream, client_wants_usage, max_tokens, prompt_tokens_estimate })
    }
}

impl ProxyRequest {
    /// Shortens the completion to `tokens` (budget clamping), in the field the client used.
    pub fn set_max_tokens(&mut self, tokens: u64) {
        let field =
            if self.body.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
        self.body.insert(field.to_owned(), Value::from(tokens));
        self.max_tokens = Some(tokens);
    }
}

fn max_tokens(body: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    for field in ["max_completion_tokens", "max_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(ApiError::bad_request(format!("`{field}` must be a positive integer"), Some(field))),
                };
            }
        }
    }
    Ok(None)
}

/// Characters per token for English text with BPE tokenizers: the usual rule of thumb. The
/// estimate only sizes reservations and fills in usage a backend did not report.
const CHARS_PER_TOKEN: u64 = 4;
/// Per-message overhead of chat templates (role markers, separators).
const TOKENS_PER_MESSAGE: u64 = 4;

/// Prompt tokens from the text in `input` (messages, a prompt string or array, embedding input).
pub fn estimate_prompt_tokens(input: &Value) -> u64 {
    fn chars(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(a) => a.iter().map(chars).sum(),
            Value::Object(o) => o.values().map(chars).sum(),
            // Token-id arrays (completions and embeddings accept them): one token per id.
            Value::Number(_) => CHARS_PER_TOKEN,
            Value::Bool(_) | Value::Null => 0,
        }
    }
    let messages = match input {
        Value::Array(a) if a.iter().all(Value::is_object) => a.len() as u64,
        _ => 0,
    };
    chars(input).div_ceil(CHARS_PER_TOKEN) + messages * TOKENS_PER_MESSAGE
}

/// Completion tokens from generated text, when the backend reported no usage.
pub fn estimate_text_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(CHARS_PER_TOKEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ProxyRequest, ApiError> {
        ProxyRequest::parse(Endpoint::ChatCompletions, body.as_bytes())
    }

    fn param_of(body: &str) -> Option<&'static str> {
        match parse(body) {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(param_of(r#"{"messages":[{"role":"user","content":"hi"}]}"#), Some("model"));
        assert_eq!(param_of(r#"{"model":"auto"}"#), Some("messages"));
        assert_eq!(param_of(r#"{"model":"auto","messages":[]}"#), Some("messages"));
        assert_eq!(
            param_of(r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#),
            Some("stream")
        );
        assert_eq!(
            param_of(r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#),
            Some("max_tokens")
        );
        assert_eq!(param_of(r#"{"model":"auto""#), None);
    }

    #[test]
    fn reads_stream_usage_wish_and_max_tokens() {
        let r = parse(
            r#"{"model":"auto","messages":[{"role":"user","content":"hello there"}],"stream":true,
                "stream_options":{"include_usage":true},"max_tokens":7}"#,
        )
        .unwrap();
        assert!(r.stream && r.client_wants_usage);
        assert_eq!(r.max_tokens, Some(7));
        // 11 chars + 4 ("user") → 15 chars → 4 tokens, plus 4 for the message.
        assert_eq!(r.prompt_tokens_estimate, 8);
    }
}
