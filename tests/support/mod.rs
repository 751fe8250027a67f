//! Test harness: a real OpenAI-like upstream on 127.0.0.1:0 and Tollgate itself on
//! 127.0.0.1:0, driven over HTTP. No mocks: both sides are real HTTP servers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod faults;
pub mod process;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tollgate::app::AppState;
use tollgate::config::Config;

pub mod fleet;

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    /// The `x-request-id` the gateway sent.
    pub request_id: Option<String>,
    /// The W3C `traceparent` and `tracestate` the gateway sent.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub body: Value,
}

/// An OpenAI-like server whose behaviour is chosen by the (rewritten) `model` it receives:
/// `echo` answers normally, `no-usage` omits usage, `slow-stream` streams 200 chunks 20 ms
/// apart, `slow-json*` answers after `SLOW_JSON_DELAY`, `bad-request` answers 400, `fail`
/// answers 500, `hang` never answers in time, `garbage` answers 200 with HTML,
/// `usage-on-last` puts usage on the final content chunk, `linger-after-done` keeps its
/// stream open for `LINGER_AFTER_DONE` after `[DONE]`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _stop: oneshot::Sender<()>,
}

pub const UPSTREAM_PROMPT_TOKENS: u64 = 11;
/// How long `slow-json*` models take to answer.
pub const SLOW_JSON_DELAY: Duration = Duration::from_millis(1000);
pub const UPSTREAM_COMPLETION_TOKENS: u64 = 7;
/// How long `linger-after-done` keeps its stream open after `[DONE]`.
pub const LINGER_AFTER_DONE: Duration = Duration::from_secs(3);
pub const UPSTREAM_ERROR_BODY: &str = r#"{"error":{"message":"temperature is out of range","type":"invalid_request_error","param":"temperature","code":"bad_temperature"}}"#;

