//! An in-process backend that answers like an OpenAI server: for first runs, demos and load
//! tests without any model. Each word of `quality_text` is one token; it takes `ttft` before
//! the first and `1 / tokens_per_s` between tokens, and reports usage like a real server.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body::{Body, Frame};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{BodyError, UpstreamBody};
use crate::config::{Backend, Simulate};
use crate::request::{Endpoint, ProxyRequest};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Completion length when the request sets no `max_tokens`: the simulated model's natural
/// answer is its whole text, capped here as real servers cap unbounded generations.
const DEFAULT_MAX_TOKENS: u64 = 256;
const EMBEDDING_DIMENSIONS: usize = 8;

/// `with_logprobs`: report per-token log-probabilities (the gateway's cascade asks for them).
pub async fn respond(
    sim: &Simulate,
    backend: &Backend,
    request: &ProxyRequest,
    with_logprobs: bool,
) -> Response<UpstreamBody> {
    let words: Vec<&str> = sim.quality_text.split_whitespace().collect();
    let limit = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let length = (words.len() as u64).min(limit);
    let finish = if length < words.len() as u64 { "length" } else { "stop" };
    let answer: Vec<String> = words.iter().take(length as usize).map(|w| format!("{w} ")).collect();
    let usage = json!({
        "prompt_tokens": request.prompt_tokens_estimate,
        "completion_tokens": if request.endpoint == Endpoint::Embeddings { 0 } else { length },
        "total_tokens": request.prompt_tokens_estimate + length,
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let per_token = Duration::from_secs_f64(1.0 / sim.tokens_per_s);

    if request.stream {
        let (tx, rx) = mpsc::channel(16);
        let chunk = ChunkShape { endpoint: request.endpoint, id, created, model: backend.model.clone() };
        tokio::spawn(stream(tx, chunk, answer, finish, usage, sim.ttft, per_token));
        let body = UpstreamBody::Simulated(ChannelBody { rx });
        return with_type(Response::new(body), "text/event-stream");
    }

    tokio::time::sleep(sim.ttft + per_token * u32::try_from(length).unwrap_or(u32::MAX)).await;
    let text: String = answer.concat();
    let wants_logprobs = with_logprobs || request.member_value("logprobs").is_some_and(|v| v.as_bool() != Some(false));
    let logprobs = wants_logprobs.then(|| token_logprobs(backend.quality, request, answer.len()));
    let mut body = match request.endpoint {
        Endpoint::ChatCompletions => json!({
            "id": format!("chatcmpl-sim-{id}"), "object": "chat.completion", "created": created,
            "model": backend.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        }),
        Endpoint::Completions => json!({
            "id": format!("cmpl-sim-{id}"), "object": "text_completion", "created": created,
            "model": backend.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": usage,
        }),
        Endpoint::Embeddings => json!({
            "object": "list", "model": backend.model,
            "data": embeddings(&request.member_value("input").unwrap_or(Value::Null)),
            "usage": {"prompt_tokens": request.prompt_tokens_estimate, "total_tokens": request.prompt_tokens_estimate},
        }),
    };
    if let (Some(values), Some(choice)) = (logprobs, body.pointer_mut("/choices/0")) {
        choice["logprobs"] = match request.endpoint {
            Endpoint::Completions => json!({ "token_logprobs": values }),
            _ => {
                json!({ "content": answer.iter().zip(values).map(|(t, lp)| json!({"token": t, "logprob": lp})).collect::<Vec<_>>() })
            }
        };
    }
    let bytes = Bytes::from(body.to_string());
    let body = UpstreamBody::whole(bytes);
    let mut response = with_type(Response::new(body), "application/json");
    *response.status_mut() = StatusCode::OK;
    response
}

struct ChunkShape {
    endpoint: Endpoint,
    id: u64,
    created: u64,
    model: String,
}

impl ChunkShape {
    fn event(&self, text: Option<&str>, finish: Option<&str>) -> Bytes {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish}),
            _ => {
                let delta = text.map_or_else(|| json!({}), |t| json!({"content": t}));
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
        };
        self.frame(json!([choice]), Value::Null)
    }

    fn frame(&self, choices: Value, usage: Value) -> Bytes {
        let (prefix, object) = match self.endpoint {
            Endpoint::Completions => ("cmpl", "text_completion"),
            _ => ("chatcmpl", "chat.completion.chunk"),
        };
        let chunk = json!({
            "id": format!("{prefix}-sim-{}", self.id), "object": object, "created": self.created,
            "model": self.model, "choices": choices, "usage": usage,
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    }
}

async fn stream(
    tx: mpsc::Sender<Bytes>,
    shape: ChunkShape,
    answer: Vec<String>,
    finish: &'static str,
    usage: Value,
    ttft: Duration,
    per_token: Duration,
) {
    tokio::time::sleep(ttft).await;
    for (i, word) in answer.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(per_token).await;
        }
        // A send fails only when the client is gone: stop generating, as a real server would.
        if tx.send(shape.event(Some(word), None)).await.is_err() {
            return;
        }
    }
    let tail =
        [shape.event(None, Some(finish)), shape.frame(json!([]), usage), Bytes::from_static(b"data: [DONE]\n\n")];
    for frame in tail {
        if tx.send(frame).await.is_err() {
            return;
        }
    }
}

/// Per-token log-probabilities around `ln(quality)`, varying with the prompt: a better model
/// is more sure of itself, and some prompts are harder than others. Deterministic.
fn token_logprobs(quality: f64, request: &ProxyRequest, tokens: usize) -> Vec<f64> {
    let prompt = request
        .member_value("messages")
        .or_else(|| request.member_value("prompt"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    let seed = crate::auth::sha256(prompt.as_bytes());
    // The prompt's difficulty moves the whole answer by up to ±0.8 nats.
    let difficulty = f64::from(seed[0]) / 255.0 * 1.6 - 0.8;
    (0..tokens)
        .map(|i| {
            let jitter = f64::from(seed[1 + i % 31]) / 255.0 * 0.4 - 0.2;
            (quality.max(0.01).ln() + difficulty + jitter).min(0.0)
        })
        .collect()
}

/// Deterministic unit-ish vectors derived from the input text, one per input.
fn embeddings(input: &Value) -> Vec<Value> {
    let inputs: Vec<String> = match input {
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).map(str::to_owned).collect()
        }
        other => vec![other.to_string()],
    };
    inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let seed = crate::auth::sha256(text.as_bytes());
            let vector: Vec<f64> =
                seed.iter().take(EMBEDDING_DIMENSIONS).map(|b| f64::from(*b) / 255.0 - 0.5).collect();
            json!({"object": "embedding", "index": i, "embedding": vector})
        })
        .collect()
}

fn with_type(mut response: Response<UpstreamBody>, content_type: &'static str) -> Response<UpstreamBody> {
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

/// A body fed by the generating task; dropping it (client gone) stops the task.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
