//! Budgets, marginal cost and the routing decision over real HTTP: exact under concurrency,
//! occupancy pricing, headers, rate limits, capacity and health.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{json, Value};
use support::*;

/// One user `carol` with `user_extra` settings, and backends given as TOML.
fn config(backends: &str, routes: &str, user_extra: &str) -> String {
    format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\nqueue_timeout_ms = 300\n\n{backends}\n{routes}\n\
         [[users]]\nname = \"carol\"\nkey_sha256 = \"{}\"\n{user_extra}\n",
        key_hash(CAROL_KEY)
    )
}

const CAROL_KEY: &str = "sk-carol";

fn backend(name: &str, upstream: &str, model: &str, quality: f64, pricing: &str, extra: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\ntier = \"{name}-tier\"\nbase_url = \"{upstream}\"\nmodel = \"{model}\"\n\
         quality = {quality}\ntimeout_s = 10\npricing = {pricing}\n{extra}\n"
    )
}

fn chat_with_max(model: &str, max_tokens: u64) -> Value {
    let mut body = chat(model);
    body["max_tokens"] = json!(max_tokens);
    body
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn forty_concurrent_requests_on_a_budget_for_eight_get_eight_answers_and_never_overspend() {
    let upstream = Upstream::start().await;
    // Output tokens only, and max_tokens equal to what the upstream generates (7): the estimate
    // is exact, so exactly 8 fit. Each request is $0.007.
    let b =
        backend("gpu", &upstream.base_url(), "slow-json", 0.9, "{ input_per_mtok = 0, output_per_mtok = 1000 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n";
    let gateway = Gateway::start(&config(&b, routes, "budget_usd = 0.056\nbudget_period = \"day\""), ENV).await;

    let responses = gateway.post_concurrently(40, "/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 7)).await;
    let mut ok = 0;
    let mut refused = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => ok += 1,
            429 => {
                let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
                assert!((1..=86_400).contains(&retry_after), "Retry-After until the day ends: {retry_after}");
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "budget_exceeded");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, refused), (8, 32));
    let usage = gateway.usage("carol").await;
    assert_eq!(usage["spent_usd"], 0.056);
    assert_eq!(usage["reserved_usd"], 0.0);
    assert_eq!(usage["remaining_usd"], 0.0);
    assert_eq!(usage["requests"], 8);
    assert_eq!(usage["by_backend"]["gpu"]["completion_tokens"], 8 * UPSTREAM_COMPLETION_TOKENS);
    assert_eq!(upstream.seen().len(), 8, "refused requests never reach the backend");
}

#[tokio::test]
async fn two_concurrent_requests_on_an_hourly_backend_are_each_charged_half() {
    let upstream = Upstream::start().await;
    // $36 an hour is a cent a second; slow-json answers after one second.
    let b = backend("cpu", &upstream.base_url(), "slow-json", 0.4, "{ hourly_usd = 36 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"cpu\"]\n";
    let gateway = Gateway::start(&config(&b, routes, ""), ENV).await;

    let alone = gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    let alone_cost: f64 = header(&alone, "x-tollgate-cost-usd").parse().unwrap();
    assert!((0.0095..0.013).contains(&alone_cost), "alone: {alone_cost}");

    let pair = gateway.post_concurrently(2, "/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    let a: f64 = header(&pair[0], "x-tollgate-cost-usd").parse().unwrap();
    let b: f64 = header(&pair[1], "x-tollgate-cost-usd").parse().unwrap();
    for cost in [a, b] {
        assert!((0.0045..0.0075).contains(&cost), "shared: {a} and {b}, alone {alone_cost}");
    }
    let usage = gateway.usage("carol").await;
    let spent = usage["spent_usd"].as_f64().unwrap();
    assert!((spent - (alone_cost + a + b)).abs() < 1e-9, "ledger {spent} vs headers");
    let cost_metric = gateway.metric("tollgate_cost_usd_total", &[("user", "carol"), ("backend", "cpu")]).await;
    assert!((cost_metric - spent).abs() < 1e-9);
}

#[tokio::test]
async fn every_answer_carries_cost_and_budget_headers_exact_for_json_estimated_for_streams() {
    let upstream = Upstream::start().await;
    let b = backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1000, output_per_mtok = 2000 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\ndefault_max_tokens = 100\n";
    let gateway = Gateway::start(&config(&b, routes, "budget_usd = 10\nbudget_period = \"month\""), ENV).await;

    let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    // 11 prompt tokens at $1000/M + 7 completion at $2000/M = $0.025
    assert_eq!(header(&response, "x-tollgate-cost-usd"), "0.025");
    assert_eq!(header(&response, "x-tollgate-budget-remaining-usd"), "9.975");
    assert_eq!(header(&response, "x-tollgate-backend"), "gpu");
    assert_eq!(header(&response, "x-tollgate-tier"), "gpu-tier");

    let mut body = chat("auto");
    body["stream"] = json!(true);
    let response = gateway.post("/v1/chat/completions", CAROL_KEY, &body).await;
    // The estimate: 8 prompt tokens (from the text) + 100 completion (the route default).
    assert_eq!(header(&response, "x-tollgate-cost-usd"), "0.208");
    assert_eq!(header(&response, "x-tollgate-budget-remaining-usd"), "9.767");
    response.text().await.unwrap();
    let usage = gateway.usage("carol").await;
    assert_eq!(usage["spent_usd"], 0.05, "the stream settled at its real usage");
    assert_eq!(usage["period"], "month");
    assert!(usage["period_start"].as_str().unwrap().ends_with("-01T00:00:00Z"));
}

#[tokio::test]
async fn quality_first_steps_down_to_the_cheap_backend_when_the_budget_runs_low() {
    let upstream = Upstream::start().await;
    let backends =
        backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 0, output_per_mtok = 1000 }", "")
            + &backend(
                "cpu",
                &upstream.base_url(),
                "no-usage",
                0.4,
                "{ input_per_mtok = 0, output_per_mtok = 10 }",
                "",
            );
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    // Each premium request reserves 100 tokens * $1000/M = $0.10; the budget pays two.
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"quality-first\"\nbudget_usd = 0.2"), ENV).await;
    let mut reasons = Vec::new();
    for _ in 0..4 {
        let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 100)).await;
        assert_eq!(response.status(), 200);
        reasons.push(format!("{}/{}", header(&response, "x-tollgate-backend"), header(&response, "x-tollgate-reason")));
    }
    // The first two settle at 7 tokens ($0.007 each), so a third fits the premium reservation too.
    assert_eq!(reasons[..3], ["gpu/quality-first", "gpu/quality-first", "gpu/quality-first"]);
    let usage = gateway.usage("carol").await;
    assert!(usage["remaining_usd"].as_f64().unwrap() < 0.2);
    let mut reasons_after = Vec::new();
    for _ in 0..3 {
        let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 1000)).await;
        reasons_after.push(format!(
            "{}/{}",
            header(&response, "x-tollgate-backend"),
            header(&response, "x-tollgate-reason")
        ));
    }
    // max_tokens 1000 costs $1 on premium: only the cheap backend fits.
    assert!(reasons_after.iter().all(|r| r == "cpu/budget-downgrade"), "{reasons_after:?}");
}

