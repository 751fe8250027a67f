//! A client's request body, checked before anything goes upstream.
//!
//! The body is kept as the client's bytes: only its top-level members are located, and only
//! those routing needs are read. What goes upstream is those bytes with `model` (and the few
//! members Tollgate sets) written over, so nothing is built or re-serialised per request.

mod input;
mod strict;

use std::ops::Range;

use bytes::Bytes;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::ApiError;
use input::CHARS_PER_TOKEN;
use strict::Key;

/// The OpenAI endpoints Tollgate proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// Every endpoint, in declaration order (`endpoint as usize` indexes it).
    pub const ALL: [Self; 3] = [Self::ChatCompletions, Self::Completions, Self::Embeddings];

    /// The `endpoint` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

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

/// A validated request: the client's body, where its top-level members are, and what routing
/// and metering need from it.
#[derive(Debug)]
pub struct ProxyRequest {
    pub endpoint: Endpoint,
    /// The client's bytes, strict JSON (see `strict`) holding one object.
    body: Bytes,
    /// The object's members in the client's order; inline for a usual request's few.
    members: Members,
    /// The `model` member's text.
    model: MemberKey,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage: true`).
    pub client_wants_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`) when the client set it, or as clamped.
    pub max_tokens: Option<u64>,
    /// The member budget clamping wrote `max_tokens` to (see [`ProxyRequest::set_max_tokens`]).
    clamped_field: Option<&'static str>,
    /// Prompt tokens estimated from the input text (see `input::Summary`).
    pub prompt_tokens_estimate: u64,
    /// The client's own request when it came in another API than chat (`apis`): what a
    /// backend serving that API itself is sent.
    pub native: Option<Box<crate::apis::Native>>,
}

type Members = smallvec::SmallVec<[Member; 8]>;

#[derive(Debug)]
struct Member {
    key: MemberKey,
    /// The value's JSON text in `body`.
    value: Range<usize>,
}

/// A member's name (or a string value): its place in `body`, or the decoded text when the
/// client wrote escapes.
#[derive(Debug)]
enum MemberKey {
    Plain(Range<usize>),
    Escaped(Box<str>),
}

