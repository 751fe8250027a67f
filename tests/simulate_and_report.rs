//! `tollgate simulate` on the shipped trace and policies (stable numbers), and
//! `tollgate report` on a SQLite ledger filled by real requests through the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::{chat, config_for, Gateway, Upstream, ALICE_KEY, BOB_KEY, ENV};

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate")).args(args).output().unwrap()
}

fn stdout_json(output: &Output) -> Value {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

const COMPARE: &[&str] = &[
    "simulate",
    "--config",
    "examples/policies/quality-first.toml",
    "--compare",
    "examples/policies/cost-first.toml",
    "--compare",
    "examples/policies/paced.toml",
    "--trace",
    "examples/traces/month.jsonl",
];

fn user<'a>(json: &'a Value, config: usize, name: &str) -> &'a Value {
    json["configs"][config]["users"].as_array().unwrap().iter().find(|u| u["user"] == name).unwrap()
}

fn usd(value: &Value) -> f64 {
    value.as_f64().unwrap()
}

#[test]
fn simulate_compares_the_shipped_policies_on_the_shipped_trace_with_stable_numbers() {
    let json = stdout_json(&tollgate(&[COMPARE, &["--json"]].concat()));
    let names: Vec<&str> = json["configs"].as_array().unwrap().iter().map(|c| c["config"].as_str().unwrap()).collect();
    assert_eq!(names, ["quality-first", "cost-first", "paced"]);
    let (quality, cost, paced) = (0, 1, 2);

    // The enterprise tenant: quality-first spends the month's budget by the 23rd and is then
    // refused; cost-first serves everything for a third of it; paced lasts until the last day.
    let acme = |c| user(&json, c, "acme");
    assert_eq!((acme(quality)["requests"].as_u64(), acme(quality)["served"].as_u64()), (Some(1066), Some(777)));
    assert_eq!(acme(quality)["refusals"]["budget_exceeded"], 289);
    assert_eq!(acme(quality)["budget_exhausted_at"], "2026-03-23T17:49:32Z");
    assert!((usd(&acme(quality)["spent_usd"]) - 5.0).abs() < 0.01);
    assert_eq!(acme(cost)["served"], 1066);
    assert!((usd(&acme(cost)["spent_usd"]) - 1.62).abs() < 0.01);
    assert_eq!(acme(paced)["served"], 1039);
    assert_eq!(acme(paced)["refusals"]["budget_exceeded"], 27);
    assert!(acme(paced)["budget_exhausted_at"].as_str().unwrap().starts_with("2026-03-31"));
    let share = |c| usd(&acme(c)["premium_token_share"]);
    assert!((share(quality) - 0.982).abs() < 0.001 && (share(cost) - 0.180).abs() < 0.001);
    assert!((share(paced) - 0.716).abs() < 0.001);

    // The bursty startup: its launch bursts exhaust quality-first on the 17th; paced never.
    let rocket = |c| user(&json, c, "rocket");
    assert_eq!(rocket(quality)["refusals"]["budget_exceeded"], 238);
    assert_eq!(rocket(paced)["served"], 632);
    assert_eq!(rocket(paced)["budget_exhausted_at"], Value::Null);
    assert_eq!(rocket(cost)["tiers"]["economy"]["requests"], 632);
    assert!((usd(&rocket(cost)["savings_usd"]) - 3.86).abs() < 0.01);

    // The free tier: a daily budget, refused some evenings under quality-first only.
    let free = |c| user(&json, c, "free");
    assert_eq!(free(quality)["refusals"]["budget_exceeded"], 23);
    assert_eq!(free(cost)["refusals"], serde_json::json!({}));
    assert_eq!(free(paced)["served"], 771);
    assert_eq!(free(cost)["spend_daily"].as_array().unwrap().len(), 31);
}

