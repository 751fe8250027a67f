//! Tenants through the admin API, against the real binary over HTTP: teams, users on plans and
//! their keys (create, use, rotate with grace, revoke), budgets at every level under
//! concurrency, pagination, bounded metrics, and persistence across `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::process::Process;
use support::{key_hash, metric_value, ADMIN_KEY, ALICE_KEY};

/// One simulated backend at $0.001 a token; a `pro` plan and a `free` plan; one config user.
fn config() -> String {
    format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n[ledger]\nbackend = \"sqlite\"\npath = \"data/ledger.db\"\n\n\
         [[backends]]\nname = \"sim\"\nsimulate = {{ ttft_ms = 1, tokens_per_s = 5000, quality_text = \"one two three four five\" }}\n\
         model = \"sim\"\nquality = 0.5\nmax_concurrency = 64\npricing = {{ input_per_mtok = 1000, output_per_mtok = 1000 }}\n\n\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"sim\"]\n\n\
         [[plans]]\nname = \"pro\"\nprice_usd = 20\npolicy = \"quality-first\"\nbudget_usd = 100\nbudget_period = \"month\"\n\n\
         [[plans]]\nname = \"free\"\nprice_usd = 0\npolicy = \"cost-first\"\nbudget_usd = 0.5\nbudget_period = \"day\"\nrpm = 1000\n\n\
         [[plans]]\nname = \"tiny\"\nprice_usd = 1\nbudget_usd = 0.015\nbudget_period = \"day\"\n\n\
         [metrics]\nmax_user_series = 1\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n",
        key_hash(ALICE_KEY)
    )
}

struct Admin {
    process: Process,
    client: reqwest::Client,
}

impl Admin {
    fn start(dir: &std::path::Path) -> Self {
        Self { process: Process::start(dir, &[("TEST_ADMIN_KEY", ADMIN_KEY)]), client: reqwest::Client::new() }
    }

    async fn call(&self, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, self.process.url(path)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, ADMIN_KEY, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, ADMIN_KEY, None).await
    }

    async fn user_with_key(&self, name: &str, plan: &str, team: Option<&str>, key: Value) -> String {
        let (status, body) = self.post("/admin/users", json!({"name": name, "plan": plan, "team": team})).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = self.post(&format!("/admin/users/{name}/keys"), key).await;
        assert_eq!(status, 201, "{body}");
        body["key"].as_str().unwrap().to_owned()
    }

    async fn chat(&self, key: &str) -> reqwest::Response {
        let body = json!({"model": "auto", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5});
        self.client.post(self.process.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap()
    }
}

fn setup() -> (tempfile::TempDir, Admin) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), config()).unwrap();
    let admin = Admin::start(dir.path());
    (dir, admin)
}

