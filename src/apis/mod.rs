//! The APIs other than Chat Completions, translated to and from it at the edges.
//!
//! A client may speak the OpenAI Responses API (`POST /v1/responses`) or the Anthropic Messages
//! API (`POST /v1/messages`); a backend may speak Messages (`api = "anthropic"`). Everything in
//! between (routing, budgets, the cache, metering) sees one shape, a chat completion:
//!
//! ```text
//! client ── responses / messages ──▶ chat ──▶ dispatch ──▶ chat ──▶ messages ── backend
//!        ◀── responses / messages ── chat ◀──          ◀── chat ◀── messages ──
//! ```
//!
//! What cannot be translated is refused with a 400 naming it ([`Untranslatable`]), never
//! dropped. The conversions are plain functions over JSON values, tested without any I/O.
//!
//! A backend that serves the client's API itself (`api = "anthropic"` for Messages, or
//! `native_apis`) gets the client's request as it came ([`Native`]), and its answer goes back
//! untranslated, read for usage in that API's shape (`usage`).

pub mod body;
pub mod messages;
pub mod responses;
pub mod usage;

use serde_json::Value;

/// The shape of a request or an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Chat,
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API.
    Messages,
}

/// A client's Responses or Messages request, kept as it came for a backend that serves that
/// API itself.
#[derive(Debug)]
pub struct Native {
    pub dialect: Dialect,
    pub request: Value,
    /// Why the request has no chat form: then only a backend serving `dialect` can take it,
    /// and the chat request it is routed by is only an estimate of its size.
    pub untranslatable: Option<Untranslatable>,
}

impl Native {
    /// The request for a backend serving it natively: the client's JSON with the backend's
    /// model and, when budget clamping shortened it, the completion limit in the API's field.
    pub fn body(&self, backend_model: &str, max_tokens: Option<u64>) -> Vec<u8> {
        let mut request = self.request.clone();
        if let Some(fields) = request.as_object_mut() {
            fields.insert("model".into(), Value::from(backend_model));
            if let Some(tokens) = max_tokens {
                let field = match self.dialect {
                    Dialect::Responses => "max_output_tokens",
                    _ => "max_tokens",
                };
                fields.insert(field.into(), Value::from(tokens));
            }
        }
        serde_json::to_vec(&request).unwrap_or_default()
    }
}

/// A rough chat request standing for a request that has no chat form: its model, limit and
/// streaming as asked, and all of its input as text, so that the prompt's size is estimated
/// on the safe side (JSON syntax counts too).
pub fn size_estimate(dialect: Dialect, request: &Value) -> Value {
    let field = |name: &str| request.get(name).filter(|v| !v.is_null());
    let mut text = String::new();
    for name in ["system", "instructions", "messages", "input", "tools"] {
        if let Some(value) = field(name) {
            text.push_str(&value.to_string());
        }
    }
    let limit = match dialect {
        Dialect::Responses => field("max_output_tokens"),
        _ => field("max_tokens"),
    };
    let mut chat = serde_json::json!({
        "model": field("model").cloned().unwrap_or(Value::Null),
        "messages": [{"role": "user", "content": text}],
    });
    if let Some(fields) = chat.as_object_mut() {
        if let Some(limit) = limit {
            fields.insert("max_tokens".into(), limit.clone());
        }
        if field("stream").and_then(Value::as_bool) == Some(true) {
            fields.insert("stream".into(), Value::Bool(true));
            fields.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
        }
    }
    chat
}

/// A request that cannot be expressed in the API it must be sent in: answered 400, naming the
/// field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Untranslatable {
    pub message: String,
    /// The request field at fault (`messages[2].content[0].type`, `previous_response_id`...).
    pub param: Option<String>,
}

impl Untranslatable {
    pub fn new(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self { message: message.into(), param: Some(param.into()) }
    }
}

