//! The Anthropic Messages API, translated to and from Chat Completions: for clients calling
//! `POST /v1/messages` (inbound) and for backends with `api = "anthropic"` (outbound).
//!
//! Inbound, a Messages request as chat: `system`, text and image blocks (base64 or URL),
//! `tool_use` blocks as `tool_calls`, `tool_result` blocks as `tool` messages (ahead of the rest
//! of their turn), `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `metadata.user_id`,
//! `stream`, custom `tools`, `tool_choice` (with `disable_parallel_tool_use`) and
//! `thinking: {"type": "disabled"}`. Refused: `top_k`, any other `thinking`, thinking, document,
//! search-result and server-tool blocks, file image sources, images in tool results, server
//! tools, unknown members. Ignored: `cache_control` wherever it is (a prompt-cache hint), and a
//! tool result's `is_error` (chat has no such flag; the error is in the result's text).
//!
//! Outbound, a chat request as Messages: system and developer messages (hoisted into `system`),
//! text and image parts (data URI or http(s) URL), tool calls, `tool` messages (consecutive
//! messages of a role merged: Messages requires alternation), `max_tokens` /
//! `max_completion_tokens`, `stop`, `temperature` (at most 1), `top_p`, `stream`, `user`,
//! function tools, `tool_choice`, `parallel_tool_calls`. Refused: `n` > 1, `logprobs`,
//! `top_logprobs`, a `response_format` other than text, `seed`, non-zero penalties,
//! `logit_bias`, `reasoning_effort`, `audio`, `modalities` other than text, audio and file
//! parts, a message's `name`, unknown members. Ignored: `stream_options` (a Messages stream
//! always reports usage) and an image's `detail` (a resolution hint with no Messages field).
//!
//! Usage: chat's `prompt_tokens` includes the prompt tokens read from and written to the cache,
//! Anthropic's `input_tokens` excludes both. A Messages stream reports usage twice: the input at
//! `message_start`, the cumulative output (and, lately, the input again) at `message_delta`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{write_event, Untranslatable};
use crate::clock::unix_now;

/// Token counts in Anthropic's terms: `input` excludes the cached and cache-written tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tokens {
    input: u64,
    cache_read: u64,
    cache_write: u64,
    output: u64,
}

impl Tokens {
    fn from_anthropic(usage: &Value) -> Self {
        let mut tokens = Self::default();
        tokens.update_from_anthropic(usage);
        tokens
    }

    /// Takes the counts `usage` carries: a `message_delta`'s are cumulative, so they replace.
    fn update_from_anthropic(&mut self, usage: &Value) {
        let counts = [
            ("input_tokens", &mut self.input),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("cache_creation_input_tokens", &mut self.cache_write),
            ("output_tokens", &mut self.output),
        ];
        for (name, count) in counts {
            if let Some(value) = usage.get(name).and_then(Value::as_u64) {
                *count = value;
            }
        }
    }

    fn from_chat(usage: &Value) -> Self {
        let count = |pointer| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
        let prompt = count("/prompt_tokens");
        let cache_read = count("/prompt_tokens_details/cached_tokens").min(prompt);
        let cache_write = count("/prompt_tokens_details/cache_write_tokens").min(prompt - cache_read);
        Self { input: prompt - cache_read - cache_write, cache_read, cache_write, output: count("/completion_tokens") }
    }

    fn to_chat(self) -> Value {
        let prompt = self.input.saturating_add(self.cache_read).saturating_add(self.cache_write);
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
            "prompt_tokens_details": {"cached_tokens": self.cache_read, "cache_write_tokens": self.cache_write},
        })
    }

    fn to_anthropic(self) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": self.output,
        })
    }
}

/// Refuses a member of `object` (a block, a message, a tool) that is non-null and neither
/// `type`, `cache_control` nor one of `allowed`.
fn only(object: &Value, allowed: &[&str], path: &str) -> Result<(), Untranslatable> {
    let Some(object) = object.as_object() else { return Err(Untranslatable::new("expected an object", path)) };
    let unknown = object.iter().find(|(name, value)| {
        !value.is_null() && !matches!(name.as_str(), "type" | "cache_control") && !allowed.contains(&name.as_str())
    });
    match unknown {
        Some((name, _)) => Err(Untranslatable::new(format!("`{name}` cannot be translated"), format!("{path}.{name}"))),
        None => Ok(()),
    }
}

fn string<'a>(object: &'a Value, name: &str, path: &str) -> Result<&'a str, Untranslatable> {
    object
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Untranslatable::new("expected a string", format!("{path}.{name}")))
}

fn kind(block: &Value) -> &str {
    block.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// A string, or text blocks (chat's text parts have the same shape) joined by `separator`.
fn text_of(content: &Value, separator: &str, path: &str) -> Result<String, Untranslatable> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                let path = format!("{path}[{j}]");
                if kind(block) != "text" {
                    return Err(Untranslatable::new(
                        format!("a `{}` block cannot be translated here", kind(block)),
                        path,
                    ));
                }
                texts.push(text_block(block, &path)?);
            }
            Ok(texts.join(separator))
        }
        _ => Err(Untranslatable::new("expected a string or an array of text blocks", path)),
    }
}

/// A text block's (or text part's) text.
fn text_block<'a>(block: &'a Value, path: &str) -> Result<&'a str, Untranslatable> {
    only(block, &["text"], path)?;
    string(block, "text", path)
}

/// Writes one Anthropic event, named after its `type` as Anthropic does.
fn send(out: &mut Vec<u8>, data: Value) {
    write_event(out, data.get("type").and_then(Value::as_str), &data);
}

fn anthropic_error(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

// ---- Inbound: a Messages client in front of the gateway ----

/// A Messages request body as the chat request to route (`stream_options.include_usage: true`
/// when streamed, so the usage reaches the translator).
pub fn chat_request(request: &Value) -> Result<Value, Untranslatable> {
    let Some(request) = request.as_object() else {
        return Err(Untranslatable { message: "a Messages request is a JSON object".into(), param: None });
    };
    let required = |name: &str| {
        request
            .get(name)
            .filter(|v| !v.is_null())
            .ok_or_else(|| Untranslatable::new(format!("`{name}` is required"), name))
    };
    let model = required("model")?.as_str().ok_or_else(|| Untranslatable::new("expected a string", "model"))?;
    let max_tokens = required("max_tokens")?
        .as_u64()
        .ok_or_else(|| Untranslatable::new("`max_tokens` must be a positive integer", "max_tokens"))?;
    let turns = required("messages")?.as_array().ok_or_else(|| Untranslatable::new("expected an array", "messages"))?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    if let Some(system) = request.get("system").filter(|v| !v.is_null()) {
        messages.push(json!({"role": "system", "content": text_of(system, "\n\n", "system")?}));
    }
    for (i, turn) in turns.iter().enumerate() {
        push_chat_messages(turn, &format!("messages[{i}]"), &mut messages)?;
    }
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert("max_tokens".into(), json!(max_tokens));
    for (name, value) in request.iter().filter(|(_, value)| !value.is_null()) {
        match name.as_str() {
            "model" | "max_tokens" | "messages" | "system" | "cache_control" => {}
            "temperature" | "top_p" => {
                chat.insert(name.clone(), value.clone());
            }
            "stop_sequences" => {
                chat.insert("stop".into(), value.clone());
            }
            "metadata" => {
                only(value, &["user_id"], "metadata")?;
                if let Some(user) = value.get("user_id").filter(|v| !v.is_null()) {
                    chat.insert("user".into(), user.clone());
                }
            }
            "stream" => {
                chat.insert("stream".into(), value.clone());
                if value.as_bool() == Some(true) {
                    chat.insert("stream_options".into(), json!({"include_usage": true}));
                }
            }
            "tools" => {
                chat.insert("tools".into(), chat_tools(value)?);
            }
            "tool_choice" => chat_tool_choice(value, &mut chat)?,
            "thinking" if kind(value) == "disabled" => {}
            "thinking" => return Err(Untranslatable::new("extended thinking cannot be translated", "thinking")),
            "top_k" => return Err(Untranslatable::new("`top_k` has no Chat Completions equivalent", "top_k")),
            _ => return Err(Untranslatable::new(format!("`{name}` cannot be translated"), name.as_str())),
        }
    }
    Ok(Value::Object(chat))
}

/// One Messages turn as chat messages: a user turn's tool results become `tool` messages, ahead
/// of the rest of the turn.
fn push_chat_messages(turn: &Value, path: &str, out: &mut Vec<Value>) -> Result<(), Untranslatable> {
    only(turn, &["role", "content"], path)?;
    let content = turn.get("content").unwrap_or(&Value::Null);
    let content_path = format!("{path}.content");
    match (turn.get("role").and_then(Value::as_str), content) {
        (Some(role @ ("user" | "assistant")), Value::String(text)) => out.push(json!({"role": role, "content": text})),
        (Some("user"), Value::Array(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                let path = format!("{content_path}[{j}]");
                match kind(block) {
                    "text" => parts.push(json!({"type": "text", "text": text_block(block, &path)?})),
                    "image" => parts.push(image_part(block, &path)?),
                    "tool_result" => {
                        only(block, &["tool_use_id", "content", "is_error"], &path)?;
                        let content = match block.get("content") {
                            None | Some(Value::Null) => String::new(),
                            Some(content) => text_of(content, "\n", &format!("{path}.content"))?,
                        };
                        let id = string(block, "tool_use_id", &path)?;
                        out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                    }
                    other => return Err(Untranslatable::new(format!("a `{other}` block cannot be translated"), path)),
                }
            }
            if !parts.is_empty() || blocks.is_empty() {
                out.push(json!({"role": "user", "content": parts}));
            }
        }
        (Some("assistant"), Value::Array(blocks)) => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                let path = format!("{content_path}[{j}]");
                match kind(block) {
                    "text" => text.push_str(text_block(block, &path)?),
                    "tool_use" => {
                        only(block, &["id", "name", "input"], &path)?;
                        let arguments = block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string);
                        calls.push(json!({"id": string(block, "id", &path)?, "type": "function",
                            "function": {"name": string(block, "name", &path)?, "arguments": arguments}}));
                    }
                    other => return Err(Untranslatable::new(format!("a `{other}` block cannot be translated"), path)),
                }
            }
            let content = if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) };
            let mut message = json!({"role": "assistant", "content": content});
            if let (Some(message), false) = (message.as_object_mut(), calls.is_empty()) {
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            out.push(message);
        }
        (Some("user" | "assistant"), _) => {
            return Err(Untranslatable::new("expected a string or an array of content blocks", content_path))
        }
        _ => return Err(Untranslatable::new("`role` must be user or assistant", format!("{path}.role"))),
    }
    Ok(())
}

