//! `/metrics`: the fixed names dashboards rely on, valid for `promtool check metrics`, and a
//! `user` label that only ever holds configured user names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn metrics_pass_promtool_and_carry_the_fixed_families() {
    let upstream = Upstream::start().await;
    let extra = "[[backends]]\nname = \"cpu\"\nsimulate = { ttft_ms = 1, tokens_per_s = 1000 }\nmodel = \"cpu-sim\"\n\
                 quality = 0.4\npricing = { hourly_usd = 0.5 }\n";
    let config = config_for(&upstream.base_url(), &["echo"], extra)
        .replace("name = \"alice\"\n", "name = \"alice\"\nbudget_usd = 5\n");
    let gateway = Gateway::start(&config, ENV).await;
    gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await.text().await.unwrap();
    let mut streamed = chat("auto");
    streamed["stream"] = json!(true);
    gateway.post("/v1/chat/completions", ALICE_KEY, &streamed).await.text().await.unwrap();
    gateway.post("/v1/chat/completions", BOB_KEY, &chat("cpu")).await.text().await.unwrap();
    // A stranger's key must not become a label value.
    gateway.post("/v1/chat/completions", "sk-stranger", &chat("auto")).await.text().await.unwrap();
    gateway.post("/v1/chat/completions", ALICE_KEY, &json!({"model": "nope", "messages": []})).await;

    let text = gateway.metrics().await;
    for family in [
        "tollgate_cost_usd_total{backend=\"echo\",user=\"alice\"}",
        "tollgate_tokens_total{backend=\"echo\",kind=\"prompt\",user=\"alice\"}",
        "tollgate_tokens_total{backend=\"cpu\",kind=\"completion\",user=\"bob\"}",
        "tollgate_budget_remaining_usd{user=\"alice\"}",
        "tollgate_requests_total{backend=\"echo\",reason=\"quality-first\",status=\"200\",tier=\"quality\"}",
        "tollgate_requests_total{backend=\"cpu\",reason=\"pinned\",status=\"200\",tier=\"default\"}",
        "tollgate_idle_cost_usd_total{backend=\"cpu\"}",
        "tollgate_request_duration_seconds_bucket{backend=\"echo\",le=\"0.005\"}",
        "tollgate_time_to_first_token_seconds_count{backend=\"echo\"}",
        "tollgate_overhead_seconds_count{endpoint=\"chat_completions\"}",
        "tollgate_backend_in_flight{backend=\"cpu\"}",
        "tollgate_backend_up{backend=\"echo\"}",
        "tollgate_savings_usd_total{user=\"alice\"}",
        "tollgate_rejected_requests_total{code=\"invalid_api_key\"}",
    ] {
        assert!(text.lines().any(|l| l.starts_with(family)), "missing {family} in:\n{text}");
    }
    let users: Vec<&str> =
        text.lines().filter_map(|l| l.split("user=\"").nth(1)).map(|r| r.split('"').next().unwrap()).collect();
    assert!(users.iter().all(|u| ["alice", "bob"].contains(u)), "{users:?}");
    assert!(!text.contains("sk-"), "no key material in metrics");

    promtool_accepts(&text);
}