#[tokio::test]
async fn cost_first_escalates_on_a_quality_hint_and_refuses_a_bad_one() {
    let upstream = Upstream::start().await;
    let backends = backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1, output_per_mtok = 2 }", "")
        + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ hourly_usd = 0.1 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"cost-first\"\nmin_quality = 0.3"), ENV).await;
    let client = reqwest::Client::new();
    let send = |hint: Option<&'static str>| {
        let mut request = client.post(gateway.url("/v1/chat/completions")).bearer_auth(CAROL_KEY).json(&chat("auto"));
        if let Some(hint) = hint {
            request = request.header("x-tollgate-min-quality", hint);
        }
        request.send()
    };
    let plain = send(None).await.unwrap();
    assert_eq!(header(&plain, "x-tollgate-reason"), "cost-first");
    assert_eq!(header(&plain, "x-tollgate-backend"), "cpu");
    let hinted = send(Some("0.8")).await.unwrap();
    assert_eq!(header(&hinted, "x-tollgate-backend"), "gpu");
    assert_eq!(header(&hinted, "x-tollgate-reason"), "escalated:quality");
    // A hint can never lower the user's floor: 0.1 still means 0.3, and cpu meets it.
    let lower = send(Some("0.1")).await.unwrap();
    assert_eq!(header(&lower, "x-tollgate-backend"), "cpu");
    let bad = send(Some("high")).await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["param"], "x-tollgate-min-quality");
    let impossible = send(Some("0.95")).await.unwrap();
    assert_eq!(impossible.status(), 400);
    let body: Value = impossible.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quality_unavailable");
}