impl ProxyRequest {
    /// Checks `body` for `endpoint`; every refusal names the field at fault.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, ApiError> {
        // UTF-8 checked once here; serde_json then reads the text without checking each string.
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::bad_request("request body is not valid JSON: it is not UTF-8", None))?;
        strict::check(text).map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
        let members =
            locate_members(text).map_err(|_| ApiError::bad_request("request body must be a JSON object", None))?;
        let fields = Fields { text, members: &members };
        let model = match fields.get("model").map(serde_json::from_str::<Key<'_>>) {
            Some(Ok(Key(m))) if !m.is_empty() => MemberKey::of(m, text),
            Some(_) => return Err(ApiError::bad_request("`model` must be a non-empty string", Some("model"))),
            None => return Err(ApiError::bad_request("missing required field `model`", Some("model"))),
        };
        let input = endpoint.input_field();
        let summary = match fields.get(input).filter(|raw| *raw != "null") {
            None => return Err(ApiError::bad_request(format!("missing required field `{input}`"), Some(input))),
            Some(raw) => input::Summary::of(raw)
                .map_err(|e| ApiError::bad_request(format!("`{input}` could not be read: {e}"), Some(input)))?,
        };
        if endpoint == Endpoint::ChatCompletions {
            match (summary.elements, summary.first_without_role) {
                (Some(0) | None, _) => {
                    return Err(ApiError::bad_request("`messages` must be a non-empty array", Some("messages")));
                }
                (Some(_), Some(i)) => {
                    let message = format!("`messages[{i}]` must be an object with a string `role`");
                    return Err(ApiError::bad_request(message, Some("messages")));
                }
                (Some(_), None) => {}
            }
        }
        let stream = match fields.get("stream").map(serde_json::from_str::<Option<bool>>) {
            None | Some(Ok(None)) => false,
            Some(Ok(Some(b))) => b,
            Some(Err(_)) => return Err(ApiError::bad_request("`stream` must be a boolean", Some("stream"))),
        };
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ApiError::bad_request("embeddings cannot be streamed", Some("stream")));
        }
        let client_wants_usage = fields.stream_options_usage()?;
        let max_tokens = fields.max_tokens()?;
        Ok(Self {
            endpoint,
            body,
            members,
            model,
            stream,
            client_wants_usage,
            max_tokens,
            clamped_field: None,
            prompt_tokens_estimate: summary.prompt_tokens(),
            native: None,
        })
    }

    /// The `model` the client asked for.
    pub fn model(&self) -> &str {
        self.model.text(&self.body)
    }

    /// Whether the client set the top-level member `key`.
    pub fn has_member(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// The top-level member `key`, parsed: for the paths that are not per request (the
    /// simulated backend, the cascade's probes).
    pub fn member_value(&self, key: &str) -> Option<Value> {
        let member = self.find(key)?;
        serde_json::from_slice(&self.body[member.value.clone()]).ok()
    }

    fn find(&self, key: &str) -> Option<&Member> {
        find(&self.members, &self.body, key)
    }

    /// The top-level members in the client's order: name and JSON text.
    pub fn members(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.members.iter().map(|m| (m.key.text(&self.body), &self.body[m.value.clone()]))
    }

    /// The member clamping wrote, if any: `max_tokens` or `max_completion_tokens`.
    pub fn clamped_field(&self) -> Option<&'static str> {
        self.clamped_field
    }

    /// The body's length in bytes, as the client sent it.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Shortens the completion to `tokens` (budget clamping), in the field the client used.
    pub fn set_max_tokens(&mut self, tokens: u64) {
        let field = if self.has_member("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
        self.clamped_field = Some(field);
        self.max_tokens = Some(tokens);
    }
}

impl MemberKey {
    /// `text` as found in `body` (a view into it), or decoded.
    fn of(text: std::borrow::Cow<'_, str>, body: &str) -> Self {
        match text {
            std::borrow::Cow::Borrowed(text) => Self::Plain(span(text, body)),
            std::borrow::Cow::Owned(text) => Self::Escaped(text.into_boxed_str()),
        }
    }

    fn text<'a>(&'a self, body: &'a [u8]) -> &'a str {
        match self {
            // Text without escapes is valid UTF-8 on its own: the body is.
            Self::Plain(range) => std::str::from_utf8(&body[range.clone()]).unwrap_or_default(),
            Self::Escaped(text) => text,
        }
    }

    fn is(&self, body: &[u8], key: &str) -> bool {
        match self {
            Self::Plain(range) => &body[range.clone()] == key.as_bytes(),
            Self::Escaped(text) => **text == *key,
        }
    }
}

fn find<'m>(members: &'m [Member], body: &[u8], key: &str) -> Option<&'m Member> {
    members.iter().find(|m| m.key.is(body, key))
}

/// The members while the body is being checked, read as text.
struct Fields<'a> {
    text: &'a str,
    members: &'a [Member],
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        let member = find(self.members, self.text.as_bytes(), key)?;
        self.text.get(member.value.clone())
    }

    fn stream_options_usage(&self) -> Result<bool, ApiError> {
        let Some(options) = self.get("stream_options").filter(|raw| *raw != "null") else { return Ok(false) };
        let invalid = |message| ApiError::bad_request(message, Some("stream_options"));
        #[derive(serde::Deserialize)]
        struct Options {
            include_usage: Option<Value>,
        }
        match serde_json::from_str::<Options>(options) {
            Ok(Options { include_usage: None | Some(Value::Null) }) => Ok(false),
            Ok(Options { include_usage: Some(Value::Bool(b)) }) => Ok(b),
            Ok(_) => Err(invalid("`stream_options.include_usage` must be a boolean")),
            Err(_) => Err(invalid("`stream_options` must be an object")),
        }
    }

    fn max_tokens(&self) -> Result<Option<u64>, ApiError> {
        for field in ["max_completion_tokens", "max_tokens"] {
            match self.get(field) {
                None | Some("null") => {}
                Some(raw) => {
                    return match serde_json::from_str::<u64>(raw) {
                        Ok(n) if n > 0 => Ok(Some(n)),
                        _ => Err(ApiError::bad_request(format!("`{field}` must be a positive integer"), Some(field))),
                    };
                }
            }
        }
        Ok(None)
    }
}

