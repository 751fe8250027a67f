//! The OpenAI Responses API (`POST /v1/responses`) over chat completions: a stateless request
//! becomes a chat request, and the chat answer, whole or streamed, a Response object or the
//! Responses event stream.
//!
//! Translated: `model`; `instructions` (a first system message); `input`, a string or a list
//! of items: messages (roles user, system, developer, assistant; text, image URL and refusal
//! parts), `function_call` items (assistant tool calls, consecutive ones in one message) and
//! `function_call_output` items (tool messages); `max_output_tokens` (`max_completion_tokens`);
//! `temperature`; `top_p`; `parallel_tool_calls`; `user` (or else `safety_identifier`); function
//! `tools`; `tool_choice` (`auto`, `none`, `required`, one function); `text.format` (text, JSON
//! object, JSON schema); `text.verbosity`; `reasoning.effort`; `stream`.
//!
//! Refused, naming the field: what needs a response or conversation stored server-side, as this
//! gateway keeps none (`previous_response_id`, `conversation`, `prompt`, `store: true`,
//! `background: true`, `item_reference` items, reasoning items with `encrypted_content`); what
//! a chat completion cannot express (non-empty `include`, `max_tool_calls`, `top_logprobs`,
//! `truncation: "auto"`, `reasoning.summary`, built-in tools and their call items, file and
//! audio inputs, `file_id` images, `detail: "original"`, images outside user messages, non-text
//! tool outputs, other `tool_choice`s); any member not named in this comment.
//!
//! Ignored, as they do not change the answer: `store: false`, `metadata` (echoed in the Response
//! only), `service_tier`, `truncation: "disabled"`, `stream_options`, `prompt_cache_key`,
//! `prompt_cache_retention`; items' `id`, `status` and `phase`; parts' `annotations`,
//! `logprobs` and `prompt_cache_breakpoint`; reasoning items without `encrypted_content`
//! (earlier turns' reasoning, which a chat completion never takes back: refusing them would
//! refuse every agent that sends our own output back as its next input).
//!
//! Ids derive from the chat completion's: `resp_{id}`, and `{rs|msg|fc}_{id}_{output index}`
//! for the items, so that a stream ends with the very Response its whole answer makes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{write_event, Untranslatable};

/// A Responses request body as the chat request to route (`stream_options.include_usage: true`
/// when streamed, so usage reaches the translator).
pub fn chat_request(request: &Value) -> Result<Value, Untranslatable> {
    let Some(fields) = request.as_object() else {
        return Err(Untranslatable { message: "the request body must be a JSON object".into(), param: None });
    };
    let mut chat = Map::new();
    for (name, value) in fields.iter().filter(|(_, value)| !value.is_null()) {
        match name.as_str() {
            // Read below, in the order the messages need.
            "model" | "instructions" | "input" | "tools" | "tool_choice" | "text" | "reasoning" | "user"
            | "safety_identifier" | "stream" => {}
            "metadata" | "service_tier" | "stream_options" | "prompt_cache_key" | "prompt_cache_retention" => {}
            "max_output_tokens" | "temperature" | "top_p" | "parallel_tool_calls" => {
                let name = if name == "max_output_tokens" { "max_completion_tokens" } else { name };
                chat.insert(name.into(), value.clone());
            }
            "store" | "background" if *value == Value::Bool(false) => {}
            "truncation" if *value == "disabled" => {}
            "include" if value.as_array().is_some_and(Vec::is_empty) => {}
            "previous_response_id" | "conversation" | "prompt" | "store" | "background" => return Err(stateful(name)),
            "include" | "max_tool_calls" | "top_logprobs" | "truncation" => {
                return refuse(format!("`{name}` cannot be expressed in a chat completion"), name.as_str());
            }
            _ => return refuse(format!("unknown request member `{name}`"), name.as_str()),
        }
    }
    let Some(model) = fields.get("model").filter(|model| model.is_string()) else {
        return refuse("`model` is required and must be a string", "model");
    };
    chat.insert("model".into(), model.clone());
    let mut messages = Vec::new();
    match fields.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(_) => return refuse("`instructions` must be a string", "instructions"),
    }
    match fields.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                push_item(&mut messages, item, &format!("input[{i}]"))?;
            }
        }
        _ => return refuse("`input` is required: a string or a list of items", "input"),
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = present(fields, "tools") {
        let Some(tools) = tools.as_array() else { return refuse("`tools` must be a list", "tools") };
        let tools = tools.iter().enumerate().map(|(i, tool)| chat_tool(tool, &format!("tools[{i}]")));
        chat.insert("tools".into(), Value::Array(tools.collect::<Result<_, _>>()?));
    }
    if let Some(choice) = present(fields, "tool_choice") {
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if let Some(text) = present(fields, "text") {
        text_config(object(text, "text")?, &mut chat)?;
    }
    if let Some(reasoning) = present(fields, "reasoning") {
        let reasoning = object(reasoning, "reasoning")?;
        if let Some(summary) =
            ["summary", "generate_summary"].into_iter().find(|name| present(reasoning, name).is_some())
        {
            return refuse("reasoning summaries cannot come from a chat completion", format!("reasoning.{summary}"));
        }
        only_members(reasoning, &["effort"], "reasoning")?;
        if let Some(effort) = present(reasoning, "effort") {
            chat.insert("reasoning_effort".into(), effort.clone());
        }
    }
    if let Some(user) = present(fields, "user").or_else(|| present(fields, "safety_identifier")) {
        chat.insert("user".into(), user.clone());
    }
    if present(fields, "stream") == Some(&Value::Bool(true)) {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(chat))
}

fn refuse<T>(message: impl Into<String>, param: impl Into<String>) -> Result<T, Untranslatable> {
    Err(Untranslatable::new(message, param))
}

fn stateful(name: &str) -> Untranslatable {
    let message = format!(
        "`{name}` needs state this gateway does not keep: it stores no responses or conversations and serves \
         stateless requests only, so send the whole conversation in `input`"
    );
    Untranslatable::new(message, name)
}

/// A member that is there and not null.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|value| !value.is_null())
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, Untranslatable> {
    value.as_object().ok_or_else(|| Untranslatable::new(format!("`{path}` must be an object"), path))
}

fn required_str<'a>(fields: &'a Map<String, Value>, name: &str, path: &str) -> Result<&'a str, Untranslatable> {
    let param = format!("{path}.{name}");
    fields
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Untranslatable::new(format!("`{param}` must be a string"), param))
}

/// Refuses any member besides `type` and `allowed`, which would otherwise be dropped unread.
fn only_members(fields: &Map<String, Value>, allowed: &[&str], path: &str) -> Result<(), Untranslatable> {
    match fields.iter().find(|(name, value)| !value.is_null() && *name != "type" && !allowed.contains(&name.as_str())) {
        Some((name, _)) => {
            refuse(format!("`{name}` cannot be translated to a chat completion"), format!("{path}.{name}"))
        }
        None => Ok(()),
    }
}