#[test]
fn simulate_prints_the_table_and_draws_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("spend.png");
    let output = tollgate(&[COMPARE, &["--plot", png.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("acme (budget $5.00 per month)"), "{table}");
    assert!(table.contains("289 budget_exceeded"), "{table}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let bad = tollgate(&["simulate", "--config", "examples/policies/paced.toml", "--trace", "Cargo.toml"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("Cargo.toml:1: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_reads_the_unit_economics_of_real_requests_from_the_sqlite_ledger() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    // Route `mix`: the per-token `echo` backend, and a cheap hourly CPU backend.
    let extra = format!(
        "[ledger]\nbackend = \"sqlite\"\npath = \"{}\"\n\n\
         [[backends]]\nname = \"cpu\"\ntier = \"economy\"\nbase_url = \"{}\"\nmodel = \"echo-cpu\"\nquality = 0.3\n\
         pricing = {{ hourly_usd = 0.036 }}\n\n\
         [[routes]]\nmodel = \"mix\"\nbackends = [\"echo\", \"cpu\"]\n",
        db.display(),
        upstream.base_url()
    );
    let text = config_for(&upstream.base_url(), &["echo"], &extra);
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, &text).unwrap();
    let gateway = Gateway::start(&text, ENV).await;
    for _ in 0..3 {
        let answer = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("mix")).await;
        assert_eq!(answer.headers()["x-tollgate-backend"], "echo");
    }
    for _ in 0..2 {
        let answer = gateway.post("/v1/chat/completions", BOB_KEY, &chat("mix")).await;
        assert_eq!(answer.headers()["x-tollgate-backend"], "cpu");
    }
    gateway.state.ledger.flush().await.unwrap();

    let trace = dir.path().join("trace.jsonl");
    let config_arg = config_path.to_str().unwrap();
    let json = stdout_json(&tollgate(&[
        "report",
        "--config",
        config_arg,
        "--json",
        "--export-trace",
        trace.to_str().unwrap(),
    ]));
    let users = json["users"].as_array().unwrap();
    let alice = users.iter().find(|u| u["user"] == "alice").unwrap();
    // 3 × (11 prompt × $1/M + 7 completion × $2/M) = $0.000075 on the route's premium backend.
    assert_eq!((alice["requests"].as_u64(), alice["prompt_tokens"].as_u64()), (Some(3), Some(33)));
    assert_eq!(alice["completion_tokens"], 21);
    assert!((usd(&alice["cost_usd"]) - 0.000_075).abs() < 1e-12, "{alice}");
    assert!((usd(&alice["cost_per_request_usd"]) - 0.000_025).abs() < 1e-12);
    assert_eq!(alice["premium_token_share"], 1.0);
    assert_eq!(alice["savings_usd"], 0.0);
    assert!((usd(&alice["period_spend_usd"]) - 0.000_075).abs() < 1e-12);
    assert!(usd(&alice["projected_period_spend_usd"]) >= 0.000_075);
    // Bob's two requests went to the CPU: charged a few milliseconds of $0.036/h, saving
    // nearly all of echo's $0.000025 each.
    let bob = users.iter().find(|u| u["user"] == "bob").unwrap();
    assert_eq!(bob["requests"], 2);
    assert_eq!(bob["premium_token_share"], 0.0);
    let (bob_cost, bob_savings) = (usd(&bob["cost_usd"]), usd(&bob["savings_usd"]));
    assert!(bob_cost < 0.000_001 && (bob_cost + bob_savings - 0.000_050).abs() < 1e-12, "{bob}");

    let backends = json["backends"].as_array().unwrap();
    let cpu = backends.iter().find(|b| b["backend"] == "cpu").unwrap();
    assert_eq!(cpu["requests"], 2);
    assert!(
        cpu["busy_ms"].as_i64().unwrap()
            <= json["window"]["end_ms"].as_i64().unwrap() - json["window"]["start_ms"].as_i64().unwrap()
    );
    assert!(usd(&cpu["utilisation"]) <= 1.0 && cpu["idle_cost_usd"].as_f64().is_some(), "{cpu}");
    let echo = backends.iter().find(|b| b["backend"] == "echo").unwrap();
    assert_eq!((echo["requests"].as_u64(), echo["idle_cost_usd"].as_f64()), (Some(3), None));

    // The exported trace replays: five requests, the tokens each used.
    let lines: Vec<Value> =
        std::fs::read_to_string(&trace).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!((lines[0]["model"].as_str(), lines[0]["prompt_tokens"].as_u64()), (Some("mix"), Some(11)));
    let replay =
        stdout_json(&tollgate(&["simulate", "--config", config_arg, "--trace", trace.to_str().unwrap(), "--json"]));
    assert_eq!(user(&replay, 0, "alice")["served"], 3);

    // The table says the same.
    let table = tollgate(&["report", "--config", config_arg, "--since", "1h"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("alice") && table.contains("$0.000075"), "{table}");
}

#[test]
fn report_on_a_memory_ledger_says_nothing_is_persisted() {
    let output = tollgate(&["report", "--config", "config/tollgate.toml"]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing is persisted"));
}
