//! The gateway core over real HTTP: answers, streams, usage metering and headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

async fn setup(models: &[&str]) -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_for(&upstream.base_url(), models, ""), ENV).await;
    (upstream, gateway)
}

#[tokio::test]
async fn non_streaming_chat_returns_the_upstream_answer_with_tollgate_headers() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "echo");
    assert_eq!(response.headers()["x-tollgate-tier"], "quality");
    assert_eq!(response.headers()["x-tollgate-reason"], "quality-first");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hello from upstream");
    // Extra fields a strict parser would drop (llama.cpp's `timings`) reach the client.
    assert_eq!(body["timings"]["predicted_ms"], 1.0);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body["model"], "echo", "model rewritten to the backend's");
    assert_eq!(seen[0].body["seed"], 42, "other fields untouched");
    assert_eq!(seen[0].body["temperature"], 0.2);
    let labels = [("user", "alice"), ("backend", "echo"), ("kind", "prompt")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &labels).await, UPSTREAM_PROMPT_TOKENS as f64);
    let labels = [("user", "alice"), ("backend", "echo"), ("kind", "completion")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &labels).await, UPSTREAM_COMPLETION_TOKENS as f64);
}

#[tokio::test]
async fn the_backend_key_goes_upstream_and_the_client_key_never_does() {
    let (upstream, gateway) = setup(&["echo"]).await;
    gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    let seen = upstream.seen();
    assert_eq!(seen[0].authorization.as_deref(), Some(format!("Bearer {BACKEND_KEY}").as_str()));
    assert!(!format!("{seen:?}").contains(ALICE_KEY));
}

async fn stream_text(gateway: &Gateway, body: &Value) -> (reqwest::header::HeaderMap, String) {
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let headers = response.headers().clone();
    (headers, response.text().await.unwrap())
}

#[tokio::test]
async fn a_stream_is_forwarded_without_the_usage_chunk_the_client_did_not_ask_for() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    let (_, text) = stream_text(&gateway, &body).await;
    assert_eq!(text.matches("\"tok \"").count(), 5);
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(!text.contains("prompt_tokens"), "usage chunk hidden: {text}");
    assert_eq!(upstream.seen()[0].body["stream_options"]["include_usage"], true, "usage always asked upstream");
    let labels = [("user", "alice"), ("backend", "echo"), ("kind", "completion")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &labels).await, UPSTREAM_COMPLETION_TOKENS as f64);
}

