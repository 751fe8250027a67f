//! A real process: SIGTERM lets streams finish and persists their cost; no secret ever shows
//! in logs (at trace level), the access log, error bodies, metrics or admin answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::process::Process;
use support::*;

fn sqlite_config(extra_backend: &str) -> String {
    format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\nshutdown_grace_s = 10\n\n\
         [ledger]\nbackend = \"sqlite\"\npath = \"ledger.db\"\n\n\
         [[backends]]\nname = \"sim\"\nsimulate = {{ ttft_ms = 1, tokens_per_s = 10, quality_text = \"one two three four five six seven eight nine ten\" }}\n\
         model = \"sim\"\nquality = 0.5\npricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n\
         {extra_backend}\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\nbudget_usd = 5\n\n\
         [[users]]\nname = \"bob\"\nkey_sha256 = \"{}\"\n",
        key_hash(ALICE_KEY),
        key_hash(BOB_KEY)
    )
}

#[tokio::test]
async fn sigterm_lets_a_stream_finish_persists_its_cost_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), sqlite_config("")).unwrap();
    let env = [("TEST_ADMIN_KEY", ADMIN_KEY)];
    let mut first = Process::start(dir.path(), &env);
    let client = reqwest::Client::new();
    let body = json!({"model": "sim", "stream": true, "messages": [{"role": "user", "content": "count"}]});
    let mut stream =
        client.post(first.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&body).send().await.unwrap();
    let mut text = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();

    let pid = first.child.id();
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client.get(first.url("/healthz")).timeout(Duration::from_secs(1)).send().await;
    assert!(refused.is_err(), "no new connections after SIGTERM");
    while let Some(chunk) = stream.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "the in-flight stream finished: {text}");
    assert_eq!(text.matches("\"content\"").count(), 10);
    let status = first.signal_and_wait("0", Duration::from_secs(5)).expect("exited within the grace period");
    assert!(status.success(), "{status:?}");
    assert!(first.log_text().contains("shutting down"));

    let second = Process::start(dir.path(), &env);
    let usage: Value =
        client.get(second.url("/admin/usage/alice")).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["requests"], 1, "the stream's cost was settled and persisted before exit");
    assert_eq!(usage["completion_tokens"], 10);
}

#[tokio::test]
async fn secrets_never_reach_logs_error_bodies_metrics_or_admin_answers() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let real = format!(
        "[[backends]]\nname = \"real\"\nbase_url = \"{}\"\napi_key_env = \"TEST_BACKEND_KEY\"\nmodel = \"echo\"\n\
         quality = 0.9\npricing = {{ input_per_mtok = 1, output_per_mtok = 1 }}\n\n\
         [[backends]]\nname = \"dead\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key_env = \"TEST_BACKEND_KEY\"\n\
         model = \"dead\"\nquality = 0.9\npricing = {{ input_per_mtok = 1, output_per_mtok = 1 }}\n\n",
        upstream.base_url()
    );
    let config = format!("{}\n[telemetry]\naccess_log = \"json\"\n", sqlite_config(&real));
    std::fs::write(dir.path().join("tollgate.toml"), &config).unwrap();
    let env = [("TEST_ADMIN_KEY", ADMIN_KEY), ("TEST_BACKEND_KEY", BACKEND_KEY), ("TOLLGATE_LOG", "trace")];
    let process = Process::start(dir.path(), &env);
    let client = reqwest::Client::new();
    let near_miss = format!("{}X", &ALICE_KEY[..ALICE_KEY.len() - 1]);
    let mut bodies = Vec::new();
    for (key, model, stream) in [
        (ALICE_KEY, "real", false),
        (ALICE_KEY, "real", true),
        (BOB_KEY, "dead", false),
        (near_miss.as_str(), "real", false),
        (ADMIN_KEY, "real", false),
    ] {
        let body = json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        let response =
            client.post(process.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
        bodies.push(response.text().await.unwrap());
    }
    for key in [ALICE_KEY, "wrong-admin-key", ADMIN_KEY] {
        let response = client.get(process.url("/admin/usage")).bearer_auth(key).send().await.unwrap();
        bodies.push(response.text().await.unwrap());
        let response = client.get(process.url("/admin/requests")).bearer_auth(key).send().await.unwrap();
        bodies.push(response.text().await.unwrap());
    }
    // A broken reload is logged with the config's problems.
    std::fs::write(dir.path().join("tollgate.toml"), config.replace("model = \"echo\"", "modle = \"echo\"")).unwrap();
    let reload = client.post(process.url("/admin/reload")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(reload.status(), 400);
    bodies.push(reload.text().await.unwrap());
    let metrics = client.get(process.url("/metrics")).send().await.unwrap().text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = process.log_text();
    let access_log = process.access_lines(5).join("\n");
    assert!(access_log.contains("\"status\":401"), "the access log is on: {access_log}");
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "the log ran at trace level");
    assert!(upstream.seen().iter().all(|s| s.authorization.as_deref() == Some(&*format!("Bearer {BACKEND_KEY}"))));

    let secrets = [ALICE_KEY, BOB_KEY, ADMIN_KEY, BACKEND_KEY, &near_miss];
    let hashes = [key_hash(ALICE_KEY), key_hash(BOB_KEY), key_hash(ADMIN_KEY)];
    for (place, text) in [("log", &log), ("access log", &access_log), ("metrics", &metrics)]
        .into_iter()
        .chain(bodies.iter().map(|b| ("an answer", b)))
    {
        for secret in secrets.iter().copied().chain(hashes.iter().map(String::as_str)) {
            assert!(!text.contains(secret), "a secret ({}…) appears in {place}:\n{text}", &secret[..6]);
        }
    }
}