impl Upstream {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/completions", post(handle))
            .route("/v1/embeddings", post(handle))
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self { addr, seen, _stop: stop }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let authorization = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let (request_id, traceparent, tracestate) = (header("x-request-id"), header("traceparent"), header("tracestate"));
    seen.lock().unwrap().push(Seen {
        path: uri.path().to_owned(),
        authorization,
        request_id,
        traceparent,
        tracestate,
        body: body.clone(),
    });
    let model = body["model"].as_str().unwrap_or("echo").to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let usage = json!({"prompt_tokens": UPSTREAM_PROMPT_TOKENS, "completion_tokens": UPSTREAM_COMPLETION_TOKENS,
                       "total_tokens": UPSTREAM_PROMPT_TOKENS + UPSTREAM_COMPLETION_TOKENS});
    match model.as_str() {
        "bad-request" => {
            return (StatusCode::BAD_REQUEST, [("content-type", "application/json")], UPSTREAM_ERROR_BODY)
                .into_response()
        }
        "fail" => return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return StatusCode::OK.into_response();
        }
        // llama.cpp's answer to a prompt over its context window, and to an endpoint it lacks.
        "tiny-context" => {
            let body = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#;
            return (StatusCode::BAD_REQUEST, [("content-type", "application/json")], body).into_response();
        }
        "not-implemented" => {
            return (StatusCode::NOT_IMPLEMENTED, "This server does not support embeddings.").into_response();
        }
        "garbage" => {
            return (StatusCode::OK, [("content-type", "application/json")], "<html>oops</html>").into_response()
        }
        // Answers normally after a pause: keeps requests in flight together.
        m if m.starts_with("slow-json") => tokio::time::sleep(SLOW_JSON_DELAY).await,
        _ => {}
    }
    if uri.path().ends_with("/embeddings") {
        return Json(json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}}))
        .into_response();
    }
    let completions = uri.path().ends_with("/completions") && !uri.path().contains("chat");
    if !stream {
        // `length`: an answer that ran out of tokens.
        let finish = if model == "length" { "length" } else { "stop" };
        let choice = if completions {
            json!({"index": 0, "text": "hello from upstream", "finish_reason": finish})
        } else {
            json!({"index": 0, "message": {"role": "assistant", "content": "hello from upstream"}, "finish_reason": finish})
        };
        let mut answer = json!({"id": "x", "object": "chat.completion", "created": 1, "model": model, "choices": [choice],
                                "timings": {"predicted_ms": 1.0}});
        if body["logprobs"] == json!(true) {
            // Sure of easy questions, unsure of hard ones (a cascade's signal).
            let logprob = if body.to_string().contains("hard") { -2.5 } else { -0.1 };
            answer["choices"][0]["logprobs"] = json!({"content": [{"token": "hello", "logprob": logprob}]});
        }
        if model != "no-usage" {
            answer["usage"] = usage;
        }
        return Json(answer).into_response();
    }
    let (count, gap) = if model == "slow-stream" { (200, Duration::from_millis(20)) } else { (5, Duration::ZERO) };
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(4);
    tokio::spawn(async move {
        for i in 0..count {
            let delta = if completions {
                json!({"index": 0, "text": "tok "})
            } else {
                json!({"index": 0, "delta": {"content": "tok "}})
            };
            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "choices": [delta], "usage": null});
            if tx.send(Ok(format!("data: {chunk}\n\n"))).await.is_err() {
                return;
            }
            if i + 1 < count && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        let last = if model == "usage-on-last" {
            json!({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
        } else {
            json!({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null})
        };
        let _ = tx.send(Ok(format!("data: {last}\n\n"))).await;
        if include_usage && model != "no-usage" && model != "usage-on-last" {
            let usage_chunk = json!({"id": "x", "choices": [], "usage": usage});
            let _ = tx.send(Ok(format!("data: {usage_chunk}\n\n"))).await;
        }
        let _ = tx.send(Ok("data: [DONE]\n\n".to_owned())).await;
        if model == "linger-after-done" {
            tokio::time::sleep(LINGER_AFTER_DONE).await;
        }
    });
    let stream = futures_stream(rx);
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

/// A `Stream` over an mpsc receiver, without pulling in a stream-utilities crate.
fn futures_stream(
    rx: mpsc::Receiver<Result<String, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<String, std::io::Error>> {
    struct Rx(mpsc::Receiver<Result<String, std::io::Error>>);
    impl futures_core::Stream for Rx {
        type Item = Result<String, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
    Rx(rx)
}

/// Tollgate serving `config` on 127.0.0.1:0, with `env` as its environment.
pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_from(config, env, None).await
    }

    /// Serves `config`, as if read from `path` (the file a reload reads).
    pub async fn start_from(config: &str, env: &[(&str, &str)], path: Option<std::path::PathBuf>) -> Self {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let config = Config::parse(config, "test.toml", &lookup).unwrap_or_else(|e| panic!("test config:\n{e}"));
        let grace = config.server.shutdown_grace;
        let state = AppState::new(config, path, Arc::new(lookup)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate::server::serve(listener, Arc::clone(&state), grace, async {
            let _ = stopped.await;
        }));
        Self { addr, state, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown (as SIGTERM would) without waiting.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// The value of the sample `name{labels}`, whatever the label order; 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// `GET /admin/usage/{user}` with the admin key.
    pub async fn usage(&self, user: &str) -> Value {
        let response = reqwest::Client::new()
            .get(self.url(&format!("/admin/usage/{user}")))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `n` copies of one request, sent concurrently; the responses in completion order.
    pub async fn post_concurrently(&self, n: usize, path: &str, key: &str, body: &Value) -> Vec<reqwest::Response> {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let request = client.post(self.url(path)).bearer_auth(key).json(body);
                tokio::spawn(async move { request.send().await.unwrap() })
            })
            .collect();
        let mut responses = Vec::with_capacity(n);
        for task in tasks {
            responses.push(task.await.unwrap());
        }
        responses
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new().post(self.url(path)).bearer_auth(key).json(body).send().await.unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (metric, label_text) = series.split_once('{').map_or((series, ""), |(m, l)| (m, l.trim_end_matches('}')));
        if metric != name {
            continue;
        }
        let all = labels.iter().all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        if all {
            return value.parse().unwrap();
        }
    }
    0.0
}

/// A key the test config gives user `alice` (quality-first) and its hash.
pub const ALICE_KEY: &str = "sk-alice-test-key";
pub const BOB_KEY: &str = "sk-bob-test-key";
pub const BACKEND_KEY: &str = "sk-backend-secret";
pub const ADMIN_KEY: &str = "sk-admin-test-key";

pub fn key_hash(key: &str) -> String {
    tollgate::auth::hash_key_hex(key)
}

/// A config with one real backend per upstream model name, all on `upstream`, plus a route
/// `auto` over the first and users alice and bob.
pub fn config_for(upstream: &str, models: &[&str], extra: &str) -> String {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\nshutdown_grace_s = 5\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n",
    );
    for model in models {
        text.push_str(&format!(
            "[[backends]]\nname = \"{model}\"\ntier = \"quality\"\nbase_url = \"{upstream}\"\napi_key_env = \"TEST_BACKEND_KEY\"\n\
             model = \"{model}\"\nquality = 0.9\ncontext_window = 32768\nmax_concurrency = 8\ntimeout_s = 10\n\
             pricing = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}\n\n"
        ));
    }
    text.push_str(&format!("[[routes]]\nmodel = \"auto\"\nbackends = [\"{}\"]\n\n", models[0]));
    text.push_str(&format!(
        "[[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\npolicy = \"quality-first\"\n\n\
         [[users]]\nname = \"bob\"\nkey_sha256 = \"{}\"\npolicy = \"cost-first\"\n\n",
        key_hash(ALICE_KEY),
        key_hash(BOB_KEY)
    ));
    text.push_str(extra);
    text
}

pub const ENV: &[(&str, &str)] = &[("TEST_BACKEND_KEY", BACKEND_KEY), ("TEST_ADMIN_KEY", ADMIN_KEY)];

pub fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "temperature": 0.2, "seed": 42})
}

/// `promtool check metrics` finds nothing to say about `text`.
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed for this test: apt-get install prometheus (.ci/run does)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
}
