//! A streamed answer put back together as the JSON answer the same request would have had
//! unstreamed, so that it can be stored and served to streaming and non-streaming clients
//! alike. Only an answer that streamed cleanly to its end is whole: an error event, a choice
//! without a finish reason, or log-probabilities (which the assembled answer would not carry)
//! leave nothing to store.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::openai::Usage;
use crate::request::Endpoint;

#[derive(Default)]
struct Choice {
    role: Option<String>,
    content: String,
    refusal: Option<String>,
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<Value>,
}

#[derive(Default)]
struct ToolCall {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

/// Reads a stream's events as they pass to the client.
pub struct Assembler {
    endpoint: Endpoint,
    head: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    /// Bytes taken so far; past `max_bytes` the answer will not be stored.
    taken: usize,
    max_bytes: usize,
    unusable: bool,
}

impl Assembler {
    pub fn new(endpoint: Endpoint, max_bytes: usize) -> Self {
        Self { endpoint, head: Map::new(), choices: BTreeMap::new(), taken: 0, max_bytes, unusable: false }
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Takes complete SSE events (`data: ...` blocks).
    pub fn feed(&mut self, events: &[u8]) {
        if self.unusable {
            return;
        }
        self.taken += events.len();
        if self.taken > self.max_bytes {
            self.unusable = true;
            return;
        }
        let Ok(text) = std::str::from_utf8(events) else {
            self.unusable = true;
            return;
        };
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:").map(str::trim_start) else { continue };
            if data == "[DONE]" {
                continue;
            }
            match serde_json::from_str::<Value>(data) {
                Ok(event) => self.event(&event),
                Err(_) => self.unusable = true,
            }
        }
    }

