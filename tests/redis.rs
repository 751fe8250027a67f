//! Scale-out on one Redis: real `redis-server` children and real `tollgate serve` processes.
//! Budgets and rate limits hold across replicas; a Redis outage never lets an unmetered 200
//! through (fail-closed) or stops service (fail-open), and service resumes when it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::fleet::{self, load, redis_gateway_config, ten_dollar_request, RedisServer, Replica, REQUEST_COST_USD};
use support::*;

const PREFIX: &str = "t:";

fn config(redis_url: &str, on_error: &str, user: &str) -> String {
    let ledger = format!(
        "url = \"{redis_url}\"\nkey_prefix = \"{PREFIX}\"\non_ledger_error = \"{on_error}\"\ntimeout_ms = 2000"
    );
    let alice = format!("[[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n{user}\n", key_hash(ALICE_KEY));
    redis_gateway_config(&ledger, &alice)
}

/// `n` replicas of one config (Alice's `user` lines, `on_error`) on `redis`, in `dir`.
fn replicas(redis: &RedisServer, dir: &std::path::Path, n: usize, on_error: &str, user: &str) -> Vec<Replica> {
    let text = config(&redis.url(), on_error, user);
    (0..n).map(|i| Replica::start(dir, &format!("r{i}"), &text)).collect()
}

