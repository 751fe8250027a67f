//! The shared ledger on a real Redis Cluster (three primaries, a replica each, all
//! `redis-server --cluster-enabled yes` on 127.0.0.1) behind two real `tollgate serve`
//! processes: team, key and user budgets and rate limits hold exactly across both gateways
//! (each request's levels share their chain root's hash slot, so one script reserves them all),
//! the reports find every account's spend whatever its slot, and a primary killed mid-load is
//! replaced by its replica without a restart and without losing a settlement.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{load, redis_gateway_config, ten_dollar_request, RedisCluster, Replica, REQUEST_COST_USD};
use support::*;
use tokio::time::Instant;

const PASSWORD: &str = "cluster-test-password";
const PREFIX: &str = "tc:";

fn config(nodes: &[String]) -> String {
    let nodes = nodes.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let ledger = format!(
        "cluster = [{nodes}]\npassword_env = \"TEST_REDIS_PASSWORD\"\nkey_prefix = \"{PREFIX}\"\n\
         timeout_ms = 1000\nconnect_timeout_ms = 500"
    );
    let rest = format!(
        "[[plans]]\nname = \"pro\"\nprice_usd = 20\nbudget_usd = 100000\n\n\
         [[plans]]\nname = \"limited\"\nprice_usd = 5\nrpm = 20\n\n\
         [[plans]]\nname = \"small\"\nprice_usd = 5\nbudget_usd = 50\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\nbudget_usd = 30\n",
        key_hash(ALICE_KEY)
    );
    redis_gateway_config(&ledger, &rest)
}

/// Creates `name` on `plan` (in `team` if any) with one key; returns the key.
async fn user_with_key(gateway: &Replica, name: &str, plan: &str, team: Option<&str>, key: Value) -> String {
    let mut body = json!({"name": name, "plan": plan});
    if let Some(team) = team {
        body["team"] = json!(team);
    }
    let (status, answer) = gateway.admin(reqwest::Method::POST, "/admin/users", body).await;
    assert_eq!(status, 201, "{answer}");
    let (status, created) = gateway.admin(reqwest::Method::POST, &format!("/admin/users/{name}/keys"), key).await;
    assert_eq!(status, 201, "{created}");
    created["key"].as_str().unwrap().to_owned()
}