#[tokio::test]
async fn the_request_cost_cap_refuses_what_no_backend_can_serve_under_it() {
    let upstream = Upstream::start().await;
    let b = backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 0, output_per_mtok = 1000 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n";
    let gateway = Gateway::start(&config(&b, routes, "max_request_usd = 0.05"), ENV).await;
    let ok = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 50)).await;
    assert_eq!(ok.status(), 200);
    let capped = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 51)).await;
    assert_eq!(capped.status(), 400);
    let body: Value = capped.json().await.unwrap();
    assert_eq!(body["error"]["code"], "max_request_cost_exceeded");
    assert_eq!(body["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn an_rpm_limit_refuses_with_retry_after() {
    let upstream = Upstream::start().await;
    let b = backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1, output_per_mtok = 1 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n";
    let gateway = Gateway::start(&config(&b, routes, "rpm = 3"), ENV).await;
    for _ in 0..3 {
        assert_eq!(gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await.status(), 200);
    }
    let limited = gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((1..=21).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn a_full_cheap_backend_spills_to_the_premium_one_and_a_full_route_queues_then_503s() {
    let upstream = Upstream::start().await;
    let backends =
        backend(
            "gpu",
            &upstream.base_url(),
            "slow-json-gpu",
            0.9,
            "{ input_per_mtok = 1, output_per_mtok = 2 }",
            "max_concurrency = 1",
        ) + &backend("cpu", &upstream.base_url(), "slow-json-cpu", 0.4, "{ hourly_usd = 0.01 }", "max_concurrency = 1");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"cost-first\""), ENV).await;
    let started = tokio::time::Instant::now();
    let mut outcomes = Vec::new();
    for response in gateway.post_concurrently(3, "/v1/chat/completions", CAROL_KEY, &chat("auto")).await {
        let status = response.status().as_u16();
        outcomes.push(format!(
            "{status} {} {}",
            header(&response, "x-tollgate-backend"),
            header(&response, "x-tollgate-reason")
        ));
    }
    outcomes.sort();
    // cpu takes the first, gpu the spill; the third waits 300 ms in the queue, then 503.
    assert_eq!(outcomes, ["200 cpu cost-first", "200 gpu escalated:capacity", "503  "], "{outcomes:?}");
    assert!(started.elapsed() < SLOW_JSON_DELAY * 3);
}

#[tokio::test]
async fn a_queued_request_is_served_when_a_slot_frees() {
    let upstream = Upstream::start().await;
    let b = backend("cpu", &upstream.base_url(), "slow-json", 0.4, "{ hourly_usd = 0.01 }", "max_concurrency = 1");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"cpu\"]\n";
    let text = config(&b, routes, "").replace("queue_timeout_ms = 300", "queue_timeout_ms = 5000");
    let gateway = Gateway::start(&text, ENV).await;
    let pair = gateway.post_concurrently(2, "/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    assert_eq!((pair[0].status().as_u16(), pair[1].status().as_u16()), (200, 200));
}

#[tokio::test]
async fn a_failing_backend_opens_its_circuit_and_traffic_goes_straight_to_the_next() {
    let upstream = Upstream::start().await;
    let backends = backend("gpu", &upstream.base_url(), "fail", 0.9, "{ input_per_mtok = 1, output_per_mtok = 2 }", "")
        + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ hourly_usd = 0.01 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    let gateway = Gateway::start(&config(&backends, routes, ""), ENV).await;
    for _ in 0..5 {
        let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-tollgate-backend"), "cpu");
        assert_eq!(header(&response, "x-tollgate-reason"), "fallback:gpu");
    }
    let to_failing = upstream.seen().iter().filter(|s| s.body["model"] == "fail").count();
    assert_eq!(to_failing, 3, "after 3 failures the circuit is open: no more attempts");
    assert_eq!(gateway.metric("tollgate_backend_up", &[("backend", "gpu")]).await, 0.0);
    assert_eq!(gateway.metric("tollgate_backend_up", &[("backend", "cpu")]).await, 1.0);
    let usage = gateway.usage("carol").await;
    assert_eq!(usage["requests"], 5, "failed attempts are not charged");
}

#[tokio::test]
async fn a_200_that_is_not_json_is_a_502() {
    let upstream = Upstream::start().await;
    let b = backend("gpu", &upstream.base_url(), "garbage", 0.9, "{ input_per_mtok = 1, output_per_mtok = 2 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n";
    let gateway = Gateway::start(&config(&b, routes, ""), ENV).await;
    let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn savings_against_the_premium_baseline_are_counted() {
    let upstream = Upstream::start().await;
    let backends =
        backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1000, output_per_mtok = 1000 }", "")
            + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ input_per_mtok = 100, output_per_mtok = 100 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"cost-first\""), ENV).await;
    gateway.post("/v1/chat/completions", CAROL_KEY, &chat("auto")).await;
    // 18 tokens: $0.018 on premium, $0.0018 charged.
    let saved = gateway.metric("tollgate_savings_usd_total", &[("user", "carol")]).await;
    assert!((saved - 0.0162).abs() < 1e-12, "{saved}");
}

#[tokio::test]
async fn a_paced_user_ahead_of_its_pace_line_is_served_by_the_cheaper_backend_that_meets_its_floor() {
    let upstream = Upstream::start().await;
    let backends =
        backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 0, output_per_mtok = 50000 }", "")
            + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ input_per_mtok = 0, output_per_mtok = 1 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\n";
    // One premium request costs $0.35 of a $1 daily budget: 35% spent is ahead of pace (with
    // the 5% slack) at any time before 07:12 UTC.
    let user = "policy = \"quality-first\"\nbudget_usd = 1\nbudget_period = \"day\"\npacing = true\nmin_quality = 0.3";
    let gateway = Gateway::start(&config(&backends, routes, user), ENV).await;
    let first = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 7)).await;
    assert_eq!(header(&first, "x-tollgate-reason"), "quality-first");
    let spent = gateway.usage("carol").await["spent_usd"].as_f64().unwrap();
    assert!((spent - 0.35).abs() < 1e-9, "{spent}");
    let now = tollgate::clock::unix_now();
    let elapsed_share = (now % 86_400) as f64 / 86_400.0;
    let second = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 7)).await;
    if elapsed_share + 0.05 < 0.35 {
        assert_eq!(header(&second, "x-tollgate-backend"), "cpu");
        assert_eq!(header(&second, "x-tollgate-reason"), "paced");
    } else {
        // Later in the UTC day 35% is on pace: premium goes on.
        assert_eq!(header(&second, "x-tollgate-reason"), "quality-first");
    }
}

