//! Every error a client can meet, in the OpenAI error shape with the right status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{json, Value};
use support::*;

/// Asserts the OpenAI error shape and returns the `error` object.
async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "error.{field} missing in {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(!body.to_string().contains(BACKEND_KEY), "a backend key leaked: {body}");
    error
}

async fn setup(models: &[&str]) -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_for(&upstream.base_url(), models, ""), ENV).await;
    (upstream, gateway)
}

async fn post_raw(gateway: &Gateway, key: Option<&str>, body: impl Into<reqwest::Body>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn malformed_json_is_a_400_and_nothing_goes_upstream() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let error = openai_error(post_raw(&gateway, Some(ALICE_KEY), "{\"model\": \"auto\",").await, 400).await;
    assert_eq!(error["type"], "invalid_request_error");
    assert!(error["message"].as_str().unwrap().contains("not valid JSON"));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_missing_model_or_messages_is_a_400_naming_the_field() {
    let (_upstream, gateway) = setup(&["echo"]).await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &body).await, 400).await;
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains("`model`"));

    let error =
        openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &json!({"model": "auto"})).await, 400).await;
    assert_eq!(error["param"], "messages");
    let error = openai_error(gateway.post("/v1/completions", ALICE_KEY, &json!({"model": "auto"})).await, 400).await;
    assert_eq!(error["param"], "prompt");
    let error = openai_error(gateway.post("/v1/embeddings", ALICE_KEY, &json!({"model": "auto"})).await, 400).await;
    assert_eq!(error["param"], "input");
}

#[tokio::test]
async fn a_bad_or_missing_key_is_a_401() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let error = openai_error(gateway.post("/v1/chat/completions", "sk-wrong", &chat("auto")).await, 401).await;
    assert_eq!(error["code"], "invalid_api_key");
    assert!(!error.to_string().contains("sk-wrong"), "the key is echoed back");
    let error = openai_error(post_raw(&gateway, None, chat("auto").to_string()).await, 401).await;
    assert!(error["message"].as_str().unwrap().contains("missing API key"));
    // Key checks are exact: the right key with different case or padding is refused.
    let error = gateway.post("/v1/chat/completions", &ALICE_KEY.to_uppercase(), &chat("auto")).await;
    openai_error(error, 401).await;
    assert!(upstream.seen().is_empty());
    assert_eq!(gateway.metric("tollgate_rejected_requests_total", &[("code", "invalid_api_key")]).await, 3.0);
}

#[tokio::test]
async fn an_unknown_model_is_a_404() {
    let (_upstream, gateway) = setup(&["echo"]).await;
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &chat("gpt-9")).await, 404).await;
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    assert!(error["message"].as_str().unwrap().contains("gpt-9"));
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let (upstream, gateway) = setup(&["echo"]).await;
    let big = json!({"model": "auto", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &big).await, 413).await;
    assert_eq!(error["code"], "request_too_large");
    // Without a declared length (chunked), the limit still holds.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.to_string())];
    let body = reqwest::Body::wrap_stream(futures_stream_of(chunks));
    openai_error(post_raw(&gateway, Some(ALICE_KEY), body).await, 413).await;
    assert!(upstream.seen().is_empty());
}

fn futures_stream_of(
    items: Vec<Result<String, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<String, std::io::Error>> + Send + 'static {
    struct Iter(std::vec::IntoIter<Result<String, std::io::Error>>);
    impl futures_core::Stream for Iter {
        type Item = Result<String, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn an_upstream_that_refuses_connections_is_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gateway = Gateway::start(&config_for(&format!("http://127.0.0.1:{port}/v1"), &["echo"], ""), ENV).await;
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await, 502).await;
    assert_eq!(error["code"], "upstream_error");
    assert!(!error["message"].as_str().unwrap().contains("127.0.0.1"), "no internal address in errors");
}

#[tokio::test]
async fn an_upstream_that_fails_is_a_502_without_its_internals() {
    let (_upstream, gateway) = setup(&["fail"]).await;
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await, 502).await;
    assert!(!error.to_string().contains("exploded"));
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_a_504() {
    let upstream = Upstream::start().await;
    let config = config_for(&upstream.base_url(), &["hang"], "").replace("timeout_s = 10", "timeout_s = 1");
    let gateway = Gateway::start(&config, ENV).await;
    let started = tokio::time::Instant::now();
    let error = openai_error(gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await, 504).await;
    assert_eq!(error["code"], "upstream_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn an_upstream_4xx_error_body_is_passed_through_unchanged() {
    let (_upstream, gateway) = setup(&["bad-request"]).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-tollgate-backend"], "bad-request");
    assert_eq!(response.text().await.unwrap(), UPSTREAM_ERROR_BODY);
    let refused = [("backend", "bad-request"), ("status", "400")];
    assert_eq!(gateway.metric("tollgate_requests_total", &refused).await, 1.0);
    let prompt = [("user", "alice"), ("backend", "bad-request"), ("kind", "prompt")];
    assert_eq!(gateway.metric("tollgate_tokens_total", &prompt).await, 0.0, "a refusal uses no tokens");
}

#[tokio::test]
async fn an_unknown_path_is_a_404_in_the_openai_shape() {
    let (_upstream, gateway) = setup(&["echo"]).await;
    let response = reqwest::get(gateway.url("/v1/assistants")).await.unwrap();
    openai_error(response, 404).await;
}