/// Sends `n` requests at once, spread round-robin over `replicas`: (status, error code).
async fn burst(replicas: &[Replica], n: usize) -> Vec<(u16, String)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let send = client.post(replicas[i % replicas.len()].url("/v1/chat/completions")).bearer_auth(ALICE_KEY);
            let send = send.json(&ten_dollar_request()).send();
            tokio::spawn(async move { outcome(send.await.unwrap()).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(n);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

async fn outcome(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

/// Alice's spend and requests in the current period, as this server holds them.
async fn redis_spend(redis: &RedisServer) -> (f64, u64) {
    fleet::redis_spend(&mut redis.client().await, PREFIX, "alice").await
}

/// Polls until `check` holds (settlements land on their own task, just after the answer).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_budget_under_300_concurrent_requests() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let budget = 50.0 * REQUEST_COST_USD;
    let replicas = replicas(&redis, dir.path(), 3, "fail-closed", &format!("budget_usd = {budget}"));

    let outcomes = burst(&replicas, 300).await;
    let ok = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let refused = outcomes.iter().filter(|(s, c)| *s == 429 && c == "budget_exceeded").count();
    assert_eq!(ok + refused, 300, "only 200 or 429 budget_exceeded: {outcomes:?}");

    eventually("every settlement in redis", || async { redis_spend(&redis).await.1 == ok as u64 }).await;
    let (spent, requests) = redis_spend(&redis).await;
    println!("3 replicas, 300 concurrent requests, budget ${budget} (50 requests): {ok} answered 200, spent ${spent}");
    // The estimate is exact here, so the budget is the bound and it buys exactly 50.
    assert!(spent <= budget, "spent {spent} over the budget {budget}");
    assert!(ok.abs_diff(50) <= 1, "{ok} answered 200, the budget covers 50");
    assert_eq!(spent, ok as f64 * REQUEST_COST_USD);
    for replica in &replicas {
        let usage = replica.usage("alice").await;
        assert_eq!(usage["spent_usd"].as_f64().unwrap(), spent, "{usage}");
        assert_eq!(usage["requests"].as_u64().unwrap(), requests);
        assert_eq!(usage["reserved_usd"].as_f64().unwrap(), 0.0);
        assert_eq!(usage["remaining_usd"].as_f64().unwrap(), budget - spent);
    }
    let text = reqwest::get(replicas[0].url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(text.contains("tollgate_ledger_operation_duration_seconds_count{operation=\"read\"}"), "{text}");
    promtool_accepts(&text);
}

/// The header a client budgets by: after each answer, what is left once that request is
/// charged, whichever replica served the requests before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remaining_budget_header_counts_the_request_and_every_replicas_earlier_ones() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let budget = 5.0 * REQUEST_COST_USD;
    let replicas = replicas(&redis, dir.path(), 2, "fail-closed", &format!("budget_usd = {budget}"));
    for i in 1..=5u64 {
        let replica = &replicas[usize::from(i % 2 == 0)];
        let answer = replica.chat(ALICE_KEY).await;
        assert_eq!(answer.status(), 200);
        let left: f64 = answer.headers()["x-tollgate-budget-remaining-usd"].to_str().unwrap().parse().unwrap();
        assert_eq!(left, budget - i as f64 * REQUEST_COST_USD, "after request {i}");
        eventually("the settlement in redis", || async { redis_spend(&redis).await.1 == i }).await;
    }
    let refused = replicas[0].chat(ALICE_KEY).await;
    assert_eq!(refused.status(), 429);
    let left: f64 = refused.headers()["x-tollgate-budget-remaining-usd"].to_str().unwrap().parse().unwrap();
    assert_eq!(left, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpm_limit_of_60_holds_across_three_replicas() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(&redis, dir.path(), 3, "fail-closed", "rpm = 60");

    let started = tokio::time::Instant::now();
    let outcomes = burst(&replicas, 180).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let limited = outcomes.iter().filter(|(s, c)| *s == 429 && c == "rate_limit_exceeded").count();
    println!("rpm 60 over 3 replicas: {ok} of 180 admitted in {elapsed:.2} s");
    assert_eq!(ok + limited, 180, "{outcomes:?}");
    // One request a second refills while the burst runs.
    assert!(ok >= 60 && ok as f64 <= 60.0 + elapsed.ceil() + 1.0, "{ok} admitted: the limit is 60 for all replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_while_redis_is_down_never_an_unmetered_200_and_resumes_when_it_is_back() {
    let mut redis = RedisServer::persistent();
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(&redis, dir.path(), 2, "fail-closed", "budget_usd = 1000000");
    let client = reqwest::Client::new();

    let (stop, running) = load(&replicas, &[ALICE_KEY.to_owned()], 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // While it is down, a new request is refused in the OpenAI shape.
    let during =
        client.post(replicas[0].url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&ten_dollar_request());
    let during = during.send().await.unwrap();
    assert_eq!(during.status(), 503);
    let body: Value = during.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ledger_unavailable", "{body}");
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(replicas[0].metric("tollgate_ledger_up").await, 0.0);

    redis.restart();
    // Back without restarting any gateway.
    for replica in &replicas {
        eventually("a 200 again", || async {
            let response =
                client.post(replica.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&ten_dollar_request());
            response.send().await.unwrap().status() == 200
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let outcomes = running.await.unwrap();
    let ok = outcomes.iter().filter(|(_, _, s, _)| *s == 200).count() + replicas.len();
    let unavailable = outcomes.iter().filter(|(_, _, s, c)| *s == 503 && c == "ledger_unavailable").count();
    assert_eq!(ok + unavailable, outcomes.len() + replicas.len(), "only 200 or 503: {outcomes:?}");
    assert!(unavailable > 0, "the load saw the outage");

    // Every 200 — those answered while Redis was down included — is in Redis.
    let metered = || async { redis_spend(&redis).await.1 == ok as u64 };
    for _ in 0..100 {
        if metered().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis_spend(&redis).await.1, ok as u64, "requests in redis vs 200s answered");
    println!("fail-closed: {ok} answered 200, {unavailable} answered 503 during the outage, all 200s metered");
    // A restarted Redis is another server to the gateways: the replay window's writes (known
    // to it already, so applied once) queue behind the new settlements and drain after them.
    for replica in &replicas {
        eventually("an empty backlog", || async { replica.metric("tollgate_ledger_reconcile_backlog").await == 0.0 })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_serving_while_redis_is_down_and_the_spend_reaches_redis_when_it_is_back() {
    let mut redis = RedisServer::persistent();
    let dir = tempfile::tempdir().unwrap();
    let replicas = replicas(&redis, dir.path(), 2, "fail-open", "budget_usd = 1000000");

    let (stop, running) = load(&replicas, &[ALICE_KEY.to_owned()], 8);
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let backlog: f64 = replicas[0].metric("tollgate_ledger_reconcile_backlog").await
        + replicas[1].metric("tollgate_ledger_reconcile_backlog").await;
    let fail_open = replicas[0].metric("tollgate_ledger_fail_open_reservations_total").await;
    assert!(backlog > 0.0, "settlements wait for redis");
    assert!(fail_open > 0.0, "the metric says requests were admitted locally");

    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let outcomes = running.await.unwrap();
    let ok = outcomes.iter().filter(|(_, _, s, _)| *s == 200).count();
    assert_eq!(ok, outcomes.len(), "fail-open answers every request: {outcomes:?}");

    eventually("the outage's spend in redis", || async { redis_spend(&redis).await.1 == ok as u64 }).await;
    let (spent, _) = redis_spend(&redis).await;
    assert_eq!(spent, ok as f64 * REQUEST_COST_USD);
    println!("fail-open: {ok} answered 200 ({fail_open} admitted locally on one replica), all reconciled into redis");
    for replica in &replicas {
        // The restarted Redis is another server (a new run_id): the replay window's
        // settlements are applied again, as no-ops (it kept their ids), through the backlog.
        eventually("an empty backlog", || async { replica.metric("tollgate_ledger_reconcile_backlog").await == 0.0 })
            .await;
        assert_eq!(replica.metric("tollgate_ledger_replayed_settlements_total").await, 0.0);
        assert!(replica.metric("tollgate_ledger_reconciled_total").await > 0.0);
        let usage = replica.usage("alice").await;
        assert_eq!(usage["spent_usd"].as_f64().unwrap(), spent);
    }
}