/// Appends one input item to the chat messages.
fn push_item(messages: &mut Vec<Value>, item: &Value, path: &str) -> Result<(), Untranslatable> {
    let fields = object(item, path)?;
    let kind = match fields.get("type") {
        None | Some(Value::Null) => "message",
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return refuse("an item's `type` must be a string", format!("{path}.type")),
    };
    match kind {
        "message" => messages.push(chat_message(fields, path)?),
        "function_call" => {
            only_members(fields, &["call_id", "name", "arguments", "id", "status"], path)?;
            let function = json!({"name": required_str(fields, "name", path)?,
                "arguments": required_str(fields, "arguments", path)?});
            let call = json!({"id": required_str(fields, "call_id", path)?, "type": "function", "function": function});
            // A chat completion carries an assistant turn's text and all its calls in one message.
            match messages.last_mut().and_then(Value::as_object_mut) {
                Some(last) if last.get("role").is_some_and(|role| role == "assistant") => {
                    if let Value::Array(calls) = last.entry("tool_calls").or_insert_with(|| json!([])) {
                        calls.push(call);
                    }
                }
                _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            only_members(fields, &["call_id", "output", "id", "status"], path)?;
            let call_id = required_str(fields, "call_id", path)?;
            let content = match fields.get("output") {
                Some(Value::String(text)) => Value::String(text.clone()),
                Some(Value::Array(parts)) => Value::Array(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(j, part)| match chat_part(part, &format!("{path}.output[{j}]"))? {
                            part if part["type"] == "text" => Ok(part),
                            _ => refuse(
                                "a chat completion takes only text as a tool's output",
                                format!("{path}.output[{j}].type"),
                            ),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                _ => return refuse("`output` must be a string or a list of parts", format!("{path}.output")),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
        }
        "reasoning" if present(fields, "encrypted_content").is_none() => {}
        "reasoning" => {
            return refuse("encrypted reasoning can be read only by its author", format!("{path}.encrypted_content"))
        }
        "item_reference" => return Err(stateful(&format!("{path}.type"))),
        other => {
            let message = format!("`{other}` items cannot be translated: only messages, function calls and outputs");
            return refuse(message, format!("{path}.type"));
        }
    }
    Ok(())
}

fn chat_message(fields: &Map<String, Value>, path: &str) -> Result<Value, Untranslatable> {
    only_members(fields, &["role", "content", "id", "status", "phase"], path)?;
    let role = required_str(fields, "role", path)?;
    if !matches!(role, "user" | "system" | "developer" | "assistant") {
        return refuse(format!("unknown role `{role}`"), format!("{path}.role"));
    }
    let parts = match fields.get("content") {
        Some(Value::String(text)) => return Ok(json!({"role": role, "content": text})),
        Some(Value::Array(parts)) => parts,
        _ => return refuse("`content` must be a string or a list of parts", format!("{path}.content")),
    };
    let parts = parts.iter().enumerate().map(|(j, part)| chat_part(part, &format!("{path}.content[{j}]")));
    let parts: Vec<Value> = parts.collect::<Result<_, _>>()?;
    if role == "user" {
        return Ok(json!({"role": role, "content": parts}));
    }
    // Other roles take text alone, and some backends only as one string.
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let Some(part) = part.get("text").and_then(Value::as_str) else {
            return refuse("images can be sent only in user messages", format!("{path}.content[{j}].type"));
        };
        text.push_str(part);
    }
    Ok(json!({"role": role, "content": text}))
}

fn chat_part(part: &Value, path: &str) -> Result<Value, Untranslatable> {
    let fields = object(part, path)?;
    match required_str(fields, "type", path)? {
        "input_text" | "output_text" => {
            only_members(fields, &["text", "annotations", "logprobs", "prompt_cache_breakpoint"], path)?;
            Ok(json!({"type": "text", "text": required_str(fields, "text", path)?}))
        }
        "refusal" => {
            only_members(fields, &["refusal"], path)?;
            Ok(json!({"type": "text", "text": required_str(fields, "refusal", path)?}))
        }
        "input_image" => {
            only_members(fields, &["image_url", "detail", "file_id", "prompt_cache_breakpoint"], path)?;
            if present(fields, "file_id").is_some() {
                let message = "this gateway keeps no uploaded files: send the image's URL or data URI in `image_url`";
                return refuse(message, format!("{path}.file_id"));
            }
            let mut image = json!({"url": required_str(fields, "image_url", path)?});
            match present(fields, "detail") {
                None => {}
                Some(detail) if ["auto", "low", "high"].iter().any(|level| detail == level) => {
                    image["detail"] = detail.clone();
                }
                Some(_) => {
                    return refuse("a chat completion takes image detail auto, low or high", format!("{path}.detail"))
                }
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        other => refuse(format!("`{other}` parts cannot be sent in a chat completion"), format!("{path}.type")),
    }
}

fn chat_tool(tool: &Value, path: &str) -> Result<Value, Untranslatable> {
    let fields = object(tool, path)?;
    let kind = required_str(fields, "type", path)?;
    if kind != "function" {
        let message =
            format!("`{kind}` is a built-in tool this gateway does not run: only function tools are translated");
        return refuse(message, format!("{path}.type"));
    }
    only_members(fields, &["name", "description", "parameters", "strict"], path)?;
    let mut function = Map::new();
    function.insert("name".into(), required_str(fields, "name", path)?.into());
    copy_present(fields, &["description", "parameters", "strict"], &mut function);
    Ok(json!({"type": "function", "function": function}))
}

fn copy_present(from: &Map<String, Value>, names: &[&str], to: &mut Map<String, Value>) {
    for &name in names {
        if let Some(value) = present(from, name) {
            to.insert(name.into(), value.clone());
        }
    }
}

fn chat_tool_choice(choice: &Value) -> Result<Value, Untranslatable> {
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => Ok(choice.clone()),
        Value::Object(fields) if fields.get("type").is_some_and(|kind| kind == "function") => {
            only_members(fields, &["name"], "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": required_str(fields, "name", "tool_choice")?}}))
        }
        _ => refuse("`tool_choice` can be `auto`, `none`, `required` or one function", "tool_choice"),
    }
}

fn text_config(text: &Map<String, Value>, chat: &mut Map<String, Value>) -> Result<(), Untranslatable> {
    only_members(text, &["format", "verbosity"], "text")?;
    copy_present(text, &["verbosity"], chat);
    let Some(format) = present(text, "format") else { return Ok(()) };
    let format = object(format, "text.format")?;
    let response_format = match required_str(format, "type", "text.format")? {
        "text" => return only_members(format, &[], "text.format"),
        "json_object" => {
            only_members(format, &[], "text.format")?;
            json!({"type": "json_object"})
        }
        "json_schema" => {
            only_members(format, &["name", "schema", "strict", "description"], "text.format")?;
            let mut schema = Map::new();
            schema.insert("name".into(), required_str(format, "name", "text.format")?.into());
            if present(format, "schema").is_none() {
                return refuse("`text.format.schema` is required", "text.format.schema");
            }
            copy_present(format, &["schema", "strict", "description"], &mut schema);
            json!({"type": "json_schema", "json_schema": schema})
        }
        other => return refuse(format!("unknown text format `{other}`"), "text.format.type"),
    };
    chat.insert("response_format".into(), response_format);
    Ok(())
}

/// A chat completion answer as a Response object. `request`: the client's Responses request
/// (echoed fields: instructions, tools, tool_choice, temperature, top_p, max_output_tokens,
/// text, metadata, parallel_tool_calls, user...).
pub fn answer(chat: &Value, request: &Value) -> Value {
    let head = Head::of(chat, request);
    if let Some(error) = chat.get("error").filter(|error| !error.is_null()) {
        return response_object(request, &head, &Status::Failed(failure(error)), &[], None);
    }
    let choice = chat.get("choices").and_then(|choices| choices.get(0));
    let message = choice.and_then(|choice| choice.get("message"));
    let items = message.map(|message| items_of(message, &head.chat_id)).unwrap_or_default();
    let status = Status::of(choice.and_then(|choice| choice.get("finish_reason")).and_then(Value::as_str));
    response_object(request, &head, &status, &items, chat.get("usage"))
}

/// What names a Response: the chat completion's id, time and model, or stand-ins.
struct Head {
    chat_id: String,
    created: Value,
    model: Value,
}

impl Head {
    fn of(chat: &Value, request: &Value) -> Self {
        let chat_id = chat.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
        let now = || SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let model = chat.get("model").filter(|model| model.is_string()).or_else(|| request.get("model"));
        Self {
            chat_id: chat_id.map_or_else(fresh_id, str::to_owned),
            created: chat.get("created").filter(|created| created.is_number()).cloned().unwrap_or_else(|| now().into()),
            model: model.cloned().unwrap_or(Value::Null),
        }
    }
}

/// An id unique within this process, and across its restarts by the clock.
fn fresh_id() -> String {
    static ISSUED: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    format!("gw{nanos:x}{:x}", ISSUED.fetch_add(1, Ordering::Relaxed))
}

enum Status {
    InProgress,
    Completed,
    Incomplete(&'static str),
    Failed(Value),
}

impl Status {
    fn of(finish_reason: Option<&str>) -> Self {
        match finish_reason {
            Some("length") => Self::Incomplete("max_output_tokens"),
            Some("content_filter") => Self::Incomplete("content_filter"),
            _ => Self::Completed,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete(_) => "incomplete",
            Self::Failed(_) => "failed",
        }
    }

    /// The status of the output item still being written when the response ended.
    fn last_item(&self) -> &'static str {
        match self {
            Self::InProgress | Self::Completed => "completed",
            Self::Incomplete(_) | Self::Failed(_) => "incomplete",
        }
    }
}

/// A chat error (`{"message", "type", "code"}`) as a Response's, whose `code` is one of a set.
fn failure(error: &Value) -> Value {
    let said = |member: &str| error.get(member).and_then(Value::as_str);
    let code = [said("code"), said("type")].into_iter().flatten().find_map(|said| match said {
        "rate_limit_exceeded" | "rate_limit_error" => Some("rate_limit_exceeded"),
        "invalid_prompt" => Some("invalid_prompt"),
        _ => None,
    });
    let message = error.as_str().or_else(|| said("message")).unwrap_or("the upstream failed");
    json!({"code": code.unwrap_or("server_error"), "message": message})
}

/// Chat usage as Responses': `prompt_tokens` already counts the cached ones.
fn usage(chat_usage: Option<&Value>) -> Value {
    let Some(chat_usage) = chat_usage.filter(|usage| usage.is_object()) else { return Value::Null };
    let count = |pointer: &str| chat_usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (count("/prompt_tokens"), count("/completion_tokens"));
    let cached = count("/prompt_tokens_details/cached_tokens").min(input);
    // Our own member, for an Anthropic backend's cache writes; the SDK's type requires it.
    let written = count("/prompt_tokens_details/cache_write_tokens").min(input - cached);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": count("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": input + output,
    })
}

