//! Upstream faults: cut streams, silence, resets, slow heads, malformed SSE. The client always
//! sees a clear end, is never left hanging past the backend's timeout, and what was generated
//! is metered; the gateway keeps serving others and the circuit breaker sees the faults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::faults::FaultyUpstream;
use support::*;
use tokio::time::Instant;

/// One backend per fault model on the faulty upstream (1 s timeout), plus `healthy` on a
/// normal upstream; user alice.
async fn setup(faults: &[&str]) -> (FaultyUpstream, Upstream, Gateway) {
    let faulty = FaultyUpstream::start().await;
    let healthy = Upstream::start().await;
    let mut config = format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n[[backends]]\nname = \"healthy\"\nbase_url = \"{}\"\n\
         model = \"echo\"\nquality = 0.5\npricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n",
        healthy.base_url()
    );
    for fault in faults {
        config.push_str(&format!(
            "[[backends]]\nname = \"{fault}\"\nbase_url = \"{}\"\nmodel = \"{fault}\"\nquality = 0.9\ntimeout_s = 1\n\
             pricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n",
            faulty.base_url()
        ));
    }
    let candidates: Vec<String> = faults.iter().map(|f| format!("\"{f}\"")).chain(["\"healthy\"".to_owned()]).collect();
    config.push_str(&format!("[[routes]]\nmodel = \"auto\"\nbackends = [{}]\n\n", candidates.join(", ")));
    config.push_str(&format!("[[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n", key_hash(ALICE_KEY)));
    let gateway = Gateway::start(&config, ENV).await;
    (faulty, healthy, gateway)
}

fn stream(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

/// The last SSE event of a stream, parsed.
fn last_event(text: &str) -> Value {
    let last = text.trim_end().lines().rfind(|l| l.starts_with("data: ")).unwrap();
    serde_json::from_str(last.trim_start_matches("data: ")).unwrap_or(Value::Null)
}

async fn completion_tokens(gateway: &Gateway, backend: &str) -> f64 {
    gateway.metric("tollgate_tokens_total", &[("user", "alice"), ("backend", backend), ("kind", "completion")]).await
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_and_what_was_generated_is_metered() {
    let (_faulty, _healthy, gateway) = setup(&["cut"]).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &stream("cut")).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("\"tok \"").count(), 3);
    assert!(!text.contains("[DONE]") && !text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert_eq!(last_event(&text)["error"]["code"], "upstream_error");
    assert_eq!(completion_tokens(&gateway, "cut").await, 3.0, "counted locally: three tokens reached the client");
    assert_eq!(gateway.metric("tollgate_requests_total", &[("backend", "cut"), ("status", "502")]).await, 1.0);
}

#[tokio::test]
async fn a_stream_that_ends_without_done_is_reported_as_broken_but_its_usage_is_kept() {
    let (_faulty, _healthy, gateway) = setup(&["eof-no-done"]).await;
    let text = gateway.post("/v1/chat/completions", ALICE_KEY, &stream("eof-no-done")).await.text().await.unwrap();
    assert_eq!(last_event(&text)["error"]["code"], "upstream_error");
    assert_eq!(completion_tokens(&gateway, "eof-no-done").await, 3.0, "the backend's own usage");
    assert_eq!(
        gateway
            .metric("tollgate_tokens_total", &[("user", "alice"), ("backend", "eof-no-done"), ("kind", "prompt")])
            .await,
        5.0
    );
}

#[tokio::test]
async fn silence_mid_stream_is_cut_after_the_timeout() {
    let (_faulty, _healthy, gateway) = setup(&["stall-mid"]).await;
    let started = Instant::now();
    let text = gateway.post("/v1/chat/completions", ALICE_KEY, &stream("stall-mid")).await.text().await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(last_event(&text)["error"]["code"], "upstream_timeout");
    assert_eq!(completion_tokens(&gateway, "stall-mid").await, 2.0);
}

#[tokio::test]
async fn silence_before_the_first_byte_is_a_504_within_the_timeout() {
    let (_faulty, _healthy, gateway) = setup(&["stall-head", "slow-headers"]).await;
    for model in ["stall-head", "slow-headers"] {
        let started = Instant::now();
        let response = gateway.post("/v1/chat/completions", ALICE_KEY, &stream(model)).await;
        assert_eq!(response.status(), 504, "{model}");
        assert!(started.elapsed() < Duration::from_secs(3), "{model} took {:?}", started.elapsed());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_timeout");
    }
}

#[tokio::test]
async fn a_connection_reset_is_a_502_and_a_routed_request_falls_back_to_the_next_backend() {
    let (_faulty, _healthy, gateway) = setup(&["reset"]).await;
    let pinned = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("reset")).await;
    assert_eq!(pinned.status(), 502);
    let body: Value = pinned.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    let routed = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(routed.status(), 200);
    assert_eq!(routed.headers()["x-tollgate-backend"], "healthy");
    assert_eq!(routed.headers()["x-tollgate-reason"], "fallback:reset");
}