#[tokio::test]
async fn a_stream_carries_the_usage_chunk_when_the_client_asked_for_it() {
    let (_upstream, gateway) = setup(&["echo"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (_, text) = stream_text(&gateway, &body).await;
    let usage_line = text.lines().find(|l| l.contains("prompt_tokens")).expect("usage chunk");
    let chunk: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    assert_eq!(chunk["usage"]["prompt_tokens"], UPSTREAM_PROMPT_TOKENS);
    assert_eq!(chunk["choices"], json!([]));
}

#[tokio::test]
async fn usage_on_the_last_content_chunk_is_metered_and_hidden() {
    let (_upstream, gateway) = setup(&["usage-on-last"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    let (_, text) = stream_text(&gateway, &body).await;
    assert!(text.contains("finish_reason\":\"stop"));
    assert!(!text.contains("prompt_tokens"), "{text}");
    let labels = [("user", "alice"), ("backend", "usage-on-last"), ("kind", "prompt")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &labels).await, UPSTREAM_PROMPT_TOKENS as f64);
}

#[tokio::test]
async fn a_stream_longer_than_the_timeout_is_not_cut_while_the_backend_keeps_talking() {
    // 200 chunks 20 ms apart: 4 s in all, never silent for the 1 s timeout.
    let upstream = Upstream::start().await;
    let config = config_for(&upstream.base_url(), &["slow-stream"], "").replace("timeout_s = 10", "timeout_s = 1");
    let gateway = Gateway::start(&config, ENV).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("\"tok \"").count(), 200);
    assert!(!text.contains("upstream_timeout"));
    assert!(text.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_is_still_metered() {
    let (_upstream, gateway) = setup(&["slow-stream"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    let mut response = gateway.post("/v1/chat/completions", ALICE_KEY, &body).await;
    let mut received = 0;
    while received < 5 {
        let chunk = response.chunk().await.unwrap().expect("stream ended early");
        received += String::from_utf8_lossy(&chunk).matches("\"tok \"").count();
    }
    drop(response);

    let completion = [("user", "alice"), ("backend", "slow-stream"), ("kind", "completion")];
    let prompt = [("user", "alice"), ("backend", "slow-stream"), ("kind", "prompt")];
    let hung_up = [("backend", "slow-stream"), ("status", "499")];
    let mut metered = 0.0;
    for _ in 0..100 {
        metered = gateway.metric("tollgate_tokens_total", &completion).await;
        if metered > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counted locally (the upstream's usage chunk never came): at least what the client got,
    // far less than the 200 tokens the full answer would have had.
    assert!((received as f64..150.0).contains(&metered), "metered {metered} after receiving {received}");
    assert!(gateway.metric("tollgate_tokens_total", &prompt).await > 0.0);
    assert_eq!(gateway.metric("tollgate_requests_total", &hung_up).await, 1.0);
    assert_eq!(gateway.metric("tollgate_usage_estimated_total", &[("backend", "slow-stream")]).await, 1.0);
    assert_eq!(gateway.metric("tollgate_backend_in_flight", &[("backend", "slow-stream")]).await, 0.0);
}

#[tokio::test]
async fn a_client_that_hangs_up_right_after_done_is_a_complete_answer_not_a_499() {
    // llama.cpp keeps its side open a moment after `[DONE]`; the OpenAI SDKs close theirs as
    // soon as they read it.
    let (_upstream, gateway) = setup(&["linger-after-done"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = tokio::time::Instant::now();
    let mut response = gateway.post("/v1/chat/completions", ALICE_KEY, &body).await;
    let mut text = String::new();
    while !text.contains("data: [DONE]") {
        let chunk = response.chunk().await.unwrap().expect("stream ended before [DONE]");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);

    let complete = [("backend", "linger-after-done"), ("status", "200")];
    let hung_up = [("backend", "linger-after-done"), ("status", "499")];
    let mut answered = 0.0;
    while answered == 0.0 && started.elapsed() < LINGER_AFTER_DONE - Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        answered = gateway.metric("tollgate_requests_total", &complete).await;
    }
    assert_eq!(answered, 1.0, "settled as complete when the client left, before the backend closed");
    assert_eq!(gateway.metric("tollgate_requests_total", &hung_up).await, 0.0);
    assert_eq!(gateway.metric("tollgate_usage_estimated_total", &[("backend", "linger-after-done")]).await, 0.0);
    let completion = [("user", "alice"), ("backend", "linger-after-done"), ("kind", "completion")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &completion).await, UPSTREAM_COMPLETION_TOKENS as f64);
}

#[tokio::test]
async fn a_backend_without_usage_is_counted_locally() {
    let (_upstream, gateway) = setup(&["no-usage"]).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    let completion = [("user", "alice"), ("backend", "no-usage"), ("kind", "completion")];
    // "hello from upstream": 19 characters, about 5 tokens.
    assert_eq!(gateway.metric("tollgate_tokens_total", &completion).await, 5.0);
    assert_eq!(gateway.metric("tollgate_usage_estimated_total", &[("backend", "no-usage")]).await, 1.0);
}

#[tokio::test]
async fn completions_and_embeddings_are_proxied_and_metered() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let response = gateway
        .post("/v1/completions", BOB_KEY, &json!({"model": "auto", "prompt": "Once upon", "max_tokens": 5}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["text"], "hello from upstream");

    let response = gateway.post("/v1/embeddings", BOB_KEY, &json!({"model": "auto", "input": "hello"})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));

    let paths: Vec<String> = upstream.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/v1/completions", "/v1/embeddings"]);
    let prompt = [("user", "bob"), ("backend", "echo"), ("kind", "prompt")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &prompt).await, (UPSTREAM_PROMPT_TOKENS + 3) as f64);
}

#[tokio::test]
async fn the_models_list_shows_routes_and_backends_to_a_known_key_only() {
    let (_upstream, gateway) = setup(&["echo", "fail"]).await;
    let client = reqwest::Client::new();
    let response = client.get(gateway.url("/v1/models")).bearer_auth(ALICE_KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["auto", "echo", "fail"]);
    assert_eq!(body["object"], "list");
    let response = client.get(gateway.url("/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_pinned_backend_is_used_directly() {
    let (upstream, gateway) = setup(&["echo", "no-usage"]).await;
    let response = gateway.post("/v1/chat/completions", BOB_KEY, &chat("no-usage")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "no-usage");
    assert_eq!(response.headers()["x-tollgate-reason"], "pinned");
    assert_eq!(upstream.seen()[0].body["model"], "no-usage");
}

#[tokio::test]
async fn a_failing_backend_falls_back_to_the_next_candidate_before_any_byte() {
    let upstream = Upstream::start().await;
    let extra = "[[routes]]\nmodel = \"resilient\"\nbackends = [\"fail\", \"echo\"]\n";
    let config = config_for(&upstream.base_url(), &["echo", "fail"], extra);
    // Make `fail` the better candidate so quality-first tries it first.
    let config = config.replacen("model = \"fail\"\nquality = 0.9", "model = \"fail\"\nquality = 0.95", 1);
    let gateway = Gateway::start(&config, ENV).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("resilient")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "echo");
    assert_eq!(response.headers()["x-tollgate-reason"], "fallback:fail");
    let failures = [("backend", "fail"), ("kind", "status")];
    assert_eq!(gateway.metric("tollgate_upstream_failures_total", &failures).await, 1.0);
}

#[tokio::test]
async fn the_embedded_demo_config_splits_users_between_simulated_backends() {
    let gateway = Gateway::start(tollgate::config::EMBEDDED_DEFAULT, &[]).await;
    let quality = gateway.post("/v1/chat/completions", "tg-demo-quality-key", &chat("auto")).await;
    assert_eq!(quality.headers()["x-tollgate-backend"], "sim-premium");
    let body: Value = quality.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"].as_str().unwrap().starts_with("Premium answer"));
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let mut streamed = chat("auto");
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let cheap = gateway.post("/v1/chat/completions", "tg-demo-cost-key", &streamed).await;
    assert_eq!(cheap.headers()["x-tollgate-backend"], "sim-cpu");
    assert_eq!(cheap.headers()["x-tollgate-reason"], "cost-first");
    let text = cheap.text().await.unwrap();
    assert!(text.contains("Cheap "), "{text}");
    assert!(text.contains("\"completion_tokens\":"), "usage chunk passed on: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let (_upstream, mut gateway) = setup(&["slow-stream"]).await;
    let mut body = chat("auto");
    body["stream"] = json!(true);
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &body).await;
    assert_eq!(response.status(), 200);
    gateway.shutdown();
    // New connections are refused or answered 503 while draining; the open stream completes.
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("\"tok \"").count(), 200);
    assert!(text.ends_with("data: [DONE]\n\n"));
    let task = gateway.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
}