/// The Response with the request's settings echoed, each with the API's default.
fn response_object(request: &Value, head: &Head, status: &Status, items: &[Item], chat_usage: Option<&Value>) -> Value {
    let sent = |name: &str| request.get(name).filter(|value| !value.is_null());
    let echoed = |name: &str, default: Value| sent(name).cloned().unwrap_or(default);
    let mut text = sent("text").and_then(Value::as_object).cloned().unwrap_or_default();
    if present(&text, "format").is_none() {
        text.insert("format".into(), json!({"type": "text"}));
    }
    let (error, incomplete_details) = match status {
        Status::Failed(error) => (error.clone(), Value::Null),
        Status::Incomplete(reason) => (Value::Null, json!({"reason": reason})),
        Status::InProgress | Status::Completed => (Value::Null, Value::Null),
    };
    let last = items.len().saturating_sub(1);
    let output: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(index, item)| item.json(if index == last { status.last_item() } else { "completed" }))
        .collect();
    let mut response = json!({
        "id": format!("resp_{}", head.chat_id), "object": "response", "created_at": head.created,
        "status": status.name(), "error": error, "incomplete_details": incomplete_details, "model": head.model,
        "output": output, "usage": usage(chat_usage),
        "instructions": echoed("instructions", Value::Null),
        "max_output_tokens": echoed("max_output_tokens", Value::Null),
        "metadata": echoed("metadata", json!({})), "parallel_tool_calls": echoed("parallel_tool_calls", json!(true)),
        "previous_response_id": null, "store": false, "background": false, "truncation": "disabled",
        "reasoning": {"effort": request.pointer("/reasoning/effort").cloned().unwrap_or(Value::Null), "summary": null},
        "temperature": echoed("temperature", Value::Null), "top_p": echoed("top_p", Value::Null), "text": text,
        "tool_choice": echoed("tool_choice", json!("auto")), "tools": echoed("tools", json!([])),
    });
    for name in ["user", "safety_identifier"] {
        if let Some(value) = sent(name) {
            response[name] = value.clone();
        }
    }
    response
}

/// One output item of a Response, as far as it has been written.
struct Item {
    id: String,
    kind: ItemKind,
    /// A reasoning item's or a message's content.
    parts: Vec<Part>,
}

#[derive(PartialEq)]
enum ItemKind {
    Reasoning,
    Message,
    FunctionCall { call_id: String, name: String, arguments: String },
}

#[derive(Clone, Copy, PartialEq)]
enum PartKind {
    ReasoningText,
    OutputText,
    Refusal,
}

struct Part {
    kind: PartKind,
    text: String,
}

