//! The admin API, config reload (admin call, file change) and durability of spend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::process::Process;
use support::*;

fn priced_config(upstream: &str, output_per_mtok: u32) -> String {
    format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n\
         [[backends]]\nname = \"gpu\"\nbase_url = \"{upstream}\"\nmodel = \"echo\"\nquality = 0.9\n\
         pricing = {{ input_per_mtok = 0, output_per_mtok = {output_per_mtok} }}\n\n\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\nbudget_usd = 100\n",
        key_hash(ALICE_KEY)
    )
}

async fn cost_of_one(gateway: &Gateway) -> String {
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
    response.headers()["x-tollgate-cost-usd"].to_str().unwrap().to_owned()
}

async fn admin_reload(gateway: &Gateway) -> reqwest::Response {
    reqwest::Client::new().post(gateway.url("/admin/reload")).bearer_auth(ADMIN_KEY).send().await.unwrap()
}

#[tokio::test]
async fn a_price_change_by_reload_applies_to_the_next_request_and_spend_carries_over() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, priced_config(&upstream.base_url(), 1000)).unwrap();
    let gateway = Gateway::start_from(&priced_config(&upstream.base_url(), 1000), ENV, Some(path.clone())).await;
    assert_eq!(cost_of_one(&gateway).await, "0.007");

    std::fs::write(&path, priced_config(&upstream.base_url(), 3000)).unwrap();
    let response = admin_reload(&gateway).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "reloaded");
    assert_eq!(cost_of_one(&gateway).await, "0.021");
    let usage = gateway.usage("alice").await;
    assert_eq!(usage["spent_usd"], 0.028, "spend from before the reload is kept");
    assert_eq!(gateway.metric("tollgate_config_reloads_total", &[("result", "success")]).await, 1.0);
}

#[tokio::test]
async fn a_broken_reload_is_refused_with_the_check_message_and_the_old_config_keeps_serving() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let good = priced_config(&upstream.base_url(), 1000);
    std::fs::write(&path, &good).unwrap();
    let gateway = Gateway::start_from(&good, ENV, Some(path.clone())).await;

    std::fs::write(&path, good.replace("quality = 0.9", "quality = 9").replace("model = \"echo\"", "modle = \"echo\""))
        .unwrap();
    let response = admin_reload(&gateway).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    let file = path.display();
    assert!(
        message.contains(&format!("{file}:7: backends[0].modle: unknown key `modle` (did you mean `model`?)")),
        "{message}"
    );
    assert!(message.contains(&format!("{file}:8: backends[0].quality: must be between 0 and 1, got 9")), "{message}");
    assert_eq!(body["error"]["code"], "config_invalid");
    assert_eq!(cost_of_one(&gateway).await, "0.007", "old config still serving");
    assert_eq!(gateway.metric("tollgate_config_reloads_total", &[("result", "failure")]).await, 1.0);
}

