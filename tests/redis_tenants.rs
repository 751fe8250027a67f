//! API tenants on one Redis shared by two real `tollgate serve` replicas: a user or key
//! created, changed or revoked on one is seen by the other within a second, with no reload,
//! and a team's budget holds across both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{redis_gateway_config, ten_dollar_request, RedisServer, Replica, REQUEST_COST_USD};
use support::*;

fn config(redis_url: &str) -> String {
    let ledger = format!("url = \"{redis_url}\"\nkey_prefix = \"tt:\"\ntimeout_ms = 2000");
    let rest = format!(
        "[[plans]]\nname = \"pro\"\nprice_usd = 20\nbudget_usd = 1000\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n",
        key_hash(ALICE_KEY)
    );
    redis_gateway_config(&ledger, &rest)
}

/// How long until `replica` answers `key` with `status`, polling every 20 ms for 5 s.
async fn time_until(replica: &Replica, key: &str, status: u16) -> Duration {
    let start = tokio::time::Instant::now();
    while replica.chat(key).await.status() != status {
        assert!(start.elapsed() < Duration::from_secs(5), "still not {status} after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn creation_and_revocation_reach_the_other_replica_within_a_second() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Replica::start(dir.path(), "a", &config(&redis.url())),
        Replica::start(dir.path(), "b", &config(&redis.url())),
    );

    let (status, _) = a.admin(reqwest::Method::POST, "/admin/users", json!({"name": "ann", "plan": "pro"})).await;
    assert_eq!(status, 201);
    let (status, user) = b.admin(reqwest::Method::GET, "/admin/users/ann", Value::Null).await;
    assert_eq!((status, user["plan"].as_str()), (200, Some("pro")), "one store for both");
    let (_, created) = a.admin(reqwest::Method::POST, "/admin/users/ann/keys", json!({})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let seen = time_until(&b, &key, 200).await;
    assert!(seen < Duration::from_secs(1), "created on a, usable on b after {seen:?}");

    // b has it cached now; a revokes it.
    assert_eq!(b.chat(&key).await.status(), 200);
    let id = created["id"].as_str().unwrap();
    let (status, _) = a.admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), Value::Null).await;
    assert_eq!(status, 204);
    let refused = time_until(&b, &key, 401).await;
    assert!(refused < Duration::from_secs(1), "revoked on a, refused on b after {refused:?}");
    assert_eq!(a.chat(&key).await.status(), 401);

    let (_, second) = a.admin(reqwest::Method::POST, "/admin/users/ann/keys", json!({})).await;
    let second = second["key"].as_str().unwrap().to_owned();
    assert!(time_until(&b, &second, 200).await < Duration::from_secs(1));
    // A user change made on a (its plan's budget replaced by its own) applies on b.
    let (status, _) =
        a.admin(reqwest::Method::PATCH, "/admin/users/ann", json!({"overrides": {"budget_usd": 0.0}})).await;
    assert_eq!(status, 200);
    let refused = time_until(&b, &second, 429).await;
    assert!(refused < Duration::from_secs(1), "a user change reached b after {refused:?}");
}