impl PartKind {
    /// The part's member holding its text, and the names of the events streaming it.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::ReasoningText => ("text", "response.reasoning_text.delta", "response.reasoning_text.done"),
            Self::OutputText => ("text", "response.output_text.delta", "response.output_text.done"),
            Self::Refusal => ("refusal", "response.refusal.delta", "response.refusal.done"),
        }
    }
}

impl Part {
    fn json(&self) -> Value {
        match self.kind {
            PartKind::ReasoningText => json!({"type": "reasoning_text", "text": self.text}),
            PartKind::OutputText => {
                json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
            }
            PartKind::Refusal => json!({"type": "refusal", "refusal": self.text}),
        }
    }
}

impl Item {
    /// The item at `output_index` of the Response made from chat completion `chat_id`.
    fn new(kind: ItemKind, parts: Vec<Part>, chat_id: &str, output_index: usize) -> Self {
        let prefix = match kind {
            ItemKind::Reasoning => "rs",
            ItemKind::Message => "msg",
            ItemKind::FunctionCall { .. } => "fc",
        };
        Self { id: format!("{prefix}_{chat_id}_{output_index}"), kind, parts }
    }

    fn json(&self, status: &str) -> Value {
        let content: Vec<Value> = self.parts.iter().map(Part::json).collect();
        match &self.kind {
            ItemKind::Reasoning => {
                json!({"type": "reasoning", "id": self.id, "summary": [], "content": content, "status": status})
            }
            ItemKind::Message => {
                json!({"type": "message", "id": self.id, "status": status, "role": "assistant", "content": content})
            }
            ItemKind::FunctionCall { call_id, name, arguments } => json!({"type": "function_call", "id": self.id,
                "call_id": call_id, "name": name, "arguments": arguments, "status": status}),
        }
    }

    /// The events ending this item's last part, the one still being written.
    fn last_part_done(&self, output_index: usize) -> Vec<(&'static str, Value)> {
        let Some(part) = self.parts.last() else { return Vec::new() };
        let at = json!({"item_id": self.id, "output_index": output_index, "content_index": self.parts.len() - 1});
        let (member, _, done_name) = part.kind.names();
        let mut done = at.clone();
        done[member] = part.text.as_str().into();
        if part.kind == PartKind::OutputText {
            done["logprobs"] = json!([]);
        }
        let mut part_done = at;
        part_done["part"] = part.json();
        vec![(done_name, done), ("response.content_part.done", part_done)]
    }
}

/// The output items of a chat completion's message, in the order a stream of it writes them.
fn items_of(message: &Value, chat_id: &str) -> Vec<Item> {
    let text = |member: &str| match message.get(member) {
        Some(Value::String(text)) => text.clone(),
        // Some backends answer with a list of text parts.
        Some(Value::Array(parts)) => parts.iter().filter_map(|part| part.get("text").and_then(Value::as_str)).collect(),
        _ => String::new(),
    };
    let part = |kind, text: String| (!text.is_empty()).then_some(Part { kind, text });
    let mut items: Vec<(ItemKind, Vec<Part>)> = Vec::new();
    if let Some(reasoning) = part(PartKind::ReasoningText, text("reasoning_content")) {
        items.push((ItemKind::Reasoning, vec![reasoning]));
    }
    let parts: Vec<Part> = [part(PartKind::OutputText, text("content")), part(PartKind::Refusal, text("refusal"))]
        .into_iter()
        .flatten()
        .collect();
    if !parts.is_empty() {
        items.push((ItemKind::Message, parts));
    }
    for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        let member = |pointer: &str| call.pointer(pointer).and_then(Value::as_str).unwrap_or("").to_owned();
        let call_id = Some(member("/id")).filter(|id| !id.is_empty());
        let call_id = call_id.unwrap_or_else(|| generated_call_id(chat_id, items.len()));
        let (name, arguments) = (member("/function/name"), member("/function/arguments"));
        items.push((ItemKind::FunctionCall { call_id, name, arguments }, Vec::new()));
    }
    items.into_iter().enumerate().map(|(index, (kind, parts))| Item::new(kind, parts, chat_id, index)).collect()
}

fn generated_call_id(chat_id: &str, output_index: usize) -> String {
    format!("call_{chat_id}_{output_index}")
}

/// Chat SSE → Responses SSE, event by event.
pub struct FromChatStream {
    request: Value,
    head: Head,
    started: bool,
    items: Vec<Item>,
    /// The item still being written: each ends when the next starts, or with the stream.
    open: Option<usize>,
    /// Each chat tool call's `index`, with its output index.
    calls: Vec<(u64, usize)>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    next_sequence_number: u64,
    ended: bool,
}

impl FromChatStream {
    /// `request`: the client's Responses request (for echoed fields and the model it asked for).
    pub fn new(request: &Value) -> Self {
        Self {
            request: request.clone(),
            head: Head::of(&Value::Null, request),
            started: false,
            items: Vec::new(),
            open: None,
            calls: Vec::new(),
            finish_reason: None,
            usage: None,
            next_sequence_number: 0,
            ended: false,
        }
    }