fn image_part(block: &Value, path: &str) -> Result<Value, Untranslatable> {
    only(block, &["source"], path)?;
    let source = block.get("source").unwrap_or(&Value::Null);
    let source_path = format!("{path}.source");
    let url = match kind(source) {
        "base64" => {
            format!(
                "data:{};base64,{}",
                string(source, "media_type", &source_path)?,
                string(source, "data", &source_path)?
            )
        }
        "url" => string(source, "url", &source_path)?.to_owned(),
        _ => return Err(Untranslatable::new("only base64 and URL image sources can be translated", source_path)),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn chat_tools(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools.as_array().ok_or_else(|| Untranslatable::new("expected an array", "tools"))?;
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let path = format!("tools[{i}]");
        if !matches!(kind(tool), "" | "custom") {
            return Err(Untranslatable::new(format!("the server tool `{}` cannot be translated", kind(tool)), path));
        }
        only(tool, &["name", "description", "input_schema", "strict"], &path)?;
        let mut function = Map::new();
        function.insert("name".into(), json!(string(tool, "name", &path)?));
        for (from, to) in [("description", "description"), ("input_schema", "parameters"), ("strict", "strict")] {
            if let Some(value) = tool.get(from).filter(|v| !v.is_null()) {
                function.insert(to.into(), value.clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn chat_tool_choice(choice: &Value, chat: &mut Map<String, Value>) -> Result<(), Untranslatable> {
    only(choice, &["name", "disable_parallel_tool_use"], "tool_choice")?;
    let mapped = match kind(choice) {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => json!({"type": "function", "function": {"name": string(choice, "name", "tool_choice")?}}),
        _ => return Err(Untranslatable::new("expected auto, any, tool or none", "tool_choice.type")),
    };
    chat.insert("tool_choice".into(), mapped);
    if choice.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        chat.insert("parallel_tool_calls".into(), json!(false));
    }
    Ok(())
}

fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// A tool call's arguments as a `tool_use` block's input, which must be an object.
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str(arguments).ok().filter(Value::is_object).unwrap_or_else(|| json!({}))
}

/// A chat completion answer (JSON value) as a Messages answer.
pub fn answer(chat: &Value) -> Value {
    let choice = chat.pointer("/choices/0").unwrap_or(&Value::Null);
    let message = choice.get("message").unwrap_or(&Value::Null);
    let text: String =
        ["content", "refusal"].iter().filter_map(|name| message.get(name).and_then(Value::as_str)).collect();
    let mut content = Vec::new();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or_default();
        content.push(json!({"type": "tool_use", "id": call.get("id").and_then(Value::as_str).unwrap_or_default(),
            "name": call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default(),
            "input": tool_input(arguments)}));
    }
    json!({
        "id": format!("msg_{}", chat.get("id").and_then(Value::as_str).unwrap_or_default()),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model").and_then(Value::as_str).unwrap_or_default(),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": Tokens::from_chat(chat.get("usage").unwrap_or(&Value::Null)).to_anthropic(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text,
    /// A tool call, by its chat index.
    Tool(u64),
}

/// Chat SSE → Anthropic SSE, event by event.
#[derive(Debug)]
pub struct FromChatStream {
    model: String,
    prompt_tokens_estimate: u64,
    started: bool,
    ended: bool,
    blocks_started: u64,
    open: Option<OpenBlock>,
    tool_calls_started: Vec<u64>,
    finish_reason: Option<String>,
    usage: Option<Tokens>,
}

impl FromChatStream {
    /// `model`: the model the client asked for (reported until the chat chunks name one);
    /// `prompt_tokens_estimate`: what `message_start` reports as input_tokens before the real
    /// usage is known.
    pub fn new(model: &str, prompt_tokens_estimate: u64) -> Self {
        Self {
            model: model.to_owned(),
            prompt_tokens_estimate,
            started: false,
            ended: false,
            blocks_started: 0,
            open: None,
            tool_calls_started: Vec::new(),
            finish_reason: None,
            usage: None,
        }
    }

    /// One chat stream event's `data:` payload (a chunk's JSON text, an `{"error": {...}}`
    /// object, or `[DONE]`); returns the bytes of the Anthropic SSE events to send now.
    pub fn event(&mut self, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if data.trim() == "[DONE]" {
            self.done(&mut out);
            return out;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            self.fail(&mut out, "the upstream sent a stream event that is not JSON");
            return out;
        };
        if let Some(error) = chunk.get("error") {
            let message = error.get("message").and_then(Value::as_str).unwrap_or("the upstream stream failed");
            self.fail(&mut out, message);
            return out;
        }
        self.start(&mut out, &chunk);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(Tokens::from_chat(usage));
        }
        let choices = chunk.get("choices").and_then(Value::as_array).into_iter().flatten();
        for choice in choices.filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0) {
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_owned());
            }
            let Some(delta) = choice.get("delta") else { continue };
            for name in ["content", "refusal"] {
                if let Some(text) = delta.get(name).and_then(Value::as_str).filter(|t| !t.is_empty()) {
                    self.text(&mut out, text);
                }
            }
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                if !self.tool_call(&mut out, call) {
                    self.fail(
                        &mut out,
                        "the upstream interleaved its tool calls, which a Messages stream cannot carry",
                    );
                    return out;
                }
            }
        }
        out
    }

    /// The chat stream ended. After a clean `[DONE]` nothing; otherwise an Anthropic `error`
    /// event (the stream was cut), never a `message_stop`.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.ended {
            self.fail(&mut out, "the upstream stream ended before the answer was complete");
        }
        out
    }

    fn start(&mut self, out: &mut Vec<u8>, chunk: &Value) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let model = chunk.get("model").and_then(Value::as_str).unwrap_or(&self.model);
        let id = chunk.get("id").and_then(Value::as_str).unwrap_or_default();
        let usage = Tokens { input: self.prompt_tokens_estimate, ..Tokens::default() };
        send(
            out,
            json!({"type": "message_start", "message": {"id": format!("msg_{id}"), "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage.to_anthropic()}}),
        );
        send(out, json!({"type": "ping"}));
    }

    fn open_block(&mut self, out: &mut Vec<u8>, block: OpenBlock, content_block: Value) {
        self.close_block(out);
        self.open = Some(block);
        send(out, json!({"type": "content_block_start", "index": self.blocks_started, "content_block": content_block}));
        self.blocks_started += 1;
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.open.take().is_some() {
            send(out, json!({"type": "content_block_stop", "index": self.blocks_started - 1}));
        }
    }

    fn delta(&self, out: &mut Vec<u8>, delta: Value) {
        send(out, json!({"type": "content_block_delta", "index": self.blocks_started - 1, "delta": delta}));
    }

    fn text(&mut self, out: &mut Vec<u8>, text: &str) {
        if self.open != Some(OpenBlock::Text) {
            self.open_block(out, OpenBlock::Text, json!({"type": "text", "text": ""}));
        }
        self.delta(out, json!({"type": "text_delta", "text": text}));
    }

    /// One `delta.tool_calls` entry; false when it continues a call whose block is closed.
    fn tool_call(&mut self, out: &mut Vec<u8>, call: &Value) -> bool {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or_default();
        if !self.tool_calls_started.contains(&index) {
            self.tool_calls_started.push(index);
            let id = call.get("id").and_then(Value::as_str).map_or_else(|| format!("toolu_{index}"), str::to_owned);
            let name = call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
            let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
            self.open_block(out, OpenBlock::Tool(index), block);
        } else if self.open != Some(OpenBlock::Tool(index)) && !arguments.is_empty() {
            return false;
        }
        if !arguments.is_empty() {
            self.delta(out, json!({"type": "input_json_delta", "partial_json": arguments}));
        }
        true
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        self.start(out, &Value::Null);
        self.close_block(out);
        let usage = self.usage.unwrap_or(Tokens { input: self.prompt_tokens_estimate, ..Tokens::default() });
        let stop_reason = stop_reason(self.finish_reason.as_deref());
        send(
            out,
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": usage.to_anthropic()}),
        );
        send(out, json!({"type": "message_stop"}));
        self.ended = true;
    }

    fn fail(&mut self, out: &mut Vec<u8>, message: &str) {
        send(out, anthropic_error("api_error", message));
        self.ended = true;
    }
}

/// An error in Anthropic's shape for an HTTP status: `{"type":"error","error":{"type","message"}}`.
pub fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        // The gateway answers 503 when its backends are saturated: what Anthropic calls 529.
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    anthropic_error(kind, message)
}