#[tokio::test]
async fn malformed_sse_lines_pass_without_hanging_and_the_stream_ends_normally() {
    let (_faulty, _healthy, gateway) = setup(&["bad-sse"]).await;
    let body = stream("bad-sse");
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &body);
    let text =
        tokio::time::timeout(Duration::from_secs(3), async { response.await.text().await.unwrap() }).await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(completion_tokens(&gateway, "bad-sse").await, 3.0);
}

#[tokio::test]
async fn faults_open_the_circuit_while_other_backends_keep_serving() {
    let (faulty, _healthy, gateway) = setup(&["stall-head"]).await;
    let stalls: Vec<_> = (0..3)
        .map(|_| {
            let url = gateway.url("/v1/chat/completions");
            tokio::spawn(async move {
                reqwest::Client::new().post(url).bearer_auth(ALICE_KEY).json(&chat("stall-head")).send().await.unwrap()
            })
        })
        .collect();
    // While three requests hang on the stalled backend, another is answered at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let healthy = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("healthy")).await;
    assert_eq!(healthy.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    for stall in stalls {
        assert_eq!(stall.await.unwrap().status(), 504);
    }
    assert_eq!(gateway.metric("tollgate_backend_up", &[("backend", "stall-head")]).await, 0.0);
    let before = faulty.requests();
    let refused = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("stall-head")).await;
    assert_eq!(refused.status(), 503, "circuit open: refused at once");
    assert_eq!(faulty.requests(), before, "no traffic to an open circuit");
}

#[tokio::test]
async fn a_backend_that_says_the_prompt_is_too_long_escalates_to_a_larger_one() {
    let upstream = Upstream::start().await;
    let config = format!(
        "[[backends]]\nname = \"small\"\nbase_url = \"{0}\"\nmodel = \"tiny-context\"\nquality = 0.4\n\
         pricing = {{ hourly_usd = 0.1 }}\n\n\
         [[backends]]\nname = \"large\"\nbase_url = \"{0}\"\nmodel = \"echo\"\nquality = 0.9\n\
         pricing = {{ input_per_mtok = 100, output_per_mtok = 100 }}\n\n\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"small\", \"large\"]\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{1}\"\npolicy = \"cost-first\"\n",
        upstream.base_url(),
        key_hash(ALICE_KEY)
    );
    let gateway = Gateway::start(&config, ENV).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-backend"], "large");
    assert_eq!(response.headers()["x-tollgate-reason"], "escalated:context");
    assert_eq!(gateway.metric("tollgate_backend_up", &[("backend", "small")]).await, 1.0, "not a health failure");
    // Pinned to the small one, its own 400 comes back unchanged.
    let pinned = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("small")).await;
    assert_eq!(pinned.status(), 400);
    assert!(pinned.text().await.unwrap().contains("exceed_context_size_error"));
}

#[tokio::test]
async fn a_501_for_an_endpoint_the_backend_lacks_is_passed_through_and_does_not_open_its_circuit() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_for(&upstream.base_url(), &["not-implemented"], ""), ENV).await;
    for _ in 0..4 {
        let response = gateway.post("/v1/embeddings", ALICE_KEY, &json!({"model": "auto", "input": "x"})).await;
        assert_eq!(response.status(), 501);
    }
    assert_eq!(gateway.metric("tollgate_backend_up", &[("backend", "not-implemented")]).await, 1.0);
    assert_eq!(upstream.seen().len(), 4, "every request still reached the backend");
}