#[tokio::test]
async fn an_edited_config_file_is_reloaded_by_itself() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, priced_config(&upstream.base_url(), 1000)).unwrap();
    let gateway = Gateway::start_from(&priced_config(&upstream.base_url(), 1000), ENV, Some(path.clone())).await;
    tollgate::reload::spawn_watchers(&gateway.state);
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&path, priced_config(&upstream.base_url(), 2000)).unwrap();
    let mut cost = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gateway.metric("tollgate_config_reloads_total", &[("result", "success")]).await == 1.0 {
            cost = cost_of_one(&gateway).await;
            break;
        }
    }
    assert_eq!(cost, "0.014");
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_key_and_reports_usage_per_user_and_backend() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config_for(&upstream.base_url(), &["echo"], ""), ENV).await;
    gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    let client = reqwest::Client::new();
    for key in [Some(ALICE_KEY), Some("wrong"), None] {
        let mut request = client.get(gateway.url("/admin/usage"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        assert_eq!(request.send().await.unwrap().status(), 401);
    }
    let all: Value =
        client.get(gateway.url("/admin/usage")).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap();
    let users: Vec<&str> = all["data"].as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(users, ["alice", "bob"]);
    let alice = gateway.usage("alice").await;
    assert_eq!(alice["requests"], 1);
    assert_eq!(alice["prompt_tokens"], UPSTREAM_PROMPT_TOKENS);
    assert_eq!(alice["completion_tokens"], UPSTREAM_COMPLETION_TOKENS);
    assert_eq!(alice["by_backend"]["echo"]["requests"], 1);
    assert_eq!(alice["budget_usd"], Value::Null);
    assert_eq!(alice["remaining_usd"], Value::Null);
    // 11 * $1/M + 7 * $2/M
    assert_eq!(alice["spent_usd"], 0.000025);
    let missing = client.get(gateway.url("/admin/usage/nobody")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // A request pinned to a backend names the backend as its route.
    gateway.post("/v1/chat/completions", ALICE_KEY, &chat("echo")).await;
    let records: Value =
        client.get(gateway.url("/admin/requests")).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap();
    let record = &records["data"][0];
    assert_eq!(record["user"], "alice");
    assert_eq!(record["route"], "auto");
    assert_eq!(record["backend"], "echo");
    assert_eq!(record["reason"], "quality-first");
    assert_eq!(record["status"], 200);
    assert_eq!(record["completion_tokens"], UPSTREAM_COMPLETION_TOKENS);
    assert_eq!(record["cost_usd"], 0.000025);
    assert_eq!(records["data"][1]["route"], "echo");
    assert_eq!(records["data"][1]["backend"], "echo");
}

#[tokio::test]
async fn without_an_admin_key_the_admin_api_is_closed() {
    let gateway = Gateway::start(tollgate::config::EMBEDDED_DEFAULT, &[]).await;
    let response =
        reqwest::Client::new().get(gateway.url("/admin/usage")).bearer_auth("anything").send().await.unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn spend_survives_kill_9_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n[ledger]\nbackend = \"sqlite\"\npath = \"data/ledger.db\"\n\n\
         [[backends]]\nname = \"sim\"\nsimulate = {{ ttft_ms = 1, tokens_per_s = 5000, quality_text = \"one two three four five\" }}\n\
         model = \"sim\"\nquality = 0.5\npricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n\
         [[backends]]\nname = \"slow-sim\"\nsimulate = {{ ttft_ms = 1, tokens_per_s = 2, quality_text = \"a b c d e f g h\" }}\n\
         model = \"slow-sim\"\nquality = 0.5\npricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"sim\"]\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\nbudget_usd = 1\nbudget_period = \"day\"\n",
        key_hash(ALICE_KEY)
    );
    std::fs::write(dir.path().join("tollgate.toml"), config).unwrap();
    let client = reqwest::Client::new();
    let usage = |p: &Process| client.get(p.url("/admin/usage/alice")).bearer_auth(ADMIN_KEY).send();

    let mut first = Process::start(dir.path(), &[("TEST_ADMIN_KEY", ADMIN_KEY)]);
    for _ in 0..5 {
        let response = client.post(first.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&chat("auto")).send();
        assert_eq!(response.await.unwrap().status(), 200);
    }
    let before: Value = usage(&first).await.unwrap().json().await.unwrap();
    assert_eq!(before["requests"], 5);
    // A stream in flight at the crash: its reservation must not survive it.
    let mut streamed = chat("slow-sim");
    streamed["stream"] = serde_json::json!(true);
    let mut in_flight =
        client.post(first.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&streamed).send().await.unwrap();
    in_flight.chunk().await.unwrap().expect("first chunk");
    let during: Value = usage(&first).await.unwrap().json().await.unwrap();
    assert!(during["reserved_usd"].as_f64().unwrap() > 0.0);
    // The group-commit window is 20 ms; give it ample time, then kill without any warning.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = Process::start(dir.path(), &[("TEST_ADMIN_KEY", ADMIN_KEY)]);
    let after: Value = usage(&second).await.unwrap().json().await.unwrap();
    let second_url = second.url("/admin/requests");
    let records: Value = client.get(&second_url).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap();
    drop(second);
    assert_eq!(records["data"].as_array().unwrap().len(), 5, "one record per settled request, kept across the crash");
    for field in ["spent_usd", "requests", "prompt_tokens", "completion_tokens", "by_backend"] {
        assert_eq!(after[field], before[field], "{field} after a restart");
    }
    assert_eq!(after["reserved_usd"], 0.0);
}