#[tokio::test]
async fn clamp_max_tokens_shortens_a_request_to_what_the_budget_pays_and_refuses_below_a_useful_minimum() {
    let upstream = Upstream::start().await;
    let b = backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 0, output_per_mtok = 1000 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\"]\n";
    // $0.1 pays 100 completion tokens.
    let gateway = Gateway::start(&config(&b, routes, "budget_usd = 0.1\nclamp_max_tokens = true"), ENV).await;
    let response = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 1000)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tollgate-max-tokens-clamped"), "100");
    assert_eq!(upstream.seen()[0].body["max_tokens"], 100, "the backend was asked for the clamped length");
    // 7 tokens were generated ($0.007): $0.093 pays 93 more.
    let second = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 1000)).await;
    assert_eq!(header(&second, "x-tollgate-max-tokens-clamped"), "93");
    let within = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 20)).await;
    assert_eq!(header(&within, "x-tollgate-max-tokens-clamped"), "", "no clamp when the request fits");
    // Spend the rest down below 16 tokens' worth, then a clamp is refused.
    for _ in 0..10 {
        gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 7)).await;
    }
    let refused = gateway.post("/v1/chat/completions", CAROL_KEY, &chat_with_max("auto", 1000)).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
}

#[tokio::test]
async fn a_cascade_escalates_unsure_answers_one_tier_up_and_meters_both_calls() {
    let upstream = Upstream::start().await;
    let backends =
        backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1000, output_per_mtok = 1000 }", "")
            + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ input_per_mtok = 100, output_per_mtok = 100 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\ncascade = { threshold = -1.0, metric = \"mean_logprob\" }\n";
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"cost-first\""), ENV).await;
    let ask = |text: &str| json!({"model": "auto", "messages": [{"role": "user", "content": text}]});

    let easy = gateway.post("/v1/chat/completions", CAROL_KEY, &ask("an easy one")).await;
    assert_eq!(header(&easy, "x-tollgate-backend"), "cpu");
    assert_eq!(header(&easy, "x-tollgate-reason"), "cost-first");
    assert_eq!(header(&easy, "x-tollgate-cost-usd"), "0.0018");
    let body: Value = easy.json().await.unwrap();
    assert!(body["choices"][0].get("logprobs").is_none(), "logprobs the client did not ask for are stripped");
    assert_eq!(upstream.seen()[0].body["logprobs"], true, "the cheap call asked for logprobs");

    let hard = gateway.post("/v1/chat/completions", CAROL_KEY, &ask("a hard one")).await;
    assert_eq!(header(&hard, "x-tollgate-backend"), "gpu");
    assert_eq!(header(&hard, "x-tollgate-reason"), "escalated:confidence");
    // Both calls are paid: 18 tokens on cpu ($0.0018) and on gpu ($0.018).
    assert_eq!(header(&hard, "x-tollgate-cost-usd"), "0.0198");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen[2].body.get("logprobs").is_none(), "the escalated call is a plain one");
    let usage = gateway.usage("carol").await;
    assert_eq!(usage["requests"], 3);
    assert_eq!(usage["by_backend"]["gpu"]["requests"], 1);
    assert!((usage["spent_usd"].as_f64().unwrap() - 0.0216).abs() < 1e-12);

    let mut wants = ask("an easy one");
    wants["logprobs"] = json!(true);
    let kept: Value = gateway.post("/v1/chat/completions", CAROL_KEY, &wants).await.json().await.unwrap();
    assert!(kept["choices"][0]["logprobs"]["content"].is_array(), "asked-for logprobs are kept");
    assert_eq!(gateway.metric("tollgate_cascade_threshold", &[("route", "auto")]).await, -1.0);
}

#[tokio::test]
async fn an_escalation_the_budget_cannot_pay_serves_the_first_answer_instead_of_an_error() {
    let upstream = Upstream::start().await;
    let backends =
        backend("gpu", &upstream.base_url(), "echo", 0.9, "{ input_per_mtok = 1000, output_per_mtok = 1000 }", "")
            + &backend("cpu", &upstream.base_url(), "echo", 0.4, "{ input_per_mtok = 100, output_per_mtok = 100 }", "");
    let routes = "[[routes]]\nmodel = \"auto\"\nbackends = [\"gpu\", \"cpu\"]\ncascade = { threshold = -1.0 }\n";
    let gateway = Gateway::start(&config(&backends, routes, "policy = \"cost-first\"\nbudget_usd = 0.01"), ENV).await;
    let hard = json!({"model": "auto", "max_tokens": 10, "messages": [{"role": "user", "content": "a hard one"}]});
    let response = gateway.post("/v1/chat/completions", CAROL_KEY, &hard).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-tollgate-backend"), "cpu");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hello from upstream");
    assert!(body["choices"][0].get("logprobs").is_none());
    assert_eq!(gateway.usage("carol").await["requests"], 1, "only the call that happened is charged");
}