#[tokio::test]
async fn a_key_is_created_used_rotated_with_grace_and_revoked() {
    let (_dir, admin) = setup();
    let key = admin.user_with_key("ann", "pro", None, json!({"label": "laptop"})).await;
    assert!(key.starts_with("tg-") && key.len() == 67, "{key}");
    let answer = admin.chat(&key).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-tollgate-backend"], "sim");

    let (_, keys) = admin.get("/admin/users/ann/keys").await;
    let listed = &keys["data"][0];
    assert_eq!((listed["label"].as_str(), listed["revoked"].as_bool()), (Some("laptop"), Some(false)));
    assert!(key.starts_with(listed["prefix"].as_str().unwrap()));
    assert!(!keys.to_string().contains(&key[3..]), "a list never shows the key");
    // Written to the store in batches, but shown at once by the replica that saw the use.
    assert!(listed["last_used_at"].as_str().is_some_and(|at| at.starts_with("20")), "{keys}");
    let id = listed["id"].as_str().unwrap().to_owned();

    let (status, rotated) = admin.post(&format!("/admin/keys/{id}/rotate"), json!({"grace_s": 2})).await;
    assert_eq!(status, 201, "{rotated}");
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    assert_eq!(rotated["label"], "laptop", "the new key keeps the old one's settings");
    assert_eq!(admin.chat(&key).await.status(), 200, "the old key works during the grace");
    assert_eq!(admin.chat(&new_key).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(admin.chat(&key).await.status(), 401, "the old key is refused after the grace");
    assert_eq!(admin.chat(&new_key).await.status(), 200);

    let new_id = rotated["id"].as_str().unwrap();
    let (status, _) = admin.call(reqwest::Method::DELETE, &format!("/admin/keys/{new_id}"), ADMIN_KEY, None).await;
    assert_eq!(status, 204);
    let refused = admin.chat(&new_key).await;
    assert_eq!(refused.status(), 401, "a revoked key is refused at once");
    let text = refused.text().await.unwrap();
    assert!(!text.contains(&new_key[3..]), "{text}");
    assert!(!admin.process.log_text().contains(&new_key[3..]), "keys never reach the log");

    let usage: Value = admin.get("/admin/usage/ann").await.1;
    assert_eq!(usage["requests"], 4, "{usage}");
}

#[tokio::test]
async fn bad_calls_get_400_404_409_and_client_keys_are_refused_on_every_admin_call() {
    let (_dir, admin) = setup();
    assert_eq!(admin.post("/admin/teams", json!({"name": "acme", "budget_usd": 5})).await.0, 201);
    assert_eq!(admin.post("/admin/teams", json!({"name": "acme"})).await.0, 409);
    let (status, body) = admin.post("/admin/users", json!({"name": "zed", "plan": "gold"})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("plan")), "{body}");
    let (status, body) = admin.post("/admin/users", json!({"name": "has space", "plan": "pro"})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("name")), "{body}");
    let (status, body) = admin.post("/admin/users", json!({"name": "zed", "plan": "pro", "plann": 1})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("plann"), "{body}");
    let (status, _) = admin.post("/admin/users", json!({"name": "zed", "plan": "pro", "team": "nope"})).await;
    assert_eq!(status, 400);
    assert_eq!(admin.post("/admin/users", json!({"name": "alice", "plan": "pro"})).await.0, 409, "a config user");
    assert_eq!(admin.post("/admin/users", json!({"name": "zed", "plan": "pro", "team": "acme"})).await.0, 201);
    assert_eq!(admin.post("/admin/users", json!({"name": "zed", "plan": "free"})).await.0, 409);
    let (status, body) =
        admin.post("/admin/users", json!({"name": "zoe", "plan": "pro", "overrides": {"rpm": -1}})).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("overrides.rpm"), "{body}");
    // `[metrics] max_user_series = 1`: the second user asking for series of its own is refused.
    assert_eq!(admin.post("/admin/users", json!({"name": "m1", "plan": "pro", "metrics": true})).await.0, 201);
    let (status, body) = admin.post("/admin/users", json!({"name": "m2", "plan": "pro", "metrics": true})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("metrics")), "{body}");

    assert_eq!(admin.get("/admin/users/nobody").await.0, 404);
    assert_eq!(admin.get("/admin/teams/nobody").await.0, 404);
    assert_eq!(admin.call(reqwest::Method::DELETE, "/admin/keys/key_nope", ADMIN_KEY, None).await.0, 404);
    let (status, body) = admin.call(reqwest::Method::DELETE, "/admin/teams/acme", ADMIN_KEY, None).await;
    assert_eq!(status, 409, "a team with members: {body}");
    let (status, patched) =
        admin.call(reqwest::Method::PATCH, "/admin/users/zed", ADMIN_KEY, Some(json!({"team": null}))).await;
    assert_eq!((status, &patched["team"]), (200, &Value::Null));
    assert_eq!(admin.call(reqwest::Method::DELETE, "/admin/teams/acme", ADMIN_KEY, None).await.0, 204);

    let client_key = admin.user_with_key("eve", "pro", None, json!({})).await;
    for (method, path) in [
        (reqwest::Method::POST, "/admin/teams"),
        (reqwest::Method::GET, "/admin/teams/acme"),
        (reqwest::Method::POST, "/admin/users"),
        (reqwest::Method::GET, "/admin/users"),
        (reqwest::Method::GET, "/admin/users/eve"),
        (reqwest::Method::PATCH, "/admin/users/eve"),
        (reqwest::Method::DELETE, "/admin/users/eve"),
        (reqwest::Method::POST, "/admin/users/eve/keys"),
        (reqwest::Method::GET, "/admin/users/eve/keys"),
        (reqwest::Method::DELETE, "/admin/keys/key_x"),
        (reqwest::Method::POST, "/admin/keys/key_x/rotate"),
        (reqwest::Method::GET, "/admin/teams/acme/usage"),
    ] {
        for key in [client_key.as_str(), ALICE_KEY] {
            let (status, _) = admin.call(method.clone(), path, key, Some(json!({}))).await;
            assert_eq!(status, 401, "{method} {path} with a client key");
        }
    }
    assert_eq!(admin.get("/admin/users/eve").await.0, 200, "still there");
}