/// Where `text`, a slice of `body`, lies in it.
fn span(text: &str, body: &str) -> Range<usize> {
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    start..start + text.len()
}

/// Where each top-level member of `body` (checked strict JSON) is; an error if it is not an
/// object.
fn locate_members(body: &str) -> Result<Members, serde_json::Error> {
    struct Locate<'b>(&'b str);

    impl<'de> Visitor<'de> for Locate<'_> {
        type Value = Members;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
            let mut members = Members::new();
            while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                let value: &RawValue = map.next_value()?;
                members.push(Member { key: MemberKey::of(key, self.0), value: span(value.get(), self.0) });
            }
            Ok(members)
        }
    }

    use serde::Deserializer;
    let mut de = serde_json::Deserializer::from_str(body);
    let members = (&mut de).deserialize_map(Locate(body))?;
    de.end()?;
    Ok(members)
}

/// Completion tokens from generated text, when the backend reported no usage.
pub fn estimate_text_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(CHARS_PER_TOKEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ProxyRequest, ApiError> {
        ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::copy_from_slice(body.as_bytes()))
    }

    fn param_of(body: &str) -> Option<&'static str> {
        match parse(body) {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn endpoints_are_listed_in_declaration_order() {
        for (i, endpoint) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(endpoint as usize, i, "{}", endpoint.label());
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
    fn bodies_that_are_not_one_strict_json_object_are_refused_with_the_reason() {
        let reason = |body: &[u8]| match ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::copy_from_slice(body)) {
            Err(ApiError::BadRequest { message, .. }) => message,
            other => panic!("expected a 400, got {other:?}"),
        };
        assert!(reason(b"{\"model\":\"\xff\"}").contains("not UTF-8"));
        assert!(reason(br#"{"model":"a","model":"b"}"#).contains("appears twice"));
        assert!(reason(br#"[{"model":"a"}]"#).contains("must be a JSON object"));
        assert!(reason(br#"{"model":"auto","messages":[{"role":"user"}]} x"#).contains("not valid JSON"));
        assert!(reason(br#"{"model":"auto","messages":[{"role":"user"},{"content":"x"}]}"#).contains("messages[1]"));
    }

    #[test]
    fn the_model_is_read_as_written_or_with_its_escapes_decoded() {
        let body = |model: &str| format!(r#"{{"model":{model},"messages":[{{"role":"user","content":"x"}}]}}"#);
        assert_eq!(parse(&body(r#""gpt-4o""#)).unwrap().model(), "gpt-4o");
        assert_eq!(parse(&body(r#""aut\u006f""#)).unwrap().model(), "auto");
        assert_eq!(parse(&body(r#""caf\u00e9""#)).unwrap().model(), "caf\u{e9}");
        assert_eq!(param_of(&body("7")), Some("model"));
        assert_eq!(param_of(&body(r#""""#)), Some("model"));
    }

    #[test]
    fn reads_stream_usage_wish_and_max_tokens() {
        let r = parse(
            r#"{"model":"auto","messages":[{"role":"user","content":"hello there"}],"stream":true,
                "stream_options":{"include_usage":true},"max_tokens":7}"#,
        )
        .unwrap();
        assert!(r.stream && r.client_wants_usage);
        assert_eq!(r.model(), "auto");
        assert_eq!(r.max_tokens, Some(7));
        // 11 chars + 4 ("user") → 15 chars → 4 tokens, plus 4 for the message.
        assert_eq!(r.prompt_tokens_estimate, 8);
    }
}
