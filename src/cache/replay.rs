//! A stored answer replayed as the stream the client asked for: the chunks an OpenAI server
//! sends (the role and content, then each choice's finish reason, then the usage chunk only
//! if the client asked for it with `stream_options.include_usage`), ending with `[DONE]`. An
//! OpenAI SDK cannot tell it from a live stream.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Map, Value};

use crate::request::Endpoint;

/// The SSE body replaying `answer` (a stored JSON answer of `endpoint`), or `None` when it has
/// no choices to replay.
pub fn sse(endpoint: Endpoint, answer: &[u8], include_usage: bool) -> Option<Bytes> {
    let answer: Value = serde_json::from_slice(answer).ok()?;
    let choices = answer.get("choices")?.as_array()?;
    let (object, chat) = match endpoint {
        Endpoint::ChatCompletions => ("chat.completion.chunk", true),
        Endpoint::Completions => ("text_completion", false),
        Endpoint::Embeddings => return None,
    };
    let mut head = Map::new();
    for field in ["id", "created", "model", "system_fingerprint"] {
        if let Some(value) = answer.get(field) {
            head.insert(field.into(), value.clone());
        }
    }
    head.insert("object".into(), Value::String(object.into()));
    let chunk = |choices: Value| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        Value::Object(chunk)
    };
    let mut out = BytesMut::new();
    let mut send = |event: &Value| {
        out.put_slice(b"data: ");
        out.put_slice(&serde_json::to_vec(event).unwrap_or_default());
        out.put_slice(b"\n\n");
    };
    for (position, choice) in choices.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or_else(|| Value::from(position));
        let body = if chat {
            let message = choice.get("message").and_then(Value::as_object).cloned().unwrap_or_default();
            let mut delta = Map::new();
            delta.insert("role".into(), message.get("role").cloned().unwrap_or_else(|| json!("assistant")));
            for (name, value) in message {
                match name.as_str() {
                    "role" => {}
                    // Streamed tool calls carry their position.
                    "tool_calls" => {
                        let calls = value.as_array().cloned().unwrap_or_default();
                        let calls: Vec<Value> = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, mut call)| {
                                if let Some(call) = call.as_object_mut() {
                                    call.entry("index").or_insert_with(|| Value::from(i));
                                }
                                call
                            })
                            .collect();
                        delta.insert(name, Value::Array(calls));
                    }
                    _ => {
                        delta.insert(name, value);
                    }
                }
            }
            json!({"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": null})
        } else {
            json!({"index": index, "text": choice.get("text"), "logprobs": choice.get("logprobs"), "finish_reason": null})
        };
        send(&chunk(Value::Array(vec![body])));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let end = if chat {
            json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish})
        };
        send(&chunk(Value::Array(vec![end])));
    }
    if include_usage {
        if let Some(usage) = answer.get("usage") {
            let mut last = head.clone();
            last.insert("choices".into(), Value::Array(Vec::new()));
            last.insert("usage".into(), usage.clone());
            send(&Value::Object(last));
        }
    }
    out.put_slice(b"data: [DONE]\n\n");
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn events(body: &Bytes) -> Vec<Value> {
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    #[test]
    fn a_chat_answer_replays_as_its_chunks_with_usage_only_when_asked() {
        let answer = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        });
        let bytes = serde_json::to_vec(&answer).unwrap();
        let with = events(&sse(Endpoint::ChatCompletions, &bytes, true).unwrap());
        assert_eq!(with.len(), 3);
        assert!(with.iter().all(|e| e["object"] == "chat.completion.chunk" && e["id"] == "chatcmpl-1"));
        let delta = &with[0]["choices"][0]["delta"];
        assert_eq!((delta["role"].as_str(), delta["content"].as_str()), (Some("assistant"), Some("hello")));
        assert_eq!(delta["tool_calls"][0]["index"], 0);
        assert_eq!(delta["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(with[1]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(with[2]["usage"]["total_tokens"], 5);
        assert_eq!(with[2]["choices"], json!([]));
        let without = events(&sse(Endpoint::ChatCompletions, &bytes, false).unwrap());
        assert_eq!(without.len(), 2);
        assert!(without.iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn a_completion_replays_its_text() {
        let answer = json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "text": "abc", "finish_reason": "stop"}]});
        let events = events(&sse(Endpoint::Completions, &serde_json::to_vec(&answer).unwrap(), false).unwrap());
        assert_eq!(events[0]["choices"][0]["text"], "abc");
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert!(sse(Endpoint::Completions, b"{\"error\":1}", false).is_none());
    }
}