#[tokio::test]
async fn a_team_budget_holds_across_two_replicas() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Replica::start(dir.path(), "a", &config(&redis.url())),
        Replica::start(dir.path(), "b", &config(&redis.url())),
    );
    let (status, _) = a.admin(reqwest::Method::POST, "/admin/teams", json!({"name": "acme", "budget_usd": 100})).await;
    assert_eq!(status, 201);
    let mut keys = Vec::new();
    for name in ["t1", "t2", "t3"] {
        let body = json!({"name": name, "plan": "pro", "team": "acme"});
        assert_eq!(a.admin(reqwest::Method::POST, "/admin/users", body).await.0, 201);
        let (_, key) = a.admin(reqwest::Method::POST, &format!("/admin/users/{name}/keys"), json!({})).await;
        keys.push(key["key"].as_str().unwrap().to_owned());
    }
    let handles: Vec<_> = (0..30)
        .map(|i| {
            let url = if i % 2 == 0 { a.url("/v1/chat/completions") } else { b.url("/v1/chat/completions") };
            let key = keys[i % 3].clone();
            tokio::spawn(async move {
                let r =
                    reqwest::Client::new().post(url).bearer_auth(key).json(&ten_dollar_request()).send().await.unwrap();
                let scope = r.headers().get("x-tollgate-budget-scope").map(|v| v.to_str().unwrap().to_owned());
                (r.status().as_u16(), scope)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await.unwrap());
    }
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 10, "$100 pays exactly ten $10 requests across both replicas: {answers:?}");
    assert!(answers.iter().filter(|(s, _)| *s != 200).all(|(s, scope)| *s == 429 && scope.as_deref() == Some("team")));
    let (_, usage) = b.admin(reqwest::Method::GET, "/admin/teams/acme/usage", Value::Null).await;
    assert_eq!(usage["spent_usd"], 100.0, "{usage}");
    assert_eq!(usage["reserved_usd"], 0.0, "{usage}");
    let (_, ranked) = a.admin(reqwest::Method::GET, "/admin/usage?sort=spent", Value::Null).await;
    let total: f64 = ranked["data"].as_array().unwrap().iter().map(|u| u["spent_usd"].as_f64().unwrap()).sum();
    assert_eq!(total, 100.0, "every member ranked by what it spent: {ranked}");
}

/// Runs `tollgate args` in `dir` (where the replicas' configs are); its standard output.
fn tollgate(dir: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate")).args(args).current_dir(dir).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

#[tokio::test]
async fn the_report_reads_a_redis_ledger_with_its_api_users_and_simulate_replays_them() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::start(dir.path(), "a", &config(&redis.url()));
    for name in ["ann", "idle"] {
        let (status, _) = a.admin(reqwest::Method::POST, "/admin/users", json!({"name": name, "plan": "pro"})).await;
        assert_eq!(status, 201);
    }
    let (_, created) = a.admin(reqwest::Method::POST, "/admin/users/ann/keys", json!({})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(a.chat(&key).await.status(), 200);
    }
    assert_eq!(a.chat(ALICE_KEY).await.status(), 200);
    // Records and spend reach Redis when the settlement's script has run: poll the report.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let report = loop {
        let report: Value =
            serde_json::from_slice(&tollgate(dir.path(), &["report", "--config", "a.toml", "--json"])).unwrap();
        let requests = |name: &str| {
            report["users"].as_array().unwrap().iter().find(|u| u["user"] == name).map(|u| u["requests"].clone())
        };
        if requests("ann") == Some(json!(3)) && requests("alice") == Some(json!(1)) {
            break report;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all four requests reported: {report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let user = |name: &str| report["users"].as_array().unwrap().iter().find(|u| u["user"] == name).unwrap().clone();
    let ann = user("ann");
    assert_eq!((ann["plan"].as_str(), ann["price_usd"].as_f64()), (Some("pro"), Some(20.0)), "{ann}");
    assert_eq!(ann["cost_usd"].as_f64(), Some(3.0 * REQUEST_COST_USD), "{ann}");
    // $30 of this period's spend against a $20 price: the one user over its price.
    assert_eq!(ann["margin_usd"].as_f64(), Some(20.0 - 3.0 * REQUEST_COST_USD), "{ann}");
    assert_eq!(report["over_price"], json!(["ann"]), "{report}");
    let idle = user("idle");
    assert_eq!((idle["requests"].as_u64(), idle["plan"].as_str()), (Some(0), Some("pro")), "{idle}");

    // Its trace replays ann as the API user it is, under the config's `pro` plan.
    tollgate(dir.path(), &["report", "--config", "a.toml", "--export-trace", "trace.jsonl"]);
    let simulated = tollgate(dir.path(), &["simulate", "--config", "a.toml", "--trace", "trace.jsonl", "--json"]);
    let simulated: Value = serde_json::from_slice(&simulated).unwrap();
    let run = &simulated["configs"][0];
    assert_eq!(run["unknown_users"], 0, "{run}");
    let replayed = run["users"].as_array().unwrap().iter().find(|u| u["user"] == "ann").unwrap();
    assert_eq!((replayed["requests"].as_u64(), replayed["budget_usd"].as_f64()), (Some(3), Some(1000.0)), "{replayed}");
}