    fn event(&mut self, event: &Value) {
        if event.get("error").is_some() {
            self.unusable = true;
            return;
        }
        for field in ["id", "created", "model", "system_fingerprint"] {
            if let Some(value) = event.get(field).filter(|v| !v.is_null()) {
                self.head.entry(field).or_insert_with(|| value.clone());
            }
        }
        for (position, part) in event.get("choices").and_then(Value::as_array).into_iter().flatten().enumerate() {
            if part.get("logprobs").is_some_and(|l| !l.is_null()) {
                self.unusable = true;
                return;
            }
            let index = part.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
            let choice = self.choices.entry(index).or_default();
            if let Some(reason) = part.get("finish_reason").filter(|r| !r.is_null()) {
                choice.finish_reason = Some(reason.clone());
            }
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                choice.content.push_str(text);
            }
            let Some(delta) = part.get("delta") else { continue };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                choice.role = Some(role.to_owned());
            }
            if let Some(content) = delta.get("content").and_then(Value::as_str) {
                choice.content.push_str(content);
            }
            if let Some(refusal) = delta.get("refusal").and_then(Value::as_str) {
                choice.refusal.get_or_insert_with(String::new).push_str(refusal);
            }
            for (i, call) in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
                let at = call.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                let tool = choice.tool_calls.entry(at).or_default();
                if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
                    tool.id = Some(id.clone());
                }
                if let Some(kind) = call.get("type").filter(|v| !v.is_null()) {
                    tool.kind = Some(kind.clone());
                }
                if let Some(function) = call.get("function") {
                    if let Some(name) = function.get("name").and_then(Value::as_str) {
                        tool.name.push_str(name);
                    }
                    if let Some(arguments) = function.get("arguments").and_then(Value::as_str) {
                        tool.arguments.push_str(arguments);
                    }
                }
            }
        }
    }

    /// The whole answer, with `usage`, or `None` when the stream did not make one.
    pub fn finish(self, usage: Option<Usage>) -> Option<Vec<u8>> {
        if self.unusable || self.choices.is_empty() || self.choices.values().any(|c| c.finish_reason.is_none()) {
            return None;
        }
        let chat = self.endpoint == Endpoint::ChatCompletions;
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                if !chat {
                    return json!({"index": index, "text": c.content, "logprobs": null, "finish_reason": c.finish_reason});
                }
                let mut message = Map::new();
                message.insert("role".into(), Value::String(c.role.unwrap_or_else(|| "assistant".into())));
                let has_tools = !c.tool_calls.is_empty();
                message.insert(
                    "content".into(),
                    if c.content.is_empty() && has_tools { Value::Null } else { Value::String(c.content) },
                );
                if let Some(refusal) = c.refusal {
                    message.insert("refusal".into(), Value::String(refusal));
                }
                if has_tools {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .into_values()
                        .map(|t| {
                            json!({"id": t.id, "type": t.kind.unwrap_or_else(|| json!("function")),
                                   "function": {"name": t.name, "arguments": t.arguments}})
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({"index": index, "message": message, "logprobs": null, "finish_reason": c.finish_reason})
            })
            .collect();
        let mut answer = self.head;
        let object = if chat { "chat.completion" } else { "text_completion" };
        answer.insert("object".into(), Value::String(object.into()));
        answer.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = usage {
            answer.insert(
                "usage".into(),
                json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                       "total_tokens": usage.prompt_tokens + usage.completion_tokens}),
            );
        }
        serde_json::to_vec(&Value::Object(answer)).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn events(items: &[Value]) -> Vec<u8> {
        let mut out = String::new();
        for item in items {
            out.push_str(&format!("data: {item}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        out.into_bytes()
    }

    #[test]
    fn chunks_make_the_answer_an_unstreamed_request_gets() {
        let mut assembler = Assembler::new(Endpoint::ChatCompletions, 1 << 20);
        let stream = events(&[
            json!({"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "get", "arguments": "{\"a\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ]);
        // Events arrive in arbitrary batches.
        let (a, b) = stream.split_at(stream.iter().position(|&c| c == b'\n').unwrap() + 2);
        assembler.feed(a);
        assembler.feed(b);
        let usage = Usage { prompt_tokens: 3, completion_tokens: 4, prompt_tokens_details: None };
        let answer: Value = serde_json::from_slice(&assembler.finish(Some(usage)).unwrap()).unwrap();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["id"], "c1");
        let message = &answer["choices"][0]["message"];
        assert_eq!(message["content"], "Hello");
        assert_eq!(message["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(message["tool_calls"][0]["id"], "t1");
        assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(answer["usage"]["total_tokens"], 7);
    }

    #[test]
    fn an_unfinished_or_broken_stream_makes_no_answer() {
        let unfinished = events(&[json!({"choices": [{"index": 0, "delta": {"content": "x"}}]})]);
        let mut a = Assembler::new(Endpoint::ChatCompletions, 1 << 20);
        a.feed(&unfinished);
        assert!(a.finish(None).is_none(), "no finish reason");

        let errored = events(&[
            json!({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}),
            json!({"error": {"message": "cut"}}),
        ]);
        let mut a = Assembler::new(Endpoint::ChatCompletions, 1 << 20);
        a.feed(&errored);
        assert!(a.finish(None).is_none(), "an error event");

        let with_logprobs = events(&[
            json!({"choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": {"content": []}, "finish_reason": "stop"}]}),
        ]);
        let mut a = Assembler::new(Endpoint::ChatCompletions, 1 << 20);
        a.feed(&with_logprobs);
        assert!(a.finish(None).is_none(), "log-probabilities the answer would lose");

        let mut small = Assembler::new(Endpoint::ChatCompletions, 10);
        small.feed(&events(&[
            json!({"choices": [{"index": 0, "delta": {"content": "long enough"}, "finish_reason": "stop"}]}),
        ]));
        assert!(small.finish(None).is_none(), "larger than an entry may be");

        let mut text = Assembler::new(Endpoint::Completions, 1 << 20);
        text.feed(&events(&[
            json!({"choices": [{"index": 0, "text": "ab"}]}),
            json!({"choices": [{"index": 0, "text": "c", "finish_reason": "stop"}]}),
        ]));
        let answer: Value = serde_json::from_slice(&text.finish(None).unwrap()).unwrap();
        assert_eq!(
            (answer["choices"][0]["text"].as_str(), answer["object"].as_str()),
            (Some("abc"), Some("text_completion"))
        );
    }
}