/// `n` requests at once, round-robin over `gateways` and `keys`: (status, budget scope, code).
async fn burst(gateways: &[Replica], keys: &[String], n: usize) -> Vec<(u16, Option<String>, String)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let send = client
                .post(gateways[i % gateways.len()].url("/v1/chat/completions"))
                .bearer_auth(&keys[i % keys.len()])
                .json(&ten_dollar_request())
                .send();
            tokio::spawn(async move {
                let response = send.await.unwrap();
                let status = response.status().as_u16();
                let scope = response.headers().get("x-tollgate-budget-scope").map(|v| v.to_str().unwrap().to_owned());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, scope, body["error"]["code"].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(n);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

async fn spent(gateway: &Replica, path: &str) -> f64 {
    let (status, usage) = gateway.admin(reqwest::Method::GET, path, Value::Null).await;
    assert_eq!(status, 200, "{path}: {usage}");
    usage["spent_usd"].as_f64().unwrap()
}

fn gateways(cluster: &RedisCluster, dir: &std::path::Path) -> Vec<Replica> {
    let text = config(&cluster.addresses()[..2]);
    let env = [("TEST_REDIS_PASSWORD", PASSWORD)];
    (0..2).map(|i| Replica::start_with_env(dir, &format!("g{i}"), &text, &env)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_and_rate_limits_hold_exactly_across_two_gateways_on_a_cluster() {
    let cluster = RedisCluster::start(3, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let gateways = gateways(&cluster, dir.path());
    let (a, b) = (&gateways[0], &gateways[1]);

    // A team budget of $500 shared by three users (50 requests), from both gateways at once.
    let (status, answer) =
        a.admin(reqwest::Method::POST, "/admin/teams", json!({"name": "acme", "budget_usd": 500})).await;
    assert_eq!(status, 201, "{answer}");
    let mut team_keys = Vec::new();
    for name in ["t1", "t2", "t3"] {
        team_keys.push(user_with_key(a, name, "pro", Some("acme"), json!({})).await);
    }
    let outcomes = burst(&gateways, &team_keys, 150).await;
    let ok = outcomes.iter().filter(|(s, _, _)| *s == 200).count();
    let refused_team = outcomes.iter().filter(|(s, scope, _)| *s == 429 && scope.as_deref() == Some("team")).count();
    assert_eq!(ok + refused_team, 150, "only 200 or 429 with scope team: {outcomes:?}");
    assert_eq!(ok, 50, "$500 pays exactly fifty $10 requests across both gateways");
    assert_eq!(spent(b, "/admin/teams/acme/usage").await, 500.0);
    let members: f64 =
        [spent(a, "/admin/usage/t1").await, spent(b, "/admin/usage/t2").await, spent(a, "/admin/usage/t3").await]
            .iter()
            .sum();
    assert_eq!(members, 500.0, "each member's spend is found in its team's slot");
    let (_, ranked) = b.admin(reqwest::Method::GET, "/admin/usage?sort=spent", Value::Null).await;
    let ranked_total: f64 = ranked["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["team"] == "acme")
        .map(|u| u["spent_usd"].as_f64().unwrap())
        .sum();
    assert_eq!(ranked_total, 500.0, "the standings read every member across slots: {ranked}");
    // The hourly rollups: a member's hours in its team's slot, everyone's in slots of their own.
    let (_, hours) = a.admin(reqwest::Method::GET, "/admin/dashboard/spend?user=t1", Value::Null).await;
    assert_eq!(hours["totals"]["spend_usd"].as_f64(), Some(spent(a, "/admin/usage/t1").await), "{hours}");
    let (_, everyone) = b.admin(reqwest::Method::GET, "/admin/dashboard/spend", Value::Null).await;
    assert_eq!(everyone["totals"]["requests"], 50, "{everyone}");

    // A key's own budget of $30: three requests, then refusals naming the key.
    let key = user_with_key(a, "solo", "pro", None, json!({"budget_usd": 30})).await;
    let outcomes = burst(&gateways, &[key], 12).await;
    assert_eq!(outcomes.iter().filter(|(s, _, _)| *s == 200).count(), 3, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .filter(|(s, _, _)| *s != 200)
        .all(|(s, scope, _)| *s == 429 && scope.as_deref() == Some("key")));
    // A config user's own budget, in its own slot.
    let outcomes = burst(&gateways, &[ALICE_KEY.to_owned()], 9).await;
    assert_eq!(outcomes.iter().filter(|(s, _, _)| *s == 200).count(), 3, "{outcomes:?}");

    // rpm = 20 across both gateways: one bucket in the cluster, not one per gateway.
    let limited = user_with_key(a, "r1", "limited", None, json!({})).await;
    let started = Instant::now();
    let outcomes = burst(&gateways, &[limited], 60).await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = outcomes.iter().filter(|(s, _, _)| *s == 200).count();
    assert!(admitted >= 20 && admitted as f64 <= 20.0 + (elapsed / 3.0).ceil() + 1.0, "{admitted} admitted, rpm 20");
    assert!(
        outcomes.iter().all(|(s, _, code)| *s == 200 || (*s == 429 && code == "rate_limit_exceeded")),
        "{outcomes:?}"
    );
    println!("cluster: team budget 50 of 150 admitted; rpm 20 over two gateways: {admitted} of 60 in {elapsed:.2} s");

    // A user who joins a team mid-period keeps what it spent: its budget's keys move to the
    // team's slot with their spend, so the move neither resets nor strands it.
    let mover = user_with_key(a, "mover", "small", None, json!({})).await;
    let outcomes = burst(&gateways, std::slice::from_ref(&mover), 3).await;
    assert!(outcomes.iter().all(|(s, _, _)| *s == 200), "{outcomes:?}");
    assert_eq!(a.admin(reqwest::Method::POST, "/admin/teams", json!({"name": "crew"})).await.0, 201);
    let (status, moved) = a.admin(reqwest::Method::PATCH, "/admin/users/mover", json!({"team": "crew"})).await;
    assert_eq!(status, 200, "{moved}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The first request after the move moves the spend (requests racing it could be admitted
    // against the new keys before the spend lands: a window of one round trip).
    let first = burst(&gateways, std::slice::from_ref(&mover), 1).await;
    let outcomes = burst(&gateways, &[mover], 4).await;
    let after = first.iter().chain(&outcomes).filter(|(s, _, _)| *s == 200).count();
    assert_eq!(after, 2, "$50 of budget, $30 spent before the move: two more requests: {first:?} {outcomes:?}");
    assert_eq!(spent(b, "/admin/usage/mover").await, 50.0);
    assert_eq!(spent(b, "/admin/teams/crew/usage").await, 20.0, "the team pays from the move on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_load_is_replaced_and_every_settlement_is_kept() {
    let mut cluster = RedisCluster::start(3, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let gateways = gateways(&cluster, dir.path());
    let a = &gateways[0];
    let (status, _) = a.admin(reqwest::Method::POST, "/admin/teams", json!({"name": "big"})).await;
    assert_eq!(status, 201);
    let names = ["f1", "f2", "f3"];
    let mut keys = Vec::new();
    for (i, name) in names.iter().enumerate() {
        keys.push(user_with_key(a, name, "pro", (i > 0).then_some("big"), json!({})).await);
    }
    let client = reqwest::Client::new();
    for gateway in &gateways {
        let ready = client.get(gateway.url("/readyz")).send().await.unwrap().status();
        assert_eq!(ready, 200);
    }

    let (stop, running) = load(&gateways, &keys, 6);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The primary of the team's slot: f2's and f3's requests all go there.
    let victim = cluster.primary_of(&format!("{PREFIX}{{~team:big}}:spend:0"));
    cluster.kill(victim);
    let killed = Instant::now();
    let mut resumed = Vec::new();
    for gateway in &gateways {
        loop {
            if killed.elapsed() > Duration::from_secs(30) {
                let any = cluster.nodes.iter().find(|n| n.port != victim).unwrap().port;
                panic!(
                    "no 200 through the team's slot 30 s after killing {victim}: {}",
                    cluster.cli(any, &["CLUSTER", "NODES"])
                );
            }
            let response =
                client.post(gateway.url("/v1/chat/completions")).bearer_auth(&keys[1]).json(&ten_dollar_request());
            if response.send().await.unwrap().status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        resumed.push(killed.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let outcomes = running.await.unwrap();

    let bad: Vec<_> =
        outcomes.iter().filter(|(_, _, s, c)| *s != 200 && !(*s == 503 && c == "ledger_unavailable")).collect();
    assert!(bad.is_empty(), "only 200 or 503 ledger_unavailable (fail-closed): {bad:?}");
    let refused = outcomes.iter().filter(|(_, _, s, _)| *s == 503).count();
    let slowest = *resumed.iter().max().unwrap();
    println!(
        "cluster failover: 200 again through the promoted replica after {resumed:?}; {refused} refused 503 meanwhile"
    );
    assert!(slowest <= Duration::from_secs(10), "service resumed after {slowest:?}, over 10 s");

    // Each user's spend is its 200s (the loops' and the polls': one per gateway with f2's key).
    for (i, name) in names.iter().enumerate() {
        let polled = if i == 1 { gateways.len() } else { 0 };
        let ok = outcomes.iter().filter(|(k, _, s, _)| *k == i && *s == 200).count() + polled;
        let expected = ok as f64 * REQUEST_COST_USD;
        let mut last = 0.0;
        for _ in 0..100 {
            // Just after the failover a read may still find the cluster down (503): poll on.
            let (status, usage) = a.admin(reqwest::Method::GET, &format!("/admin/usage/{name}"), Value::Null).await;
            assert!(status == 200 || status == 503, "{status} {usage}");
            last = usage["spent_usd"].as_f64().unwrap_or(-1.0);
            if last == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last, expected, "{name}: {ok} answered 200");
    }
    // Each gateway's probe (every 500 ms) sees other nodes own the slots.
    for gateway in &gateways {
        let mut failovers = 0.0;
        for _ in 0..50 {
            failovers = gateway.metric("tollgate_ledger_failovers_total").await;
            if failovers >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(failovers >= 1.0, "the gateway counted the failover");
    }
}
