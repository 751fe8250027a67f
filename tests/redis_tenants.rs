//! API tenants on one Redis shared by two real `tollgate serve` replicas: a user or key
//! created, changed or revoked on one is seen by the other within a second, with no reload,
//! and a team's budget holds across both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{redis_gateway_config, ten_dollar_request, RedisServer, Replica};
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