/// Appends one server-sent event: `event: {name}` (when named), `data: {json}`, a blank line.
pub fn write_event(out: &mut Vec<u8>, name: Option<&str>, data: &Value) {
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

/// One server-sent event: its `event:` name, if any, and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

/// Cuts a byte stream into server-sent events, however the bytes are split.
#[derive(Debug, Default)]
pub struct EventReader {
    pending: Vec<u8>,
}

impl EventReader {
    /// The events completed by `bytes`; an incomplete one is kept for the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = event_end(&self.pending[start..]) {
            if let Some(event) = parse_event(&self.pending[start..start + end]) {
                events.push(event);
            }
            start += end;
        }
        self.pending.drain(..start);
        events
    }

    /// The last event when the stream ended without the blank line that should close it.
    pub fn finish(&mut self) -> Option<Event> {
        let rest = std::mem::take(&mut self.pending);
        parse_event(&rest)
    }
}

/// Length up to and including the blank line that ends the first event.
pub(crate) fn event_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|i| match bytes.get(i + 1..) {
        Some([b'\n', ..]) => Some(i + 2),
        Some([b'\r', b'\n', ..]) => Some(i + 3),
        _ => None,
    })
}

fn parse_event(bytes: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(bytes);
    let mut name = None;
    let mut data: Option<String> = None;
    for line in text.lines() {
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value.to_owned()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    data.map(|data| Event { name, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_whatever_the_split() {
        let stream =
            b"event: a\ndata: {\"x\":1}\n\n: comment\n\ndata: one\ndata: two\r\n\r\nevent: b\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut reader = EventReader::default();
            let mut events = reader.feed(&stream[..split]);
            events.extend(reader.feed(&stream[split..]));
            assert_eq!(
                events,
                vec![
                    Event { name: Some("a".into()), data: "{\"x\":1}".into() },
                    Event { name: None, data: "one\ntwo".into() },
                    Event { name: Some("b".into()), data: "[DONE]".into() },
                ],
                "split at {split}"
            );
            assert_eq!(reader.finish(), None);
        }
    }

    #[test]
    fn a_native_request_goes_as_it_came_with_the_backends_model_and_a_clamped_limit() {
        let request = serde_json::json!({"model": "claude", "max_tokens": 900, "top_k": 5,
            "system": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "x"}]});
        let native = Native { dialect: Dialect::Messages, request: request.clone(), untranslatable: None };
        let sent: Value = serde_json::from_slice(&native.body("claude-3-7", None)).unwrap();
        let mut expected = request.clone();
        expected["model"] = Value::from("claude-3-7");
        assert_eq!(sent, expected, "nothing but the model changes");
        let sent: Value = serde_json::from_slice(&native.body("m", Some(50))).unwrap();
        assert_eq!(sent["max_tokens"], 50);
        let native = Native { dialect: Dialect::Responses, request, untranslatable: None };
        let sent: Value = serde_json::from_slice(&native.body("m", Some(50))).unwrap();
        assert_eq!(sent["max_output_tokens"], 50, "the Responses API's own field");
    }

    #[test]
    fn a_request_without_a_chat_form_is_routed_by_its_whole_inputs_size() {
        let text = "word ".repeat(400);
        let request = serde_json::json!({"model": "auto", "max_output_tokens": 64, "stream": true,
            "truncation": "auto", "instructions": "Be brief.", "input": [{"role": "user", "content": text}]});
        let chat = size_estimate(Dialect::Responses, &request);
        assert_eq!((chat["model"].as_str(), chat["max_tokens"].as_u64()), (Some("auto"), Some(64)));
        assert_eq!(chat["stream_options"]["include_usage"], true);
        let content = chat["messages"][0]["content"].as_str().unwrap();
        assert!(content.contains("Be brief.") && content.len() > text.len(), "every input counts: {}", content.len());
    }

    #[test]
    fn a_written_event_reads_back() {
        let mut out = Vec::new();
        write_event(&mut out, Some("message_stop"), &serde_json::json!({"type": "message_stop"}));
        write_event(&mut out, None, &serde_json::json!({"a": "b\nc"}));
        let events = EventReader::default().feed(&out);
        assert_eq!(events[0].name.as_deref(), Some("message_stop"));
        assert_eq!(events[1].data, r#"{"a":"b\nc"}"#);
    }
}