// ---- Outbound: an Anthropic backend behind the gateway ----

/// A chat request (model already set to the backend's model) as a Messages request.
/// `default_max_tokens`: used when the chat request sets neither max_tokens nor
/// max_completion_tokens (Messages requires it).
pub fn backend_request(chat: &Value, default_max_tokens: u64) -> Result<Value, Untranslatable> {
    let Some(chat) = chat.as_object() else {
        return Err(Untranslatable { message: "a chat request is a JSON object".into(), param: None });
    };
    let mut request = Map::new();
    let mut max_tokens: Option<u64> = None;
    let mut tool_choice = None;
    let mut parallel_tool_calls = true;
    for (name, value) in chat.iter().filter(|(_, value)| !value.is_null()) {
        let field = name.as_str();
        match field {
            "model" | "top_p" | "stream" => {
                request.insert(name.clone(), value.clone());
            }
            "messages" => {
                let (system, messages) = anthropic_messages(value)?;
                if let Some(system) = system {
                    request.insert("system".into(), Value::String(system));
                }
                request.insert("messages".into(), Value::Array(messages));
            }
            "max_tokens" | "max_completion_tokens" => {
                let tokens = value.as_u64().ok_or_else(|| Untranslatable::new("expected a positive integer", field))?;
                max_tokens = Some(max_tokens.map_or(tokens, |other| other.min(tokens)));
            }
            "stop" => {
                let stop = if value.is_string() { json!([value]) } else { value.clone() };
                request.insert("stop_sequences".into(), stop);
            }
            "temperature" if value.as_f64().is_some_and(|t| t > 1.0) => {
                return Err(Untranslatable::new("the Messages API takes a `temperature` from 0 to 1", field));
            }
            "temperature" => {
                request.insert(name.clone(), value.clone());
            }
            "user" => {
                request.insert("metadata".into(), json!({"user_id": value}));
            }
            "tools" => {
                request.insert("tools".into(), anthropic_tools(value)?);
            }
            "tool_choice" => tool_choice = Some(anthropic_tool_choice(value)?),
            "parallel_tool_calls" => parallel_tool_calls = value.as_bool() != Some(false),
            "stream_options" => {}
            // The defaults, harmless to state.
            "n" if value.as_u64() == Some(1) => {}
            "logprobs" if value.as_bool() == Some(false) => {}
            "top_logprobs" if value.as_u64() == Some(0) => {}
            "frequency_penalty" | "presence_penalty" if value.as_f64() == Some(0.0) => {}
            "logit_bias" if value.as_object().is_some_and(Map::is_empty) => {}
            "response_format" if kind(value) == "text" => {}
            "modalities" if *value == json!(["text"]) => {}
            _ => return Err(Untranslatable::new(format!("`{name}` cannot be translated to the Messages API"), field)),
        }
    }
    request.insert("max_tokens".into(), json!(max_tokens.unwrap_or(default_max_tokens)));
    // Messages refuses a `tool_choice` without tools: only say it when there are, or when asked.
    if !parallel_tool_calls && (tool_choice.is_some() || request.contains_key("tools")) {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(choice) = choice.as_object_mut().filter(|c| c.get("type") != Some(&json!("none"))) {
            choice.insert("disable_parallel_tool_use".into(), json!(true));
        }
    }
    if let Some(choice) = tool_choice {
        request.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(request))
}

/// Chat messages as the Messages `system` and alternating turns.
fn anthropic_messages(messages: &Value) -> Result<(Option<String>, Vec<Value>), Untranslatable> {
    let messages = messages.as_array().ok_or_else(|| Untranslatable::new("expected an array", "messages"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        only(message, &["role", "content", "tool_calls", "tool_call_id"], &path)?;
        let content = message.get("content").unwrap_or(&Value::Null);
        let content_path = format!("{path}.content");
        let (role, blocks) = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => {
                system.push(text_of(content, "\n\n", &content_path)?);
                continue;
            }
            Some("user") => ("user", user_blocks(content, &content_path)?),
            Some("assistant") => ("assistant", assistant_blocks(message, &path)?),
            Some("tool") => {
                let result = match content {
                    Value::Null => String::new(),
                    content => text_of(content, "\n", &content_path)?,
                };
                let id = string(message, "tool_call_id", &path)?;
                ("user", vec![json!({"type": "tool_result", "tool_use_id": id, "content": result})])
            }
            _ => {
                return Err(Untranslatable::new(
                    "expected a system, developer, user, assistant or tool message",
                    format!("{path}.role"),
                ))
            }
        };
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok((system, turns.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect()))
}

fn user_blocks(content: &Value, path: &str) -> Result<Vec<Value>, Untranslatable> {
    let parts = match content {
        Value::String(text) => return Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts,
        _ => return Err(Untranslatable::new("expected a string or an array of parts", path)),
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let path = format!("{path}[{j}]");
        match kind(part) {
            "text" => blocks.push(json!({"type": "text", "text": text_block(part, &path)?})),
            "image_url" => {
                only(part, &["image_url"], &path)?;
                let url = string(part.get("image_url").unwrap_or(&Value::Null), "url", &format!("{path}.image_url"))?;
                blocks.push(image_block(url, &path)?);
            }
            other => return Err(Untranslatable::new(format!("a `{other}` part cannot be translated"), path)),
        }
    }
    Ok(blocks)
}

fn image_block(url: &str, path: &str) -> Result<Value, Untranslatable> {
    if let Some(data_uri) = url.strip_prefix("data:") {
        let Some((media_type, data)) = data_uri.split_once(";base64,") else {
            return Err(Untranslatable::new(
                "only base64 data URIs can be translated",
                format!("{path}.image_url.url"),
            ));
        };
        Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}))
    } else if url.starts_with("https://") || url.starts_with("http://") {
        Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
    } else {
        Err(Untranslatable::new("an image must be a data URI or an http(s) URL", format!("{path}.image_url.url")))
    }
}