#[tokio::test]
async fn a_team_budget_shared_by_three_users_is_spent_exactly_under_concurrency() {
    let (_dir, admin) = setup();
    // One request costs $0.007 here (2 prompt and 5 completion tokens at $0.001 each; its
    // estimate is a little higher): the team's $0.05 pays for a handful of the 30.
    assert_eq!(
        admin.post("/admin/teams", json!({"name": "acme", "budget_usd": 0.05, "budget_period": "day"})).await.0,
        201
    );
    let mut keys = Vec::new();
    for name in ["t1", "t2", "t3"] {
        keys.push(admin.user_with_key(name, "pro", Some("acme"), json!({})).await);
    }
    let handles: Vec<_> = (0..30)
        .map(|i| {
            let (client, url, key) =
                (admin.client.clone(), admin.process.url("/v1/chat/completions"), keys[i % 3].clone());
            let body =
                json!({"model": "auto", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5});
            tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    let refused: Vec<_> = answers.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(ok + refused.len(), 30);
    for r in &refused {
        assert_eq!(r.headers()["x-tollgate-budget-scope"], "team");
    }
    let cost: f64 = answers.iter().find(|r| r.status() == 200).unwrap().headers()["x-tollgate-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, usage) = admin.get("/admin/teams/acme/usage").await;
    let spent = usage["spent_usd"].as_f64().unwrap();
    assert!(spent <= 0.05 + 1e-12, "never over: {usage}");
    assert!((spent - cost * ok as f64).abs() < 1e-9, "every answered request charged once: {usage}");
    assert!(spent + cost > 0.05, "spent up to the last request that fits: {usage}");
    assert_eq!(usage["reserved_usd"], 0.0);
    let members: f64 = usage["members"].as_array().unwrap().iter().map(|m| m["spent_usd"].as_f64().unwrap()).sum();
    assert!((members - spent).abs() < 1e-9, "{usage}");
}

#[tokio::test]
async fn a_key_budget_refuses_with_scope_key_before_its_user_runs_out() {
    let (_dir, admin) = setup();
    let key = admin.user_with_key("kay", "pro", None, json!({"budget_usd": 0.03})).await;
    let mut spent = 0.0;
    let refused = loop {
        let answer = admin.chat(&key).await;
        if answer.status() != 200 {
            break answer;
        }
        spent += answer.headers()["x-tollgate-cost-usd"].to_str().unwrap().parse::<f64>().unwrap();
        assert!(spent < 0.03, "the key's budget must stop it");
    };
    assert!(spent > 0.0);
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-tollgate-budget-scope"], "key");
    let remaining: f64 = refused.headers()["x-tollgate-budget-remaining-usd"].to_str().unwrap().parse().unwrap();
    assert!((remaining - (0.03 - spent)).abs() < 1e-9, "the key's remaining, the smallest: {remaining}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert!(body["error"]["message"].as_str().unwrap().contains("key"), "{body}");
    // A rotation does not reset the key's budget: the new key is the same line.
    let (_, keys) = admin.get("/admin/users/kay/keys").await;
    let id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, rotated) = admin.post(&format!("/admin/keys/{id}/rotate"), json!({})).await;
    assert_eq!(status, 201);
    let again = admin.chat(rotated["key"].as_str().unwrap()).await;
    assert_eq!((again.status().as_u16(), again.headers()["x-tollgate-budget-scope"].to_str().unwrap()), (429, "key"));
    // Another key of the same user has its own (no) key budget.
    let (_, second) = admin.post("/admin/users/kay/keys", json!({})).await;
    assert_eq!(admin.chat(second["key"].as_str().unwrap()).await.status(), 200);
}

#[tokio::test]
async fn pagination_returns_every_user_exactly_once_and_filters_by_plan() {
    let (_dir, admin) = setup();
    for i in 0..23 {
        let plan = if i % 3 == 0 { "free" } else { "pro" };
        assert_eq!(admin.post("/admin/users", json!({"name": format!("user-{i:02}"), "plan": plan})).await.0, 201);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/users?limit=5&cursor={c}"),
            None => "/admin/users?limit=5".to_owned(),
        };
        let (status, page) = admin.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(page["data"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..23).map(|i| format!("user-{i:02}")).collect();
    assert_eq!(seen, expected);
    let (_, free) = admin.get("/admin/users?plan=free&limit=100").await;
    assert_eq!(free["data"].as_array().unwrap().len(), 8);
    assert_eq!(free["data"][0]["limits"]["budget_usd"], 0.5, "limits come from the plan");
    assert_eq!(admin.get("/admin/users?limit=0").await.0, 400);
}

#[tokio::test]
async fn users_without_metrics_series_show_in_plan_and_team_series_only() {
    let (_dir, admin) = setup();
    assert_eq!(admin.post("/admin/teams", json!({"name": "acme"})).await.0, 201);
    let quiet = admin.user_with_key("quiet", "free", Some("acme"), json!({})).await;
    assert_eq!(admin.post("/admin/users", json!({"name": "loud", "plan": "pro", "metrics": true})).await.0, 201);
    let (_, loud) = admin.post("/admin/users/loud/keys", json!({})).await;
    assert_eq!(admin.chat(&quiet).await.status(), 200);
    assert_eq!(admin.chat(loud["key"].as_str().unwrap()).await.status(), 200);
    let text = admin.client.get(admin.process.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("user=\"quiet\""), "{text}");
    assert!(metric_value(&text, "tollgate_cost_usd_total", &[("user", "loud"), ("backend", "sim")]) > 0.0);
    assert!(metric_value(&text, "tollgate_plan_cost_usd_total", &[("plan", "free"), ("backend", "sim")]) > 0.0);
    assert!(metric_value(&text, "tollgate_team_cost_usd_total", &[("team", "acme"), ("backend", "sim")]) > 0.0);
}

#[tokio::test]
async fn users_and_keys_survive_kill_9_and_a_deleted_users_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), config()).unwrap();
    let mut first = Admin::start(dir.path());
    let key = first.user_with_key("sam", "pro", None, json!({"label": "ci"})).await;
    let gone = first.user_with_key("gus", "pro", None, json!({})).await;
    assert_eq!(first.chat(&key).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.process.child.kill().unwrap();
    first.process.child.wait().unwrap();

    let second = Admin::start(dir.path());
    assert_eq!(second.chat(&key).await.status(), 200, "the key works after a restart");
    let (status, user) = second.get("/admin/users/sam").await;
    assert_eq!((status, user["plan"].as_str()), (200, Some("pro")));
    let usage = second.get("/admin/usage/sam").await.1;
    assert_eq!(usage["requests"], 2, "{usage}");
    assert_eq!(second.chat(&gone).await.status(), 200);
    assert_eq!(second.call(reqwest::Method::DELETE, "/admin/users/gus", ADMIN_KEY, None).await.0, 204);
    assert_eq!(second.chat(&gone).await.status(), 401, "deleting a user revokes its keys");
    assert_eq!(second.get("/admin/users/gus").await.0, 404);

    // A clean stop writes when keys were last used.
    let mut second = second;
    assert!(second.process.signal_and_wait("TERM", Duration::from_secs(10)).is_some_and(|s| s.success()));
    let third = Admin::start(dir.path());
    let (_, keys) = third.get("/admin/users/sam/keys").await;
    let last_used = keys["data"][0]["last_used_at"].as_str().unwrap_or_default();
    assert!(last_used.starts_with("20"), "{keys}");
}

#[tokio::test]
async fn a_service_key_meters_and_budgets_each_end_user_on_its_plan() {
    let (_dir, admin) = setup();
    let (status, body) = admin.post("/admin/users", json!({"name": "app", "plan": "pro"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin.post("/admin/users/app/keys", json!({"end_users": {"plan": "nope"}})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("end_users")));
    let (status, created) = admin.post("/admin/users/app/keys", json!({"end_users": {"plan": "tiny"}})).await;
    assert_eq!((status, &created["end_users"]["plan"]), (201, &json!("tiny")));
    let key = created["key"].as_str().unwrap();

    let missing = admin.chat(key).await;
    assert_eq!(missing.status(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["param"], "x-tollgate-end-user", "{body}");

    let as_end_user = |id: &'static str| {
        let body = json!({"model": "auto", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5});
        admin
            .client
            .post(admin.process.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-tollgate-end-user", id)
            .json(&body)
            .send()
    };
    let first = as_end_user("u1@example.com").await.unwrap();
    assert_eq!(first.status(), 200, "{:?}", first.text().await);
    // `tiny` pays one request a day: the end user's own budget refuses the second.
    let refused = as_end_user("u1@example.com").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-tollgate-budget-scope"], "user");
    // Another end user of the same key has a budget of its own; the body's `user` names one too.
    let body =
        json!({"model": "auto", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5, "user": "u2"});
    let by_field = admin.client.post(admin.process.url("/v1/chat/completions")).bearer_auth(key).json(&body).send();
    let by_field = by_field.await.unwrap();
    assert_eq!(by_field.status(), 200, "{:?}", by_field.text().await);
    assert_eq!(as_end_user("bad id!").await.unwrap().status(), 400);

    let (status, end_user) = admin.get("/admin/users/app:u1@example.com").await;
    assert_eq!((status, end_user["plan"].as_str()), (200, Some("tiny")), "{end_user}");
    let (_, listed) = admin.get("/admin/users?plan=tiny").await;
    let names: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app:u1@example.com", "app:u2"]);
    let usage = admin.get("/admin/usage/app:u2").await.1;
    assert_eq!(usage["requests"], 1, "{usage}");
    let service = admin.get("/admin/usage/app").await.1;
    assert_eq!(service["requests"], 2, "the service user's budget covers its end users: {service}");
}

#[tokio::test]
async fn v1_key_shows_a_clients_own_levels_without_the_admin_key() {
    let (_dir, admin) = setup();
    assert_eq!(
        admin.post("/admin/teams", json!({"name": "acme", "budget_usd": 1, "budget_period": "day"})).await.0,
        201
    );
    let key = admin.user_with_key("ann", "pro", Some("acme"), json!({"budget_usd": 0.5, "label": "ci"})).await;
    let answer = admin.chat(&key).await;
    let cost: f64 = answer.headers()["x-tollgate-cost-usd"].to_str().unwrap().parse().unwrap();
    let (status, mine) = admin.call(reqwest::Method::GET, "/v1/key", &key, None).await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(
        (mine["user"].as_str(), mine["plan"].as_str(), mine["team"].as_str()),
        (Some("ann"), Some("pro"), Some("acme"))
    );
    let scopes: Vec<&str> = mine["budgets"].as_array().unwrap().iter().map(|b| b["scope"].as_str().unwrap()).collect();
    assert_eq!(scopes, ["key", "user", "team"]);
    let key_level = &mine["budgets"][0];
    assert!((key_level["remaining_usd"].as_f64().unwrap() - (0.5 - cost)).abs() < 1e-9, "{mine}");
    assert_eq!(key_level["period"], "total");
    assert!(mine["budgets"][2]["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"), "{mine}");
    assert_eq!(mine["limited_by"], "key");
    assert!(!mine.to_string().contains(&key[3..]));
    let (status, alice) = admin.call(reqwest::Method::GET, "/v1/key", ALICE_KEY, None).await;
    assert_eq!((status, alice["user"].as_str(), &alice["plan"]), (200, Some("alice"), &Value::Null));
    assert_eq!(admin.call(reqwest::Method::GET, "/v1/key", "tg-nope", None).await.0, 401);
}

#[tokio::test]
async fn usage_and_the_report_show_api_users_with_plan_price_and_margin() {
    let (dir, admin) = setup();
    let key = admin.user_with_key("f1", "free", None, json!({})).await;
    assert_eq!(admin.post("/admin/users", json!({"name": "p1", "plan": "pro"})).await.0, 201);
    assert_eq!(admin.chat(&key).await.status(), 200);

    let (status, by_name) = admin.get("/admin/usage?limit=2").await;
    assert_eq!(status, 200, "{by_name}");
    let names: Vec<&str> = by_name["data"].as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice", "f1"], "config and API users, by name");
    let (_, rest) =
        admin.get(&format!("/admin/usage?limit=2&cursor={}", by_name["next_cursor"].as_str().unwrap())).await;
    assert_eq!(rest["data"][0]["user"], "p1");
    assert_eq!(rest["next_cursor"], Value::Null);

    let (_, by_spend) = admin.get("/admin/usage?sort=spent").await;
    let top = &by_spend["data"][0];
    assert_eq!(
        (top["user"].as_str(), top["plan"].as_str(), top["price_usd"].as_f64()),
        (Some("f1"), Some("free"), Some(0.0))
    );
    assert!(top["margin_usd"].as_f64().unwrap() < 0.0, "{top}");
    let (_, over) = admin.get("/admin/usage?over_price=true").await;
    let over: Vec<&str> = over["data"].as_array().unwrap().iter().map(|u| u["user"].as_str().unwrap()).collect();
    assert_eq!(over, ["f1"]);
    assert_eq!(admin.get("/admin/usage?sort=cost").await.0, 400);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["report", "--config", "tollgate.toml", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["over_price"], json!(["f1"]), "{report}");
    let f1 = report["users"].as_array().unwrap().iter().find(|u| u["user"] == "f1").unwrap();
    assert_eq!((f1["plan"].as_str(), f1["price_usd"].as_f64()), (Some("free"), Some(0.0)));
    assert!(report["users"].as_array().unwrap().iter().any(|u| u["user"] == "p1" && u["plan"] == "pro"));

    // The trace the report exports replays its API users under their plans: this config's
    // (the request does not fit what is left of `free`'s $0.5 a day as the simulator estimates
    // it), and a compared one whose `free` plan is quality-first with $1,000.
    let tollgate = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    tollgate(&["report", "--config", "tollgate.toml", "--export-trace", "trace.jsonl"]);
    let compare =
        config().replace("policy = \"cost-first\"\nbudget_usd = 0.5", "policy = \"quality-first\"\nbudget_usd = 1000");
    std::fs::write(dir.path().join("compare.toml"), compare).unwrap();
    let simulated = tollgate(&[
        "simulate",
        "--config",
        "tollgate.toml",
        "--compare",
        "compare.toml",
        "--trace",
        "trace.jsonl",
        "--json",
    ]);
    let simulated: Value = serde_json::from_slice(&simulated).unwrap();
    let runs = simulated["configs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{simulated}");
    for (run, (policy, budget, served)) in runs.iter().zip([("cost-first", 0.5, 0), ("quality-first", 1000.0, 1)]) {
        assert_eq!(run["unknown_users"], 0, "{run}");
        let f1 = run["users"].as_array().unwrap().iter().find(|u| u["user"] == "f1").unwrap();
        assert_eq!(
            (f1["policy"].as_str(), f1["budget_usd"].as_f64(), f1["requests"].as_u64(), f1["served"].as_u64()),
            (Some(policy), Some(budget), Some(1), Some(served)),
            "{f1}"
        );
    }
}

#[tokio::test]
async fn a_reload_that_drops_a_plan_in_use_is_refused_and_one_that_changes_it_applies_to_its_users() {
    let (dir, admin) = setup();
    let key = admin.user_with_key("fay", "free", None, json!({})).await;
    let without_free = config().replace("name = \"free\"", "name = \"gratis\"");
    std::fs::write(dir.path().join("tollgate.toml"), &without_free).unwrap();
    let (status, body) = admin.post("/admin/reload", json!({})).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("plan `free`") && message.contains("fay"), "{message}");
    assert_eq!(admin.chat(&key).await.status(), 200, "the running config stays");

    // The plan's budget cut to nothing: every user on it is refused at once, no user edited.
    let cut = config().replace("budget_usd = 0.5", "budget_usd = 0");
    std::fs::write(dir.path().join("tollgate.toml"), &cut).unwrap();
    assert_eq!(admin.post("/admin/reload", json!({})).await.0, 200);
    let refused = admin.chat(&key).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-tollgate-budget-scope"], "user");
}
