//! A fast mock OpenAI upstream for the load harness (`benches/load/run.sh`): every
//! `POST …/chat/completions` gets a fixed answer with usage, as JSON or, when the body asks
//! for `"stream": true`, as server-sent events (`--chunks` content chunks, a usage chunk with
//! `"choices": []` as OpenAI and llama.cpp send it, then `data: [DONE]`).
//!
//! It does as little as it can so that what the harness measures is the proxy in front of it:
//! no JSON parsing (a byte search for `"stream": true`), answers pre-rendered at start.
//!
//! It is also an OTLP/HTTP sink for the tracing benchmark: `POST …/v1/traces` is read whole
//! and answered 200 with an empty (valid) protobuf response, the spans discarded.
//!
//! ```text
//! mock_upstream [--listen 127.0.0.1:0] [--latency-ms 0] [--chunks 32] [--chunk-gap-us 0] [--threads 1]
//!               [--answer-bytes 0]
//! ```
//! `--answer-bytes`: the JSON answer's content padded to about that many bytes.
//! `--latency-ms`: wait before the response head (a model's time to first token).
//! `--chunk-gap-us`: pause between stream chunks; 0 yields to the runtime between chunks, so
//! each chunk still goes out in its own write, as a real generator's would.
//! Prints `listening on ADDR` on stdout once bound.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

struct Settings {
    latency: Duration,
    chunk_gap: Duration,
    json: Bytes,
    /// The stream's events, each sent as its own body frame.
    events: Vec<Bytes>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (mut latency_ms, mut chunks, mut gap_us, mut threads) = (0u64, 32usize, 0u64, 1usize);
    let mut answer_bytes = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = value.parse()?,
            "--latency-ms" => latency_ms = value.parse()?,
            "--chunks" => chunks = value.parse()?,
            "--answer-bytes" => answer_bytes = value.parse()?,
            "--chunk-gap-us" => gap_us = value.parse()?,
            "--threads" => threads = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let settings = Arc::new(Settings {
        latency: Duration::from_millis(latency_ms),
        chunk_gap: Duration::from_micros(gap_us),
        json: Bytes::from(json_answer(chunks, answer_bytes)),
        events: sse_events(chunks),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    runtime.block_on(serve(listen, settings))
}

async fn serve(listen: SocketAddr, settings: Arc<Settings>) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        // Same pitfall as the gateway's (shared FACTS.md): without it, multi-write answers
        // wait for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let settings = Arc::clone(&settings);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&settings), request));
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

type MockBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(settings: Arc<Settings>, request: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    let path_ok = request.uri().path().ends_with("/chat/completions");
    let traces = request.uri().path().ends_with("/v1/traces");
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if traces {
        let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
        *response.headers_mut() =
            std::iter::once((header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-protobuf"))).collect();
        return Ok(response);
    }
    if !path_ok {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")).boxed_unsync());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    if !settings.latency.is_zero() {
        tokio::time::sleep(settings.latency).await;
    }
    let response = if asks_for_stream(&body) {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Events::new(settings).boxed_unsync())
    } else {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(settings.json.clone()).boxed_unsync())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync())))
}

/// `"stream"` followed by `: true`, whatever the spacing; no JSON parse on the mock's side.
fn asks_for_stream(body: &[u8]) -> bool {
    memchr::memmem::find_iter(body, b"\"stream\"").any(|at| {
        let rest = body[at + 8..].trim_ascii_start();
        rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().starts_with(b"true"))
    })
}

/// `answer_bytes`: the content padded with words to about that many bytes (0: a short reply).
fn json_answer(completion_tokens: usize, answer_bytes: usize) -> String {
    let mut content = String::from("This is a mock answer of a few words, about as long as a short reply.");
    while content.len() < answer_bytes {
        content.push_str(" word");
    }
    format!(
        r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"mock-model","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":24,"completion_tokens":{completion_tokens},"total_tokens":{}}}}}"#,
        24 + completion_tokens
    )
}

fn sse_events(chunks: usize) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..chunks)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":{}}}],\"usage\":null}}\n\n",
                if i + 1 == chunks { "\"stop\"" } else { "null" }
            ))
        })
        .collect();
    events.push(Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock-model\",\"choices\":[],\"usage\":{{\"prompt_tokens\":24,\"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\n",
        24 + chunks
    )));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// The stream body: one event per frame, a pause (or a yield) between them.
struct Events {
    settings: Arc<Settings>,
    next: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    yielded: bool,
}

impl Events {
    fn new(settings: Arc<Settings>) -> Self {
        Self { settings, next: 0, pause: None, yielded: true }
    }
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.next >= this.settings.events.len() {
            return Poll::Ready(None);
        }
        if this.next > 0 {
            if this.settings.chunk_gap.is_zero() {
                // Let hyper write what it has before the next chunk: one write per chunk.
                if !this.yielded {
                    this.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            } else {
                let gap = this.settings.chunk_gap;
                let pause = this.pause.get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
        }
        this.yielded = false;
        let event = this.settings.events[this.next].clone();
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.settings.events.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