fn assistant_blocks(message: &Value, path: &str) -> Result<Vec<Value>, Untranslatable> {
    let mut blocks = Vec::new();
    let text = match message.get("content").unwrap_or(&Value::Null) {
        Value::Null => String::new(),
        content => text_of(content, "", &format!("{path}.content"))?,
    };
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for (k, call) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let path = format!("{path}.tool_calls[{k}]");
        // A streamed call's `index` may be echoed back.
        only(call, &["id", "function", "index"], &path)?;
        if !matches!(kind(call), "" | "function") {
            return Err(Untranslatable::new("only function calls can be translated", format!("{path}.type")));
        }
        let function = call.get("function").unwrap_or(&Value::Null);
        let function_path = format!("{path}.function");
        let arguments = string(function, "arguments", &function_path)?;
        let input = serde_json::from_str::<Value>(arguments).ok().filter(Value::is_object).ok_or_else(|| {
            Untranslatable::new("the arguments must be a JSON object", format!("{function_path}.arguments"))
        })?;
        blocks.push(json!({"type": "tool_use", "id": string(call, "id", &path)?,
            "name": string(function, "name", &function_path)?, "input": input}));
    }
    Ok(blocks)
}

fn anthropic_tools(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools.as_array().ok_or_else(|| Untranslatable::new("expected an array", "tools"))?;
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let path = format!("tools[{i}]");
        if kind(tool) != "function" {
            return Err(Untranslatable::new("only function tools can be translated", format!("{path}.type")));
        }
        only(tool, &["function"], &path)?;
        let function = tool.get("function").unwrap_or(&Value::Null);
        let function_path = format!("{path}.function");
        only(function, &["name", "description", "parameters", "strict"], &function_path)?;
        let mut translated = Map::new();
        translated.insert("name".into(), json!(string(function, "name", &function_path)?));
        if let Some(description) = function.get("description").filter(|v| !v.is_null()) {
            translated.insert("description".into(), description.clone());
        }
        let schema = function.get("parameters").filter(|v| !v.is_null());
        translated.insert("input_schema".into(), schema.cloned().unwrap_or_else(|| json!({"type": "object"})));
        if let Some(strict) = function.get("strict").filter(|v| !v.is_null()) {
            translated.insert("strict".into(), strict.clone());
        }
        out.push(Value::Object(translated));
    }
    Ok(Value::Array(out))
}

fn anthropic_tool_choice(choice: &Value) -> Result<Value, Untranslatable> {
    match (choice.as_str(), kind(choice)) {
        (Some("auto"), _) => Ok(json!({"type": "auto"})),
        (Some("required"), _) => Ok(json!({"type": "any"})),
        (Some("none"), _) => Ok(json!({"type": "none"})),
        (None, "function") => {
            let function = choice.get("function").unwrap_or(&Value::Null);
            Ok(json!({"type": "tool", "name": string(function, "name", "tool_choice.function")?}))
        }
        _ => Err(Untranslatable::new("this `tool_choice` cannot be translated to the Messages API", "tool_choice")),
    }
}

fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// A Messages answer as a chat completion (object "chat.completion").
pub fn backend_answer(message: &Value) -> Value {
    let (mut text, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    for block in message.get("content").and_then(Value::as_array).into_iter().flatten() {
        let field = |name| block.get(name).and_then(Value::as_str).unwrap_or_default();
        match kind(block) {
            "text" => text.push_str(field("text")),
            "thinking" => reasoning.push_str(field("thinking")),
            "tool_use" => {
                let arguments = block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string);
                calls.push(json!({"id": field("id"), "type": "function",
                    "function": {"name": field("name"), "arguments": arguments}}));
            }
            _ => {}
        }
    }
    let mut reply = Map::new();
    reply.insert("role".into(), json!("assistant"));
    reply.insert("content".into(), if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) });
    if !calls.is_empty() {
        reply.insert("tool_calls".into(), Value::Array(calls));
    }
    if !reasoning.is_empty() {
        reply.insert("reasoning_content".into(), json!(reasoning));
    }
    json!({
        "id": format!("chatcmpl-{}", message.get("id").and_then(Value::as_str).unwrap_or_default()),
        "object": "chat.completion",
        "created": unix_now(),
        "model": message.get("model").and_then(Value::as_str).unwrap_or_default(),
        "choices": [{"index": 0, "message": reply, "logprobs": null,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str))}],
        "usage": Tokens::from_anthropic(message.get("usage").unwrap_or(&Value::Null)).to_chat(),
    })
}

/// Anthropic SSE → chat SSE.
#[derive(Debug)]
pub struct ToChatStream {
    id: String,
    model: String,
    created: i64,
    /// The chat index of each `tool_use` block, by the block's index.
    tool_calls: HashMap<u64, usize>,
    tokens: Tokens,
    stop_reason: Option<String>,
    ended: bool,
}

impl Default for ToChatStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ToChatStream {
    pub fn new() -> Self {
        Self {
            id: String::new(),
            model: String::new(),
            created: unix_now(),
            tool_calls: HashMap::new(),
            tokens: Tokens::default(),
            stop_reason: None,
            ended: false,
        }
    }

    /// One Anthropic event (its `event:` name and `data:` payload); returns chat SSE bytes.
    pub fn event(&mut self, name: Option<&str>, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            self.fail(&mut out, "api_error", "the backend sent a stream event that is not JSON");
            return out;
        };
        let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
        match event.get("type").and_then(Value::as_str).or(name).unwrap_or_default() {
            "message_start" => {
                let message = event.get("message").unwrap_or(&Value::Null);
                let field = |name| message.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
                (self.id, self.model) = (format!("chatcmpl-{}", field("id")), field("model"));
                self.tokens = Tokens::from_anthropic(message.get("usage").unwrap_or(&Value::Null));
                self.chunk(&mut out, json!({"role": "assistant", "content": ""}), Value::Null);
            }
            "content_block_start" => {
                let block = event.get("content_block").unwrap_or(&Value::Null);
                let field = |name| block.get(name).and_then(Value::as_str).unwrap_or_default();
                match kind(block) {
                    "tool_use" => {
                        let call = self.tool_calls.len();
                        self.tool_calls.insert(index, call);
                        let input = block.get("input").filter(|i| i.as_object().is_some_and(|i| !i.is_empty()));
                        let arguments = input.map(Value::to_string).unwrap_or_default();
                        let delta = json!({"tool_calls": [{"index": call, "id": field("id"), "type": "function",
                            "function": {"name": field("name"), "arguments": arguments}}]});
                        self.chunk(&mut out, delta, Value::Null);
                    }
                    "text" if !field("text").is_empty() => {
                        self.chunk(&mut out, json!({"content": field("text")}), Value::Null)
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = event.get("delta").unwrap_or(&Value::Null);
                let field = |name| delta.get(name).and_then(Value::as_str).unwrap_or_default();
                match kind(delta) {
                    "text_delta" => self.chunk(&mut out, json!({"content": field("text")}), Value::Null),
                    "thinking_delta" => {
                        self.chunk(&mut out, json!({"reasoning_content": field("thinking")}), Value::Null)
                    }
                    "input_json_delta" if !field("partial_json").is_empty() => {
                        if let Some(call) = self.tool_calls.get(&index) {
                            let arguments = field("partial_json");
                            let delta = json!({"tool_calls": [{"index": call, "function": {"arguments": arguments}}]});
                            self.chunk(&mut out, delta, Value::Null);
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = event.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.tokens.update_from_anthropic(event.get("usage").unwrap_or(&Value::Null));
            }
            "message_stop" => {
                self.chunk(&mut out, json!({}), json!(finish_reason(self.stop_reason.as_deref())));
                let mut usage = self.head();
                usage.insert("choices".into(), json!([]));
                usage.insert("usage".into(), self.tokens.to_chat());
                write_event(&mut out, None, &Value::Object(usage));
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.ended = true;
            }
            "error" => {
                let error = event.get("error").unwrap_or(&Value::Null);
                let field = |name, default| error.get(name).and_then(Value::as_str).unwrap_or(default);
                self.fail(&mut out, field("type", "api_error"), field("message", "the backend's stream failed"));
            }
            // `ping`, `content_block_stop`, and whatever Anthropic adds later.
            _ => {}
        }
        out
    }

    /// The backend's stream ended: nothing to add; without `message_stop` there was no
    /// `[DONE]`, which tells the caller the stream was cut.
    pub fn finish(&mut self) -> Vec<u8> {
        Vec::new()
    }

    fn head(&self) -> Map<String, Value> {
        let mut head = Map::new();
        head.insert("id".into(), json!(self.id));
        head.insert("object".into(), json!("chat.completion.chunk"));
        head.insert("created".into(), json!(self.created));
        head.insert("model".into(), json!(self.model));
        head
    }

    fn chunk(&self, out: &mut Vec<u8>, delta: Value, finish_reason: Value) {
        let mut chunk = self.head();
        chunk.insert(
            "choices".into(),
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]),
        );
        write_event(out, None, &Value::Object(chunk));
    }

    fn fail(&mut self, out: &mut Vec<u8>, kind: &str, message: &str) {
        write_event(out, None, &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}));
        self.ended = true;
    }
}