    /// One chat stream event's `data:` payload (a chunk's JSON text, an `{"error": {...}}`
    /// object, or `[DONE]`); returns the Responses SSE bytes to send now (possibly empty).
    pub fn event(&mut self, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if data.trim() == "[DONE]" {
            self.start(&Value::Null, &mut out);
            let status = Status::of(self.finish_reason.as_deref());
            self.close_open(status.last_item(), &mut out);
            let kind =
                if matches!(status, Status::Incomplete(_)) { "response.incomplete" } else { "response.completed" };
            self.end(kind, &status, &mut out);
            return out;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return out };
        if let Some(error) = chunk.get("error").filter(|error| !error.is_null()) {
            self.start(&Value::Null, &mut out);
            self.end("response.failed", &Status::Failed(failure(error)), &mut out);
            return out;
        }
        self.start(&chunk, &mut out);
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
            self.usage = Some(usage.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|choices| choices.get(0)) else { return out };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        let text = |member: &str| delta.get(member).and_then(Value::as_str).filter(|text| !text.is_empty());
        if let Some(reasoning) = text("reasoning_content") {
            self.content_delta(ItemKind::Reasoning, PartKind::ReasoningText, reasoning, &mut out);
        }
        if let Some(content) = text("content") {
            self.content_delta(ItemKind::Message, PartKind::OutputText, content, &mut out);
        }
        if let Some(refusal) = text("refusal") {
            self.content_delta(ItemKind::Message, PartKind::Refusal, refusal, &mut out);
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            self.tool_call_delta(call, &mut out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
        }
        out
    }

    /// The chat stream ended. After a clean `[DONE]` nothing more; otherwise a terminal failure
    /// event (`response.failed` with the response's status "failed" and an error) — never
    /// `response.completed`.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.ended {
            self.start(&Value::Null, &mut out);
            let error =
                json!({"code": "server_error", "message": "the upstream's stream ended before it was complete"});
            self.end("response.failed", &Status::Failed(error), &mut out);
        }
        out
    }

    fn emit(&mut self, kind: &str, mut event: Value, out: &mut Vec<u8>) {
        event["type"] = kind.into();
        event["sequence_number"] = self.next_sequence_number.into();
        self.next_sequence_number += 1;
        write_event(out, Some(kind), &event);
    }

    /// `response.created` and `response.in_progress`, once, named after the first chunk.
    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        if chunk.is_object() {
            self.head = Head::of(chunk, &self.request);
        }
        let response = response_object(&self.request, &self.head, &Status::InProgress, &[], None);
        self.emit("response.created", json!({"response": response.clone()}), out);
        self.emit("response.in_progress", json!({"response": response}), out);
    }

    fn end(&mut self, kind: &str, status: &Status, out: &mut Vec<u8>) {
        let response = response_object(&self.request, &self.head, status, &self.items, self.usage.as_ref());
        self.emit(kind, json!({"response": response}), out);
        self.ended = true;
    }

    fn open_item(&mut self, kind: ItemKind, out: &mut Vec<u8>) -> usize {
        self.close_open("completed", out);
        let index = self.items.len();
        let item = Item::new(kind, Vec::new(), &self.head.chat_id, index);
        let announced = item.json("in_progress");
        self.items.push(item);
        self.open = Some(index);
        self.emit("response.output_item.added", json!({"output_index": index, "item": announced}), out);
        index
    }

    fn close_open(&mut self, status: &str, out: &mut Vec<u8>) {
        let Some((index, item)) = self.open.take().and_then(|index| Some((index, self.items.get(index)?))) else {
            return;
        };
        let mut events = item.last_part_done(index);
        if let ItemKind::FunctionCall { name, arguments, .. } = &item.kind {
            let done = json!({"item_id": item.id, "output_index": index, "arguments": arguments, "name": name});
            events.push(("response.function_call_arguments.done", done));
        }
        events.push(("response.output_item.done", json!({"output_index": index, "item": item.json(status)})));
        for (kind, event) in events {
            self.emit(kind, event, out);
        }
    }

    /// Text for a reasoning item or a message: continues the open one, or starts one.
    fn content_delta(&mut self, item_kind: ItemKind, part_kind: PartKind, delta: &str, out: &mut Vec<u8>) {
        let index = match self.open {
            Some(index) if self.items.get(index).is_some_and(|item| item.kind == item_kind) => index,
            _ => self.open_item(item_kind, out),
        };
        let Some(item) = self.items.get_mut(index) else { return };
        let mut events = Vec::new();
        if item.parts.last().map(|part| part.kind) != Some(part_kind) {
            events = item.last_part_done(index);
            let part = Part { kind: part_kind, text: String::new() };
            let added = json!({"item_id": item.id, "output_index": index, "content_index": item.parts.len(),
                "part": part.json()});
            events.push(("response.content_part.added", added));
            item.parts.push(part);
        }
        let content_index = item.parts.len() - 1;
        if let Some(part) = item.parts.last_mut() {
            part.text.push_str(delta);
        }
        let mut event =
            json!({"item_id": item.id, "output_index": index, "content_index": content_index, "delta": delta});
        if part_kind == PartKind::OutputText {
            event["logprobs"] = json!([]);
        }
        events.push((part_kind.names().1, event));
        for (kind, event) in events {
            self.emit(kind, event, out);
        }
    }

    fn tool_call_delta(&mut self, call: &Value, out: &mut Vec<u8>) {
        let chat_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let name = call.pointer("/function/name").and_then(Value::as_str).unwrap_or("");
        let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("");
        let index = match self.calls.iter().find(|(called, _)| *called == chat_index) {
            Some(&(_, index)) => index,
            None => {
                let call_id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()).map(str::to_owned);
                let call_id = call_id.unwrap_or_else(|| generated_call_id(&self.head.chat_id, self.items.len()));
                let kind = ItemKind::FunctionCall { call_id, name: name.to_owned(), arguments: String::new() };
                let index = self.open_item(kind, out);
                self.calls.push((chat_index, index));
                index
            }
        };
        let Some(Item { id, kind: ItemKind::FunctionCall { name: known, arguments: written, .. }, .. }) =
            self.items.get_mut(index)
        else {
            return;
        };
        // Some backends name the function only in a later delta.
        if known.is_empty() {
            *known = name.to_owned();
        }
        if !arguments.is_empty() {
            written.push_str(arguments);
            // Sent even for an item already done (a backend interleaving its calls), so that the
            // deltas still add up to the arguments of the final Response.
            let event = json!({"item_id": id, "output_index": index, "delta": arguments});
            self.emit("response.function_call_arguments.delta", event, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::apis::EventReader;

    fn refused(request: Value) -> Option<String> {
        chat_request(&request).unwrap_err().param
    }

    /// The Responses events in `sse`, checked as each must be: named by its type, numbered from 0.
    fn read_events(sse: &[u8]) -> Vec<Value> {
        let mut events = Vec::new();
        for (number, event) in EventReader::default().feed(sse).into_iter().enumerate() {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!((event.name.as_deref(), &data["sequence_number"]), (data["type"].as_str(), &json!(number)));
            events.push(data);
        }
        events
    }

    fn kinds(events: &[Value]) -> Vec<&str> {
        events.iter().map(|event| event["type"].as_str().unwrap()).collect()
    }

    fn chunk(delta: Value, finish_reason: Value) -> String {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
        .to_string()
    }

    #[test]
    fn string_input_and_instructions_become_system_and_user_messages() {
        let chat = chat_request(&json!({"model": "gpt", "instructions": "Be brief.", "input": "Hi",
            "max_output_tokens": 50, "temperature": 0.2, "store": false, "metadata": {"k": "v"},
            "safety_identifier": "u1", "stream": true, "text": {"verbosity": "low"}, "reasoning": {"effort": "high"}}));
        assert_eq!(
            chat.unwrap(),
            json!({"model": "gpt", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}], "max_completion_tokens": 50, "temperature": 0.2, "user": "u1",
                "stream": true, "stream_options": {"include_usage": true}, "verbosity": "low",
                "reasoning_effort": "high"})
        );
    }

    #[test]
    fn images_are_sent_as_image_url_parts_in_user_messages_only() {
        let content = json!([{"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "https://x/cat.png", "detail": "low"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}]);
        let chat = chat_request(&json!({"model": "m", "input": [{"role": "user", "content": content}]})).unwrap();
        assert_eq!(
            chat["messages"][0]["content"],
            json!([{"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}}])
        );
        let input = json!([{"role": "system", "content": content}]);
        assert_eq!(refused(json!({"model": "m", "input": input})).as_deref(), Some("input[0].content[1].type"));
        let input = json!([{"role": "user", "content": [{"type": "input_image", "file_id": "f", "detail": "auto"}]}]);
        assert_eq!(refused(json!({"model": "m", "input": input})).as_deref(), Some("input[0].content[0].file_id"));
    }

    #[test]
    fn function_calls_and_outputs_become_tool_calls_and_tool_messages() {
        let chat = chat_request(&json!({"model": "m", "input": [
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "id": "fc_1", "call_id": "a", "name": "weather",
                "arguments": "{\"city\":\"Oslo\"}"},
            {"type": "function_call", "call_id": "b", "name": "weather", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "a", "output": "3C"},
            {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "21C"}]}],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "weather"}}))
        .unwrap();
        let call = |id: &str, city: &str| {
            let arguments = format!("{{\"city\":\"{city}\"}}");
            json!({"id": id, "type": "function", "function": {"name": "weather", "arguments": arguments}})
        };
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": "Weather in Oslo and Rome?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [call("a", "Oslo"), call("b", "Rome")]},
                {"role": "tool", "tool_call_id": "a", "content": "3C"},
                {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "21C"}]}])
        );
        let function = json!({"name": "weather", "parameters": {"type": "object"}, "strict": true});
        assert_eq!(chat["tools"], json!([{"type": "function", "function": function}]));
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "weather"}}));
    }

    #[test]
    fn text_formats_become_response_formats() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}});
        let format = json!({"type": "json_schema", "name": "person", "strict": true, "schema": schema});
        let chat = chat_request(&json!({"model": "m", "input": "x", "text": {"format": format}})).unwrap();
        let expected = json!({"name": "person", "strict": true, "schema": schema});
        assert_eq!(chat["response_format"], json!({"type": "json_schema", "json_schema": expected}));
        let chat = chat_request(&json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})).unwrap();
        assert!(chat.get("response_format").is_none());
    }

    #[test]
    fn what_cannot_be_translated_is_refused_by_name() {
        let refusals = [
            (json!({"previous_response_id": "resp_1"}), "previous_response_id"),
            (json!({"store": true}), "store"),
            (json!({"background": true}), "background"),
            (json!({"conversation": "conv_1"}), "conversation"),
            (json!({"include": ["reasoning.encrypted_content"]}), "include"),
            (json!({"truncation": "auto"}), "truncation"),
            (json!({"tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]}), "tools[1].type"),
            (json!({"tool_choice": {"type": "file_search"}}), "tool_choice"),
            (json!({"reasoning": {"effort": "low", "summary": "auto"}}), "reasoning.summary"),
            (json!({"input": [{"type": "item_reference", "id": "msg_1"}]}), "input[0].type"),
            (json!({"input": [{"type": "web_search_call", "id": "ws_1"}]}), "input[0].type"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]}),
                "input[0].encrypted_content",
            ),
            (json!({"frequency_penalty": 1}), "frequency_penalty"),
        ];
        for (fields, param) in refusals {
            let mut request = json!({"model": "m", "input": "x"});
            request.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
            assert_eq!(refused(request.clone()).as_deref(), Some(param), "{request}");
        }
        let refusal = chat_request(&json!({"model": "m", "input": "x", "previous_response_id": "r"})).unwrap_err();
        assert!(refusal.message.contains("stateless"), "{refusal}");
        // Null is absent.
        let request = json!({"model": "m", "input": "x", "previous_response_id": null, "include": []});
        assert!(chat_request(&request).is_ok());
    }

    #[test]
    fn an_answer_becomes_a_response_with_its_usage() {
        let message = json!({"role": "assistant", "content": "Let me look.", "reasoning_content": "Needs a lookup.",
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let chat = json!({"id": "c1", "object": "chat.completion", "created": 5, "model": "m-2024",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                "prompt_tokens_details": {"cached_tokens": 60}, "completion_tokens_details": {"reasoning_tokens": 7}}});
        let response = answer(&chat, &json!({"model": "m", "input": "x", "temperature": 0.5, "metadata": {"k": "v"}}));
        let fields = ["id", "object", "status", "created_at", "model", "error", "temperature", "top_p", "metadata"];
        assert_eq!(
            fields.map(|field| response[field].clone()),
            [
                json!("resp_c1"),
                json!("response"),
                json!("completed"),
                json!(5),
                json!("m-2024"),
                Value::Null,
                json!(0.5),
                Value::Null,
                json!({"k": "v"})
            ]
        );
        assert_eq!((&response["tool_choice"], &response["tools"]), (&json!("auto"), &json!([])));
        assert_eq!(response["text"], json!({"format": {"type": "text"}}));
        assert_eq!(
            response["usage"],
            json!({"input_tokens": 100, "input_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 0},
                "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 7}, "total_tokens": 120})
        );
        assert_eq!(
            response["output"],
            json!([
                {"type": "reasoning", "id": "rs_c1_0", "summary": [], "status": "completed",
                    "content": [{"type": "reasoning_text", "text": "Needs a lookup."}]},
                {"type": "message", "id": "msg_c1_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]},
                {"type": "function_call", "id": "fc_c1_2", "call_id": "call_9", "name": "f", "arguments": "{}",
                    "status": "completed"}])
        );
    }

    #[test]
    fn an_answer_cut_by_its_limit_is_incomplete() {
        let chat = json!({"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Once upon"}, "finish_reason": "length"}]});
        let response = answer(&chat, &json!({"model": "m", "input": "x", "max_output_tokens": 2}));
        assert_eq!((&response["status"], &response["max_output_tokens"]), (&json!("incomplete"), &json!(2)));
        assert_eq!(response["incomplete_details"], json!({"reason": "max_output_tokens"}));
        assert_eq!(response["output"][0]["status"], "incomplete");
    }

    #[test]
    fn streamed_tool_call_fragments_make_one_function_call() {
        let mut translator = FromChatStream::new(&json!({"model": "m", "input": "x", "stream": true}));
        let call = |call: Value| chunk(json!({"tool_calls": [call]}), Value::Null);
        let usage = json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}});
        let chat = [
            chunk(json!({"role": "assistant", "content": "On it."}), Value::Null),
            call(json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}})),
            call(json!({"index": 0, "function": {"arguments": "{\"a\""}})),
            call(json!({"index": 0, "function": {"arguments": ":1}"}})),
            chunk(json!({}), json!("tool_calls")),
            usage.to_string(),
            "[DONE]".into(),
        ];
        let sse: Vec<u8> = chat.iter().flat_map(|data| translator.event(data)).collect();
        assert!(translator.finish().is_empty());
        let events = read_events(&sse);
        assert_eq!(
            kinds(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(
            (events[0]["response"]["status"].as_str(), &events[0]["response"]["usage"]),
            (Some("in_progress"), &Value::Null)
        );
        assert_eq!((&events[11]["arguments"], &events[11]["name"]), (&json!("{\"a\":1}"), &json!("f")));
        assert_eq!(events[12]["item"]["call_id"], "call_1");
        assert_eq!(events[13]["response"]["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(events[13]["response"]["usage"]["total_tokens"], 13);
    }

    #[test]
    fn an_error_or_a_cut_stream_fails_the_response() {
        let request = json!({"model": "m", "input": "x", "stream": true});
        let mut translator = FromChatStream::new(&request);
        let mut sse = translator.event(&chunk(json!({"content": "Hel"}), Value::Null));
        sse.extend(translator.event(r#"{"error": {"message": "overloaded", "type": "server_error"}}"#));
        assert!(translator.event("[DONE]").is_empty() && translator.finish().is_empty());
        let failed = read_events(&sse).pop().unwrap();
        assert_eq!(
            (failed["type"].as_str(), failed["response"]["status"].as_str()),
            (Some("response.failed"), Some("failed"))
        );
        assert_eq!(failed["response"]["error"], json!({"code": "server_error", "message": "overloaded"}));
        assert_eq!(failed["response"]["output"][0]["content"][0]["text"], "Hel");

        let mut translator = FromChatStream::new(&request);
        let mut sse = translator.event(&chunk(json!({"content": "Hel"}), Value::Null));
        sse.extend(translator.finish());
        assert_eq!(kinds(&read_events(&sse)).last(), Some(&"response.failed"));
        let events = read_events(&FromChatStream::new(&request).finish());
        assert_eq!(kinds(&events), ["response.created", "response.in_progress", "response.failed"]);
    }

    #[test]
    fn a_cached_answer_replayed_as_a_stream_ends_as_the_same_response() {
        let message = json!({"role": "assistant", "content": "Hi!", "refusal": null});
        let chat = json!({"id": "c1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        let request = json!({"model": "m", "input": "x", "stream": true});
        let endpoint = crate::request::Endpoint::ChatCompletions;
        let sse = crate::cache::replay::sse(endpoint, &serde_json::to_vec(&chat).unwrap(), true).unwrap();
        let mut translator = FromChatStream::new(&request);
        let out: Vec<u8> =
            EventReader::default().feed(&sse).iter().flat_map(|event| translator.event(&event.data)).collect();
        assert_eq!(read_events(&out).pop().unwrap()["response"], answer(&chat, &request));
    }

    /// `text` cut at `cuts` (moved back to character boundaries), without empty pieces.
    fn pieces<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
        let cut = |cut: usize| (0..=cut % (text.len() + 1)).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let mut at: Vec<usize> = cuts.iter().map(|&at| cut(at)).chain([0, text.len()]).collect();
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|pair| &text[pair[0]..pair[1]]).collect()
    }

    /// The chat stream of `answer` as a backend sends it, each text cut into deltas at `cuts`,
    /// and the whole cut at `cuts` again into the reads that bring it.
    fn chat_stream(answer: &Value, cuts: &[usize]) -> Vec<Vec<u8>> {
        let chunk = |choices: Value| {
            json!({"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
                "model": answer["model"], "choices": choices})
        };
        let delta = |delta: Value| chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]));
        let message = &answer["choices"][0]["message"];
        let mut chunks = vec![delta(json!({"role": "assistant", "content": ""}))];
        for member in ["reasoning_content", "content"] {
            chunks.extend(
                pieces(message[member].as_str().unwrap_or(""), cuts)
                    .into_iter()
                    .map(|piece| delta(json!({member: piece}))),
            );
        }
        for (i, call) in message["tool_calls"].as_array().into_iter().flatten().enumerate() {
            let function = json!({"name": call["function"]["name"], "arguments": ""});
            chunks.push(delta(
                json!({"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": function}]}),
            ));
            for piece in pieces(call["function"]["arguments"].as_str().unwrap(), cuts) {
                chunks.push(delta(json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})));
            }
        }
        chunks.push(chunk(json!([{"index": 0, "delta": {}, "finish_reason": answer["choices"][0]["finish_reason"]}])));
        chunks.push(chunk(json!([])));
        chunks.last_mut().unwrap()["usage"] = answer["usage"].clone();
        let sse: String =
            chunks.iter().map(|chunk| format!("data: {chunk}\n\n")).collect::<String>() + "data: [DONE]\n\n";
        let mut at: Vec<usize> = cuts.iter().map(|cut| cut % (sse.len() + 1)).chain([0, sse.len()]).collect();
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|pair| sse.as_bytes()[pair[0]..pair[1]].to_vec()).collect()
    }

    fn chat_answer() -> impl Strategy<Value = Value> {
        let calls = prop::collection::vec(("[a-z_]{1,8}", "\\PC{0,24}"), 0..3);
        let usage = (0u64..100_000, 0u64..=100, 0u64..10_000, prop::option::of(0u64..1000));
        let finish = prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter"]);
        let texts = (prop::option::of("\\PC{1,40}"), prop::option::of("\\PC{1,40}"));
        ("[a-z0-9]{1,8}", texts, calls, usage, finish).prop_map(|(id, (reasoning, text), calls, usage, finish)| {
            let (prompt, cached_percent, completion, reasoning_tokens) = usage;
            let calls = calls.into_iter().enumerate().map(|(i, (name, arguments))| {
                let function = json!({"name": name, "arguments": arguments});
                json!({"id": format!("call_{i}"), "type": "function", "function": function})
            });
            let calls: Vec<Value> = calls.collect();
            let mut message = json!({"role": "assistant", "content": text, "reasoning_content": reasoning});
            if !calls.is_empty() {
                message["tool_calls"] = calls.into();
            }
            let mut usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": prompt * cached_percent / 100}});
            if let Some(reasoning_tokens) = reasoning_tokens {
                usage["completion_tokens_details"] = json!({"reasoning_tokens": reasoning_tokens});
            }
            json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": 1_700_000_000,
                "model": "m-1",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
        })
    }

    /// The output items as the OpenAI SDK's stream helper accumulates them, failing where it
    /// would: content before its item or part, a done item not the one announced.
    fn accumulate(events: &[Value]) -> Vec<Value> {
        let mut items: BTreeMap<u64, Value> = BTreeMap::new();
        let append =
            |to: &mut Value, delta: &Value| *to = format!("{}{}", to.as_str().unwrap(), delta.as_str().unwrap()).into();
        for event in events {
            let item = event["output_index"].as_u64().and_then(|index| items.get_mut(&index));
            match (event["type"].as_str().unwrap(), item) {
                ("response.output_item.added", None) => {
                    _ = items.insert(event["output_index"].as_u64().unwrap(), event["item"].clone())
                }
                ("response.content_part.added", Some(item)) if item["type"] == "message" => {
                    let content = item["content"].as_array_mut().unwrap();
                    assert_eq!(event["content_index"], content.len());
                    content.push(event["part"].clone());
                }
                ("response.output_text.delta", Some(item)) => {
                    let part = &mut item["content"][event["content_index"].as_u64().unwrap() as usize];
                    assert_eq!(part["type"], "output_text");
                    append(&mut part["text"], &event["delta"]);
                }
                ("response.function_call_arguments.delta", Some(item)) => {
                    append(&mut item["arguments"], &event["delta"])
                }
                ("response.output_item.done", Some(item)) => {
                    assert_eq!((&item["id"], &item["call_id"]), (&event["item"]["id"], &event["item"]["call_id"]));
                    if item["type"] != "reasoning" {
                        assert_eq!(
                            (&item["content"], &item["arguments"]),
                            (&event["item"]["content"], &event["item"]["arguments"])
                        );
                    }
                    *item = event["item"].clone();
                }
                (kind, item) => {
                    assert!(item.is_some() || event.get("output_index").is_none(), "{kind} without its item")
                }
            }
        }
        items.into_values().collect()
    }

    fn deltas(events: &[Value], kind: &str, item_id: &Value) -> String {
        let events = events.iter().filter(|event| event["type"] == kind && &event["item_id"] == item_id);
        events.map(|event| event["delta"].as_str().unwrap()).collect()
    }

    /// An input item, with what its chat messages must say.
    fn input_item() -> impl Strategy<Value = (Value, Vec<String>)> {
        let role = prop::sample::select(vec!["user", "system", "developer", "assistant"]);
        prop_oneof![
            (role, "\\PC{0,20}", any::<bool>()).prop_map(|(role, text, as_parts)| {
                let kind = if role == "assistant" { "output_text" } else { "input_text" };
                let content = if as_parts { json!([{"type": kind, "text": text}]) } else { json!(text) };
                (json!({"role": role, "content": content}), vec![format!("{role}: {text}")])
            }),
            "https://[a-z]{1,8}\\.png".prop_map(|url| {
                let content = json!([{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": url}]);
                (
                    json!({"type": "message", "role": "user", "content": content}),
                    vec!["user: see".into(), format!("image {url}")],
                )
            }),
            ("call_[a-z0-9]{1,6}", "[a-z]{1,6}", "\\PC{0,20}").prop_map(|(id, name, arguments)| {
                let item = json!({"type": "function_call", "call_id": id, "name": name, "arguments": arguments});
                (item, vec![format!("call {id} {name}({arguments})")])
            }),
            ("call_[a-z0-9]{1,6}", "\\PC{0,20}").prop_map(|(id, output)| {
                let item = json!({"type": "function_call_output", "call_id": id, "output": output});
                (item, vec![format!("output {id}: {output}")])
            }),
        ]
    }

    /// What the chat messages say, in order, as `input_item` writes it.
    fn said(chat: &Value) -> Vec<String> {
        let mut said = Vec::new();
        for message in chat["messages"].as_array().unwrap() {
            let role = message["role"].as_str().unwrap();
            let text = |text: &Value| format!("{role}: {}", text.as_str().unwrap());
            match (&message["content"], role) {
                (content, "tool") => said.push(format!(
                    "output {}: {}",
                    message["tool_call_id"].as_str().unwrap(),
                    content.as_str().unwrap()
                )),
                (Value::String(_), _) => said.push(text(&message["content"])),
                (Value::Array(parts), _) => {
                    said.extend(parts.iter().map(|part| match part["type"].as_str().unwrap() {
                        "text" => text(&part["text"]),
                        _ => format!("image {}", part["image_url"]["url"].as_str().unwrap()),
                    }))
                }
                _ => {}
            }
            for call in message["tool_calls"].as_array().into_iter().flatten() {
                let function = |member: &str| call["function"][member].as_str().unwrap().to_owned();
                said.push(format!(
                    "call {} {}({})",
                    call["id"].as_str().unwrap(),
                    function("name"),
                    function("arguments")
                ));
            }
        }
        said
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_streamed_answer_ends_as_the_whole_answer(
            chat in chat_answer(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let request = json!({"model": "m", "input": "x", "stream": true, "max_output_tokens": 900});
            let expected = answer(&chat, &request);
            let mut translator = FromChatStream::new(&request);
            let mut reader = EventReader::default();
            let mut sse = Vec::new();
            for read in chat_stream(&chat, &cuts) {
                sse.extend(reader.feed(&read).iter().flat_map(|event| translator.event(&event.data)));
            }
            sse.extend(translator.finish());
            let events = read_events(&sse);
            let last = events.last().unwrap();
            let kind = if expected["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
            prop_assert_eq!((&last["type"], &last["response"]), (&json!(kind), &expected));
            let output = expected["output"].as_array().unwrap();
            prop_assert_eq!(&accumulate(&events), output);
            for item in output {
                let (kind, text) = match item["type"].as_str().unwrap() {
                    "message" => ("response.output_text.delta", &item["content"][0]["text"]),
                    "reasoning" => ("response.reasoning_text.delta", &item["content"][0]["text"]),
                    _ => ("response.function_call_arguments.delta", &item["arguments"]),
                };
                prop_assert_eq!(deltas(&events, kind, &item["id"]), text.as_str().unwrap());
            }
            let (usage, cached) = (&expected["usage"], &chat["usage"]["prompt_tokens_details"]["cached_tokens"]);
            prop_assert_eq!(&usage["input_tokens"], &chat["usage"]["prompt_tokens"]);
            prop_assert_eq!(&usage["input_tokens_details"]["cached_tokens"], cached);
        }

        #[test]
        fn a_request_keeps_every_message_call_tool_and_limit(
            instructions in prop::option::of("\\PC{0,20}"),
            items in prop::collection::vec(input_item(), 0..8),
            tools in prop::collection::vec("[a-z]{1,6}", 0..3),
            max_output_tokens in prop::option::of(1u32..100_000),
        ) {
            let tools_sent: Vec<Value> =
                tools.iter().map(|name| json!({"type": "function", "name": name, "parameters": {}})).collect();
            let input: Vec<Value> = items.iter().map(|(item, _)| item.clone()).collect();
            let mut request = json!({"model": "m", "input": input, "tools": tools_sent,
                "instructions": instructions, "max_output_tokens": max_output_tokens});
            let chat = chat_request(&request).unwrap();
            let mut expected: Vec<String> = instructions.iter().map(|text| format!("system: {text}")).collect();
            expected.extend(items.into_iter().flat_map(|(_, said)| said));
            prop_assert_eq!(said(&chat), expected);
            let names = chat["tools"].as_array().unwrap().iter().map(|tool| tool["function"]["name"].as_str().unwrap());
            prop_assert!(names.eq(tools.iter().map(String::as_str)));
            let limit = chat.get("max_completion_tokens").and_then(Value::as_u64);
            prop_assert_eq!(limit, max_output_tokens.map(u64::from));
            request["stream"] = json!(true);
            prop_assert_eq!(&chat_request(&request).unwrap()["stream_options"], &json!({"include_usage": true}));
        }
    }
}