/// An Anthropic error answer's body in the OpenAI error shape; None when it is not one.
pub fn backend_error(body: &[u8]) -> Option<Value> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?;
    let kind = error.get("type")?.as_str()?;
    Some(json!({"error": {"message": message, "type": kind, "param": null, "code": null}}))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::apis::EventReader;

    /// An SSE body's events: the name and the data as JSON (`[DONE]` as a string).
    fn events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
        let mut reader = EventReader::default();
        let mut events = reader.feed(bytes);
        events.extend(reader.finish());
        events.into_iter().map(|e| (e.name, serde_json::from_str(&e.data).unwrap_or(Value::String(e.data)))).collect()
    }

    fn names(events: &[(Option<String>, Value)]) -> Vec<&str> {
        events.iter().map(|(name, _)| name.as_deref().unwrap_or("")).collect()
    }

    /// Feeds chat `data:` payloads to a [`FromChatStream`], then ends the stream.
    fn from_chat(stream: &mut FromChatStream, payloads: &[String]) -> Vec<(Option<String>, Value)> {
        let mut out: Vec<u8> = payloads.iter().flat_map(|p| stream.event(p)).collect();
        out.extend(stream.finish());
        events(&out)
    }

    /// An Anthropic stream put together as the anthropic SDK does (lib/streaming/_messages.py):
    /// `message_delta`'s usage overwrites what it carries.
    fn accumulate_messages(events: &[(Option<String>, Value)]) -> Value {
        let mut message = Value::Null;
        let mut partial_json: HashMap<usize, String> = HashMap::new();
        for (name, event) in events {
            assert_eq!(name.as_deref(), event["type"].as_str(), "each event is named after its type");
            let index = event["index"].as_u64().unwrap_or(0) as usize;
            match event["type"].as_str().unwrap() {
                "message_start" => message = event["message"].clone(),
                "content_block_start" => {
                    assert_eq!(index, message["content"].as_array().unwrap().len());
                    message["content"].as_array_mut().unwrap().push(event["content_block"].clone());
                }
                "content_block_delta" => match event["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        let text = format!(
                            "{}{}",
                            message["content"][index]["text"].as_str().unwrap(),
                            event["delta"]["text"].as_str().unwrap()
                        );
                        message["content"][index]["text"] = json!(text);
                    }
                    "input_json_delta" => partial_json
                        .entry(index)
                        .or_default()
                        .push_str(event["delta"]["partial_json"].as_str().unwrap()),
                    other => panic!("unexpected delta {other}"),
                },
                "content_block_stop" => {
                    if message["content"][index]["type"] == "tool_use" {
                        if let Some(json) = partial_json.get(&index) {
                            message["content"][index]["input"] = serde_json::from_str(json).unwrap();
                        }
                    }
                }
                "message_delta" => {
                    message["stop_reason"] = event["delta"]["stop_reason"].clone();
                    message["stop_sequence"] = event["delta"]["stop_sequence"].clone();
                    for (name, count) in event["usage"].as_object().unwrap() {
                        message["usage"][name] = count.clone();
                    }
                }
                "message_stop" | "ping" => {}
                other => panic!("unexpected event {other}: {event}"),
            }
        }
        assert_eq!(events.last().unwrap().0.as_deref(), Some("message_stop"));
        message
    }

    /// A chat stream put together: content, reasoning, tool calls, finish reason and usage.
    fn accumulate_chat(bytes: &[u8]) -> Value {
        let events = events(bytes);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let (mut content, mut reasoning, mut finish, mut usage) =
            (String::new(), String::new(), Value::Null, Value::Null);
        let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
        for (_, chunk) in &events[..events.len() - 1] {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if !chunk["usage"].is_null() {
                assert_eq!(chunk["choices"], json!([]));
                usage = chunk["usage"].clone();
            }
            for choice in chunk["choices"].as_array().unwrap() {
                let delta = &choice["delta"];
                content.push_str(delta["content"].as_str().unwrap_or_default());
                reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
                for call in delta["tool_calls"].as_array().into_iter().flatten() {
                    let entry = calls.entry(call["index"].as_u64().unwrap()).or_default();
                    entry.0.push_str(call["id"].as_str().unwrap_or_default());
                    entry.1.push_str(call["function"]["name"].as_str().unwrap_or_default());
                    entry.2.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
                }
                if !choice["finish_reason"].is_null() {
                    finish = choice["finish_reason"].clone();
                }
            }
        }
        let calls: Vec<Value> =
            calls.into_values().map(|(id, name, arguments)| tool_call_summary(&id, &name, &arguments)).collect();
        json!({"content": content, "reasoning_content": reasoning, "tool_calls": calls,
            "finish_reason": finish, "usage": usage})
    }

    fn tool_call_summary(id: &str, name: &str, arguments: &str) -> Value {
        json!({"id": id, "name": name, "input": serde_json::from_str::<Value>(arguments).unwrap()})
    }

    /// `text` in pieces of `size` characters.
    fn pieces(text: &str, size: usize) -> Vec<String> {
        text.chars().collect::<Vec<_>>().chunks(size.max(1)).map(String::from_iter).collect()
    }

    /// A chat answer streamed as a live backend would: text and arguments in small pieces.
    fn chat_chunks(answer: &Value, size: usize) -> Vec<String> {
        let chunk = |choices: Value| {
            json!({"id": answer["id"], "object": "chat.completion.chunk", "model": answer["model"], "choices": choices})
                .to_string()
        };
        let delta = |delta: Value| chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]));
        let message = &answer["choices"][0]["message"];
        let mut out = vec![delta(json!({"role": "assistant", "content": ""}))];
        out.extend(
            pieces(message["content"].as_str().unwrap_or_default(), size)
                .into_iter()
                .map(|p| delta(json!({"content": p}))),
        );
        for (i, call) in message["tool_calls"].as_array().into_iter().flatten().enumerate() {
            out.push(delta(json!({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]})));
            for piece in pieces(call["function"]["arguments"].as_str().unwrap(), size) {
                out.push(delta(json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})));
            }
        }
        out.push(chunk(json!([{"index": 0, "delta": {}, "finish_reason": answer["choices"][0]["finish_reason"]}])));
        let mut usage: Value = serde_json::from_str(&chunk(json!([]))).unwrap();
        usage["usage"] = answer["usage"].clone();
        out.push(usage.to_string());
        out.push("[DONE]".into());
        out
    }

    /// A Messages answer streamed as Anthropic does, text and JSON in pieces of `size`.
    fn message_events(message: &Value, size: usize, usage_in_delta: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let usage = &message["usage"];
        let mut start = message.clone();
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["usage"]["output_tokens"] = json!(1);
        send(&mut out, json!({"type": "message_start", "message": start}));
        send(&mut out, json!({"type": "ping"}));
        for (index, block) in message["content"].as_array().unwrap().iter().enumerate() {
            let (empty, deltas) = match block["type"].as_str().unwrap() {
                "text" => (
                    json!({"type": "text", "text": ""}),
                    pieces(block["text"].as_str().unwrap(), size)
                        .into_iter()
                        .map(|p| json!({"type": "text_delta", "text": p}))
                        .collect::<Vec<_>>(),
                ),
                "thinking" => (
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    pieces(block["thinking"].as_str().unwrap(), size)
                        .into_iter()
                        .map(|p| json!({"type": "thinking_delta", "thinking": p}))
                        .chain([json!({"type": "signature_delta", "signature": "sig"})])
                        .collect(),
                ),
                _ => {
                    let json = block["input"].to_string();
                    let deltas = std::iter::once(String::new())
                        .chain(pieces(&json, size))
                        .map(|p| json!({"type": "input_json_delta", "partial_json": p}));
                    (
                        json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                        deltas.collect(),
                    )
                }
            };
            send(&mut out, json!({"type": "content_block_start", "index": index, "content_block": empty}));
            for delta in deltas {
                send(&mut out, json!({"type": "content_block_delta", "index": index, "delta": delta}));
            }
            send(&mut out, json!({"type": "content_block_stop", "index": index}));
        }
        let delta_usage = if usage_in_delta { usage.clone() } else { json!({"output_tokens": usage["output_tokens"]}) };
        send(
            &mut out,
            json!({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null},
                "usage": delta_usage}),
        );
        send(&mut out, json!({"type": "message_stop"}));
        out
    }

    fn to_chat(bytes: &[u8]) -> Vec<u8> {
        let mut stream = ToChatStream::new();
        let mut out: Vec<u8> =
            EventReader::default().feed(bytes).iter().flat_map(|e| stream.event(e.name.as_deref(), &e.data)).collect();
        out.extend(stream.finish());
        out
    }

    fn anthropic_usage(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Value {
        json!({"input_tokens": input, "cache_read_input_tokens": cache_read,
            "cache_creation_input_tokens": cache_write, "output_tokens": output})
    }

    fn refused(result: Result<Value, Untranslatable>) -> String {
        result.unwrap_err().param.unwrap()
    }

    #[test]
    fn an_anthropic_answer_prices_cached_tokens_once() {
        let message = json!({"id": "msg_1", "model": "claude", "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn", "usage": anthropic_usage(100, 1000, 200, 50)});
        let chat = backend_answer(&message);
        assert_eq!(
            chat["usage"],
            json!({"prompt_tokens": 1300, "completion_tokens": 50, "total_tokens": 1350,
            "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}})
        );
        let parsed: crate::openai::Usage = serde_json::from_value(chat["usage"].clone()).unwrap();
        assert_eq!((parsed.prompt_tokens, parsed.cached_tokens(), parsed.cache_write_tokens()), (1300, 1000, 200));
        assert_eq!(answer(&chat)["usage"], anthropic_usage(100, 1000, 200, 50));
    }

    #[test]
    fn a_streamed_anthropic_answer_counts_the_input_once_and_the_last_output() {
        let start = json!({"type": "message_start", "message": {"id": "m1", "model": "claude", "content": [],
            "usage": {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
                "output_tokens": 1}}})
        .to_string();
        let stop = r#"{"type":"message_stop"}"#;
        for (delta, prompt) in [(r#"{"output_tokens":50}"#, 1300), (r#"{"output_tokens":50,"input_tokens":120}"#, 1320)]
        {
            let delta = format!(r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn"}},"usage":{delta}}}"#);
            let mut stream = ToChatStream::new();
            let out: Vec<u8> =
                [start.as_str(), &delta, stop].iter().flat_map(|data| stream.event(None, data)).collect();
            let usage = &accumulate_chat(&out)["usage"];
            assert_eq!(
                (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
                (Some(prompt), Some(50))
            );
            assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 1000);
        }
    }

    #[test]
    fn a_chat_stream_becomes_messages_events_with_tool_arguments_in_fragments() {
        let chunk = |choices: &str| format!(r#"{{"id":"chatcmpl-1","model":"backend-m","choices":{choices}}}"#);
        let delta = |delta: &str| chunk(&format!(r#"[{{"index":0,"delta":{delta},"finish_reason":null}}]"#));
        let payloads = vec![
            delta(r#"{"role":"assistant","content":""}"#),
            delta(r#"{"content":"Checking."}"#),
            delta(r#"{"tool_calls":[{"index":0,"id":"call_a","function":{"name":"weather","arguments":""}}]}"#),
            delta(r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}"#),
            delta(r#"{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}"#),
            delta(r#"{"tool_calls":[{"index":1,"id":"call_b","function":{"name":"time","arguments":"{}"}}]}"#),
            chunk(r#"[{"index":0,"delta":{},"finish_reason":"tool_calls"}]"#),
            json!({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 1300, "completion_tokens": 42,
                "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}}})
            .to_string(),
            "[DONE]".into(),
        ];
        let events = from_chat(&mut FromChatStream::new("claude-asked", 1234), &payloads);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 1234);
        assert_eq!(events[0].1["message"]["model"], "backend-m");
        assert_eq!(
            events[5].1["content_block"],
            json!({"type": "tool_use", "id": "call_a", "name": "weather", "input": {}})
        );
        assert_eq!(events[12].1["usage"], anthropic_usage(100, 1000, 200, 42));
        let message = accumulate_messages(&events);
        assert_eq!(message["id"], "msg_chatcmpl-1");
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(
            message["usage"],
            anthropic_usage(100, 1000, 200, 42),
            "the estimate is overwritten, cached tokens not counted twice"
        );
        assert_eq!(
            message["content"],
            json!([{"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "time", "input": {}}])
        );
    }

    #[test]
    fn a_cut_or_failed_chat_stream_ends_in_an_error_never_a_message_stop() {
        let cut = from_chat(
            &mut FromChatStream::new("claude-asked", 7),
            &[r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#.into()],
        );
        assert_eq!(cut[0].1["message"]["model"], "claude-asked");
        assert_eq!(names(&cut).last(), Some(&"error"));
        assert_eq!(cut.last().unwrap().1["error"]["type"], "api_error");
        let failed = from_chat(
            &mut FromChatStream::new("m", 7),
            &[r#"{"error":{"message":"backend down"}}"#.into(), "[DONE]".into()],
        );
        assert_eq!(failed, vec![(Some("error".into()), error_body(500, "backend down"))]);
        let mut clean = FromChatStream::new("m", 7);
        assert!(!clean.event("[DONE]").is_empty());
        assert!(clean.finish().is_empty());
        let interleaved = [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
        ];
        let events = from_chat(&mut FromChatStream::new("m", 7), &interleaved.map(String::from));
        assert_eq!(names(&events).last(), Some(&"error"));
    }

    #[test]
    fn an_anthropic_stream_becomes_chat_chunks_with_tool_calls() {
        let message = json!({"id": "m1", "type": "message", "role": "assistant", "model": "claude",
            "stop_reason": "tool_use",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "usage": anthropic_usage(10, 0, 0, 20)});
        let out = to_chat(&message_events(&message, 3, false));
        let chunks = events(&out);
        assert_eq!(chunks[0].1["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert!(chunks[..chunks.len() - 1].iter().all(|(_, c)| c["id"] == "chatcmpl-m1" && c["model"] == "claude"));
        let first_call = chunks.iter().find(|(_, c)| !c["choices"][0]["delta"]["tool_calls"].is_null()).unwrap();
        assert_eq!(
            first_call.1["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": ""}})
        );
        assert_eq!(
            accumulate_chat(&out),
            json!({"content": "Let me look.", "reasoning_content": "hmm",
            "tool_calls": [{"id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "finish_reason": "tool_calls",
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}})
        );
    }

    #[test]
    fn anthropic_errors_become_openai_errors() {
        let mut stream = ToChatStream::default();
        let out = stream
            .event(Some("error"), r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert_eq!(
            events(&out),
            vec![(
                None,
                json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
            )]
        );
        assert!(stream.event(None, r#"{"type":"message_stop"}"#).is_empty(), "nothing after an error, no [DONE]");
        assert!(stream.finish().is_empty());
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too large"}}"#;
        assert_eq!(
            backend_error(body),
            Some(json!({"error": {"message": "max_tokens: too large", "type": "invalid_request_error",
                    "param": null, "code": null}}))
        );
        assert_eq!(backend_error(b"<html>bad gateway</html>"), None);
        assert_eq!(backend_error(br#"{"error":"nope"}"#), None);
    }

    #[test]
    fn gateway_errors_take_anthropics_shape_by_status() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(
                error_body(status, "why"),
                json!({"type": "error", "error": {"type": kind, "message": "why"}}),
                "{status}"
            );
        }
    }

    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let request = json!({"model": "claude", "max_tokens": 100, "stream": true, "temperature": 0.5,
            "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "thinking": {"type": "disabled"},
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be kind."}],
            "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA="}},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "text", "text": "thanks"},
                    {"type": "tool_result", "tool_use_id": "t1", "is_error": true,
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}]});
        let chat = chat_request(&request).unwrap();
        assert_eq!(
            chat,
            json!({"model": "claude", "max_tokens": 100, "stream": true, "stream_options": {"include_usage": true},
            "temperature": 0.5, "stop": ["END"], "user": "u1",
            "tools": [{"type": "function",
                "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "messages": [
                {"role": "system", "content": "Be brief.\n\nBe kind."},
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "a\nb"},
                {"role": "user", "content": [{"type": "text", "text": "thanks"}]}]})
        );
    }

    #[test]
    fn what_a_chat_request_cannot_say_is_refused_by_name() {
        let base = || json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        let with = |name: &str, value: Value| {
            let mut request = base();
            request[name] = value;
            request
        };
        assert_eq!(refused(chat_request(&with("top_k", json!(5)))), "top_k");
        assert_eq!(
            refused(chat_request(&with("thinking", json!({"type": "enabled", "budget_tokens": 2000})))),
            "thinking"
        );
        assert_eq!(refused(chat_request(&with("service_tier", json!("auto")))), "service_tier");
        assert_eq!(
            refused(chat_request(&with("tools", json!([{"type": "web_search_20250305", "name": "web_search"}])))),
            "tools[0]"
        );
        let mut missing = base();
        missing.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(chat_request(&missing).unwrap_err(), Untranslatable::new("`max_tokens` is required", "max_tokens"));
        let document = json!([{"role": "user", "content": [{"type": "text", "text": "read"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]);
        assert_eq!(refused(chat_request(&with("messages", document))), "messages[0].content[1]");
        let thinking = json!([{"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}]}]);
        assert_eq!(refused(chat_request(&with("messages", thinking))), "messages[1].content[0]");
        let image_result = json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
            "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]}]}]);
        assert_eq!(refused(chat_request(&with("messages", image_result))), "messages[0].content[0].content[0]");
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let chat = json!({"model": "claude", "max_completion_tokens": 300, "max_tokens": 500, "stop": "END",
            "user": "u1", "stream": true, "stream_options": {"include_usage": true}, "n": 1, "temperature": 1,
            "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
                {"role": "user", "content": "thanks"}]});
        let request = backend_request(&chat, 4096).unwrap();
        assert_eq!(
            request,
            json!({"model": "claude", "max_tokens": 300, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
            "stream": true, "temperature": 1, "system": "Be brief.\n\nBe kind.",
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    {"type": "text", "text": "and?"}]},
                {"role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {"type": "text", "text": "thanks"}]}]})
        );
        let short = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(backend_request(&short, 4096).unwrap()["max_tokens"], 4096);
    }

    #[test]
    fn what_messages_cannot_say_is_refused_by_name() {
        let with = |name: &str, value: Value| {
            let mut chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            chat[name] = value;
            backend_request(&chat, 100)
        };
        for (name, value) in [
            ("n", json!(2)),
            ("temperature", json!(1.5)),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("response_format", json!({"type": "json_object"})),
            ("seed", json!(7)),
            ("frequency_penalty", json!(0.5)),
            ("presence_penalty", json!(-1)),
            ("logit_bias", json!({"50256": -100})),
            ("reasoning_effort", json!("high")),
            ("audio", json!({"voice": "alloy"})),
            ("modalities", json!(["text", "audio"])),
            ("functions", json!([])),
        ] {
            assert_eq!(refused(with(name, value)), name);
        }
        for (name, value) in [
            ("n", json!(1)),
            ("logprobs", json!(false)),
            ("frequency_penalty", json!(0)),
            ("response_format", json!({"type": "text"})),
            ("seed", Value::Null),
            ("stream_options", json!({"include_usage": true})),
        ] {
            assert!(with(name, value).is_ok(), "{name}");
        }
        let bad_arguments = json!([{"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
            "function": {"name": "f", "arguments": "[1]"}}]}]);
        assert_eq!(refused(with("messages", bad_arguments)), "messages[1].tool_calls[0].function.arguments");
        let audio = json!([{"role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]);
        assert_eq!(refused(with("messages", audio)), "messages[0].content[0]");
        let ftp = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]);
        assert_eq!(refused(with("messages", ftp)), "messages[0].content[0].image_url.url");
        assert_eq!(
            refused(with("messages", json!([{"role": "user", "name": "bob", "content": "hi"}]))),
            "messages[0].name"
        );
    }

    #[test]
    fn answers_translate_both_ways() {
        let message = json!({"id": "m1", "model": "claude", "stop_reason": "tool_use",
            "usage": anthropic_usage(1, 2, 3, 4),
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]});
        let chat = backend_answer(&message);
        assert_eq!((chat["id"].as_str(), chat["object"].as_str()), (Some("chatcmpl-m1"), Some("chat.completion")));
        assert_eq!(
            chat["choices"][0]["message"],
            json!({"role": "assistant", "content": null, "reasoning_content": "hmm",
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]})
        );
        assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            assert_eq!(backend_answer(&json!({"stop_reason": stop}))["choices"][0]["finish_reason"], finish);
            assert_eq!(backend_answer(&json!({"stop_reason": stop}))["choices"][0]["message"]["content"], "");
        }
        let chat = json!({"id": "c1", "model": "gpt", "choices": [{"message": {"content": "", "tool_calls": [
            {"id": "t1", "function": {"name": "f", "arguments": "not json"}}]}, "finish_reason": "tool_calls"}]});
        assert_eq!(answer(&chat)["content"], json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]));
        for (finish, stop) in [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")] {
            assert_eq!(answer(&json!({"choices": [{"finish_reason": finish}]}))["stop_reason"], stop);
        }
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 é😀\n]{1,24}"
    }

    fn tool_input() -> impl Strategy<Value = Value> {
        proptest::collection::btree_map(
            "[a-z]{1,6}",
            prop_oneof![any::<i32>().prop_map(Value::from), text().prop_map(Value::from)],
            0..3,
        )
        .prop_map(|map| Value::Object(map.into_iter().collect()))
    }

    /// Anthropic usage with arbitrary counts.
    fn usage() -> impl Strategy<Value = Value> {
        (0u64..1 << 40, 0u64..1 << 40, 0u64..1 << 40, 0u64..1 << 40)
            .prop_map(|(a, b, c, d)| anthropic_usage(a, b, c, d))
    }

    /// A Messages request as a client writes one: user turns answer the previous turn's tool uses first.
    fn messages_request() -> impl Strategy<Value = Value> {
        let turn =
            (proptest::collection::vec(text(), 1..3), proptest::collection::vec(tool_input(), 0..3), any::<bool>());
        let options = (
            1u64..100_000,
            proptest::collection::vec(text(), 0..3),
            proptest::option::of(0u8..=10),
            any::<bool>(),
            0usize..5,
            any::<bool>(),
        );
        (
            proptest::option::of(proptest::collection::vec(text(), 1..3)),
            proptest::collection::vec(turn, 1..6),
            0usize..3,
            options,
        )
            .prop_map(
                |(system, turns, tool_count, (max_tokens, stop, temperature, stream, choice, single))| {
                    let mut messages = Vec::new();
                    let mut pending_results = Vec::new();
                    for (i, (texts, inputs, plain)) in turns.into_iter().enumerate() {
                        if i % 2 == 0 {
                            let mut content: Vec<Value> = std::mem::take(&mut pending_results);
                            if content.is_empty() && plain {
                                messages.push(json!({"role": "user", "content": texts[0]}));
                                continue;
                            }
                            content.extend(texts.iter().map(|t| json!({"type": "text", "text": t})));
                            messages.push(json!({"role": "user", "content": content}));
                        } else {
                            let mut content = Vec::new();
                            if plain || inputs.is_empty() {
                                content.push(json!({"type": "text", "text": texts[0]}));
                            }
                            for (k, input) in inputs.into_iter().enumerate() {
                                let id = format!("toolu_{i}_{k}");
                                pending_results.push(
                                    json!({"type": "tool_result", "tool_use_id": id, "content": texts.join("|")}),
                                );
                                content.push(
                                    json!({"type": "tool_use", "id": id, "name": format!("tool_{k}"), "input": input}),
                                );
                            }
                            messages.push(json!({"role": "assistant", "content": content}));
                        }
                    }
                    let mut request =
                        json!({"model": "claude", "max_tokens": max_tokens, "messages": messages, "stream": stream});
                    if let Some(system) = system {
                        request["system"] = if system.len() == 1 {
                            json!(system[0])
                        } else {
                            json!(system.iter().map(|t| json!({"type": "text", "text": t})).collect::<Vec<_>>())
                        };
                    }
                    if !stop.is_empty() {
                        request["stop_sequences"] = json!(stop);
                    }
                    if let Some(t) = temperature {
                        request["temperature"] = json!(f64::from(t) / 10.0);
                    }
                    if tool_count > 0 {
                        request["tools"] = json!((0..tool_count)
                            .map(|k| json!({"name": format!("tool_{k}"), "description": "does things",
                        "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}))
                            .collect::<Vec<_>>());
                        let mut tool_choice = [
                            json!({"type": "auto"}),
                            json!({"type": "any"}),
                            json!({"type": "tool", "name": "tool_0"}),
                        ]
                        .get(choice)
                        .cloned();
                        if let (Some(tool_choice), true) = (&mut tool_choice, single) {
                            tool_choice["disable_parallel_tool_use"] = json!(true);
                        }
                        if let Some(tool_choice) = tool_choice {
                            request["tool_choice"] = tool_choice;
                        }
                    }
                    request
                },
            )
    }

    /// The same request as Messages would read it: a string as one text block, system blocks as
    /// their text joined.
    fn normalized(request: &Value) -> Value {
        let mut request = request.clone();
        if let Some(blocks) = request["system"].as_array() {
            request["system"] =
                json!(blocks.iter().map(|b| b["text"].as_str().unwrap()).collect::<Vec<_>>().join("\n\n"));
        }
        for message in request["messages"].as_array_mut().unwrap() {
            if let Some(text) = message["content"].as_str() {
                message["content"] = json!([{"type": "text", "text": text}]);
            }
        }
        request
    }

    fn chat_answer() -> impl Strategy<Value = Value> {
        let calls = proptest::collection::vec(("[a-z_]{1,8}", tool_input()), 0..3);
        let finish = prop_oneof![Just("stop"), Just("length"), Just("tool_calls"), Just("content_filter")];
        let tokens = (0u64..1 << 40, any::<u64>(), any::<u64>(), 0u64..1 << 40);
        (proptest::option::of(text()), calls, finish, tokens).prop_map(
            |(content, calls, finish, (prompt, read, write, completion))| {
                let cached = read % (prompt + 1);
                let written = write % (prompt - cached + 1);
                let mut message = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    let calls = calls.iter().enumerate().map(|(i, (name, input))| {
                        json!({"id": format!("call_{i}"), "type": "function",
                            "function": {"name": name, "arguments": input.to_string()}})
                    });
                    message["tool_calls"] = Value::Array(calls.collect());
                }
                json!({"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "backend-model",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}}})
            },
        )
    }

    fn messages_answer() -> impl Strategy<Value = Value> {
        let block = prop_oneof![
            text().prop_map(|t| json!({"type": "text", "text": t})),
            ("[a-z_]{1,8}", tool_input())
                .prop_map(|(name, input)| json!({"type": "tool_use", "name": name, "input": input})),
        ];
        let stop = prop_oneof![
            Just("end_turn"),
            Just("max_tokens"),
            Just("stop_sequence"),
            Just("tool_use"),
            Just("refusal"),
            Just("pause_turn")
        ];
        (proptest::option::of(text()), proptest::collection::vec(block, 0..4), stop, usage()).prop_map(
            |(thinking, blocks, stop, usage)| {
                let mut content: Vec<Value> = thinking
                    .into_iter()
                    .map(|t| json!({"type": "thinking", "thinking": t, "signature": "s"}))
                    .collect();
                content.extend(blocks.into_iter().enumerate().map(|(i, mut block)| {
                    if block["type"] == "tool_use" {
                        block["id"] = json!(format!("toolu_{i}"));
                    }
                    block
                }));
                json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": content,
                "stop_reason": stop, "stop_sequence": null, "usage": usage})
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_messages_request_survives_the_trip_through_chat(request in messages_request()) {
            let chat = chat_request(&request).unwrap();
            prop_assert_eq!(backend_request(&chat, 1).unwrap(), normalized(&request));
        }

        #[test]
        fn a_streamed_chat_answer_reads_as_the_whole_one(
            chat in chat_answer(),
            size in 1usize..8,
            split in any::<prop::sample::Index>(),
            estimate in 0u64..1000,
        ) {
            let expected = answer(&chat);
            let live = from_chat(&mut FromChatStream::new("asked", estimate), &chat_chunks(&chat, size));
            prop_assert_eq!(accumulate_messages(&live), expected.clone());
            // A cache hit's replay, cut anywhere.
            let bytes = serde_json::to_vec(&chat).unwrap();
            let replayed = crate::cache::replay::sse(crate::request::Endpoint::ChatCompletions, &bytes, true).unwrap();
            let at = split.index(replayed.len());
            let mut reader = EventReader::default();
            let mut replay_events = reader.feed(&replayed[..at]);
            replay_events.extend(reader.feed(&replayed[at..]));
            let payloads: Vec<String> = replay_events.into_iter().map(|e| e.data).collect();
            let replay = from_chat(&mut FromChatStream::new("asked", estimate), &payloads);
            prop_assert_eq!(accumulate_messages(&replay), expected);
        }

        #[test]
        fn a_streamed_messages_answer_reads_as_the_whole_one(
            message in messages_answer(),
            size in 1usize..8,
            usage_in_delta in any::<bool>(),
        ) {
            let expected = backend_answer(&message);
            let reply = &expected["choices"][0]["message"];
            let calls: Vec<Value> = reply["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let function = &c["function"];
                    let text = |v: &Value| v.as_str().unwrap().to_owned();
                    tool_call_summary(&text(&c["id"]), &text(&function["name"]), &text(&function["arguments"]))
                })
                .collect();
            let assembled = accumulate_chat(&to_chat(&message_events(&message, size, usage_in_delta)));
            prop_assert_eq!(assembled, json!({
                "content": reply["content"].as_str().unwrap_or_default(),
                "reasoning_content": reply["reasoning_content"].as_str().unwrap_or_default(),
                "tool_calls": calls,
                "finish_reason": expected["choices"][0]["finish_reason"],
                "usage": expected["usage"],
            }));
        }

        #[test]
        fn usage_survives_the_trip_both_ways(usage in usage()) {
            let chat = backend_answer(&json!({"usage": usage}));
            prop_assert_eq!(&answer(&chat)["usage"], &usage);
            // And streamed: Anthropic → chat → Anthropic.
            let mut to_chat = ToChatStream::new();
            let anthropic = [
                json!({"type": "message_start", "message": {"id": "m", "usage": usage}}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": usage["output_tokens"]}}),
                json!({"type": "message_stop"}),
            ];
            let chat_stream: Vec<u8> = anthropic.iter().flat_map(|e| to_chat.event(None, &e.to_string())).collect();
            let payloads: Vec<String> = EventReader::default().feed(&chat_stream).into_iter().map(|e| e.data).collect();
            let back = from_chat(&mut FromChatStream::new("m", 0), &payloads);
            prop_assert_eq!(&accumulate_messages(&back)["usage"], &usage);
        }
    }
}
