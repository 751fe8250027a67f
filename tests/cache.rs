//! The response cache through a real gateway and a real upstream on 127.0.0.1: hits and misses
//! seen in the upstream's own request count, $0 hits metered with the cost they avoided,
//! streamed replays, Cache-Control, scopes, the quality floor under `global`, an exhausted
//! budget still served its hits, and the TTL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{RedisServer, Replica};
use support::*;

const CAROL_KEY: &str = "sk-carol-test-key";
const DAVE_KEY: &str = "sk-dave-test-key";

fn config(upstream: &str, cache: &str) -> String {
    let backend = |name: &str, model: &str, tier: &str, quality: f64, input: f64, output: f64| {
        format!(
            "[[backends]]\nname = \"{name}\"\ntier = \"{tier}\"\nbase_url = \"{upstream}\"\napi_key_env = \"TEST_BACKEND_KEY\"\n\
             model = \"{model}\"\nquality = {quality}\ncontext_window = 32768\nmax_concurrency = 8\ntimeout_s = 10\n\
             pricing = {{ input_per_mtok = {input}, output_per_mtok = {output} }}\n\n"
        )
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_key_env = \"TEST_ADMIN_KEY\"\n\n{}{}{}{}{}{}\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"premium\", \"cheap\"]\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\npolicy = \"quality-first\"\nmin_quality = 0.8\n\n\
         [[users]]\nname = \"bob\"\nkey_sha256 = \"{}\"\npolicy = \"cost-first\"\n\n\
         [[users]]\nname = \"carol\"\nkey_sha256 = \"{}\"\npolicy = \"cost-first\"\nbudget_usd = 0.0000026\n\n\
         [[users]]\nname = \"dave\"\nkey_sha256 = \"{}\"\nbudget_usd = 0.0001\nclamp_max_tokens = true\n\n\
         [cache]\n{cache}\n",
        backend("premium", "echo", "quality", 0.9, 1.0, 2.0),
        backend("cheap", "echo-small", "economy", 0.3, 0.1, 0.2),
        backend("slow", "slow-stream", "quality", 0.9, 1.0, 2.0),
        backend("slow-json", "slow-json", "quality", 0.9, 1.0, 2.0),
        backend("broken", "fail", "quality", 0.9, 1.0, 2.0),
        backend("truncating", "length", "quality", 0.9, 1.0, 2.0),
        key_hash(ALICE_KEY),
        key_hash(BOB_KEY),
        key_hash(CAROL_KEY),
        key_hash(DAVE_KEY),
    )
}

fn ask(content: &str, temperature: f64) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": content}], "temperature": temperature, "max_tokens": 7})
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

async fn send(gateway: &Gateway, key: &str, body: &Value, cache_control: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(gateway.url("/v1/chat/completions")).bearer_auth(key).json(body);
    if let Some(value) = cache_control {
        request = request.header("cache-control", value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_repeat_is_a_hit_at_zero_cost_that_the_backend_never_sees() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(&upstream.base_url(), "scope = \"user\""), ENV).await;
    let question = ask("What is 2+2?", 0.0);

    let first = send(&gateway, ALICE_KEY, &question, None).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-tollgate-cache"), "miss");
    assert_eq!(header(&first, "x-tollgate-cost-usd"), "0.000025");
    let first_body: Value = first.json().await.unwrap();
    assert_eq!(upstream.seen().len(), 1);

    let second = send(&gateway, ALICE_KEY, &question, None).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-tollgate-cache"), "hit");
    assert_eq!(header(&second, "x-tollgate-backend"), "premium");
    assert_eq!(header(&second, "x-tollgate-reason"), "cache");
    assert_eq!(header(&second, "x-tollgate-cost-usd").parse::<f64>().unwrap(), 0.0);
    assert!(!header(&second, "x-request-id").is_empty());
    assert_eq!(second.json::<Value>().await.unwrap(), first_body, "the same answer");
    assert_eq!(upstream.seen().len(), 1, "the backend never saw the repeat");

    // The same question streamed: replayed from the cache as a normal SSE stream.
    let mut streamed = question.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let stream = send(&gateway, ALICE_KEY, &streamed, None).await;
    assert_eq!(header(&stream, "x-tollgate-cache"), "hit");
    assert!(header(&stream, "content-type").starts_with("text/event-stream"));
    let events = events(&stream.text().await.unwrap());
    let content: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, first_body["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], UPSTREAM_COMPLETION_TOKENS);
    assert_eq!(upstream.seen().len(), 1);

    // Not deterministic: neither served nor stored.
    for _ in 0..2 {
        let random = send(&gateway, ALICE_KEY, &ask("A poem", 0.7), None).await;
        assert_eq!(header(&random, "x-tollgate-cache"), "bypass");
    }
    assert_eq!(upstream.seen().len(), 3);
    // no-cache: asks the backend (and stores its answer); no-store: neither reads nor stores.
    let fresh = send(&gateway, ALICE_KEY, &question, Some("no-cache")).await;
    assert_eq!(header(&fresh, "x-tollgate-cache"), "miss");
    assert_eq!(upstream.seen().len(), 4);
    let private = ask("Private", 0.0);
    assert_eq!(header(&send(&gateway, ALICE_KEY, &private, Some("no-store")).await, "x-tollgate-cache"), "bypass");
    assert_eq!(header(&send(&gateway, ALICE_KEY, &private, None).await, "x-tollgate-cache"), "miss");
    assert_eq!(upstream.seen().len(), 6);

    // Metered: the hits are $0 records with their tokens; the spend is what the backend cost.
    let usage = gateway.usage("alice").await;
    assert_eq!(usage["spent_usd"], 0.00015, "six answers from the backend at $0.000025");
    let records: Value = reqwest::Client::new()
        .get(gateway.url("/admin/requests"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hits: Vec<&Value> = records["data"].as_array().unwrap().iter().filter(|r| r["reason"] == "cache").collect();
    assert_eq!(hits.len(), 2);
    for hit in hits {
        assert_eq!((hit["cost_usd"].as_f64(), hit["backend"].as_str()), (Some(0.0), Some("premium")));
        assert_eq!(hit["completion_tokens"], UPSTREAM_COMPLETION_TOKENS);
    }
    assert_eq!(gateway.metric("tollgate_cache_requests_total", &[("result", "hit")]).await, 2.0);
    assert_eq!(gateway.metric("tollgate_cache_requests_total", &[("result", "miss")]).await, 3.0);
    assert_eq!(gateway.metric("tollgate_cache_requests_total", &[("result", "bypass")]).await, 3.0);
    let saved = gateway.metric("tollgate_cache_saved_usd_total", &[]).await;
    assert!((saved - 2.0 * 0.000025).abs() < 1e-12, "{saved}");
    assert!(gateway.metric("tollgate_cache_bytes", &[]).await > 0.0);
}

#[tokio::test]
async fn scopes_keep_users_apart_and_the_quality_floor_holds_under_global() {
    let upstream = Upstream::start().await;
    let per_user = Gateway::start(&config(&upstream.base_url(), "scope = \"user\""), ENV).await;
    let question = ask("Capital of France?", 0.0);
    assert_eq!(header(&send(&per_user, ALICE_KEY, &question, None).await, "x-tollgate-cache"), "miss");
    let bob = send(&per_user, BOB_KEY, &question, None).await;
    assert_eq!(header(&bob, "x-tollgate-cache"), "miss", "bob never gets alice's answer under scope = user");
    assert_eq!(upstream.seen().len(), 2);

    let global = Gateway::start(&config(&upstream.base_url(), "scope = \"global\""), ENV).await;
    // Bob (cost-first) gets the cheap backend's answer, which is stored...
    let cheap = send(&global, BOB_KEY, &question, None).await;
    assert_eq!((header(&cheap, "x-tollgate-cache"), header(&cheap, "x-tollgate-backend")), ("miss", "cheap"));
    // ...and never reaches alice, whose floor (0.8) the cheap backend (0.3) does not meet.
    let premium = send(&global, ALICE_KEY, &question, None).await;
    assert_eq!((header(&premium, "x-tollgate-cache"), header(&premium, "x-tollgate-backend")), ("miss", "premium"));
    assert_eq!(upstream.seen().len(), 4);
    // Alice's premium answer now serves both.
    for key in [ALICE_KEY, BOB_KEY] {
        let hit = send(&global, key, &question, None).await;
        assert_eq!((header(&hit, "x-tollgate-cache"), header(&hit, "x-tollgate-backend")), ("hit", "premium"));
    }
    assert_eq!(upstream.seen().len(), 4);
}

#[tokio::test]
async fn an_exhausted_budget_still_gets_its_hits_and_the_ttl_expires_them() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(&upstream.base_url(), "ttl_s = 1"), ENV).await;
    let question = ask("Hi", 0.0);
    let first = send(&gateway, CAROL_KEY, &question, None).await;
    assert_eq!((first.status().as_u16(), header(&first, "x-tollgate-backend")), (200, "cheap"));
    // The budget is spent: a new question is refused, the repeat is served (it costs nothing).
    let other = send(&gateway, CAROL_KEY, &ask("Hello", 0.0), None).await;
    assert_eq!(other.status(), 429);
    assert_eq!(other.json::<Value>().await.unwrap()["error"]["code"], "budget_exceeded");
    let repeat = send(&gateway, CAROL_KEY, &question, None).await;
    assert_eq!((repeat.status().as_u16(), header(&repeat, "x-tollgate-cache")), (200, "hit"));
    assert_eq!(upstream.seen().len(), 1);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = send(&gateway, CAROL_KEY, &question, None).await;
    assert_eq!(expired.status(), 429, "past the TTL it is a miss again, and the budget decides");
    assert_eq!(upstream.seen().len(), 1);
}

fn events(text: &str) -> Vec<Value> {
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn a_clean_stream_is_stored_for_every_client_and_a_cut_one_is_not() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(&upstream.base_url(), "scope = \"user\""), ENV).await;
    let question = ask("Stream me", 0.0);
    let mut streamed = question.clone();
    streamed["stream"] = json!(true);

    let first = send(&gateway, ALICE_KEY, &streamed, None).await;
    assert_eq!(header(&first, "x-tollgate-cache"), "miss");
    let live: String = events(&first.text().await.unwrap())
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(live, "tok tok tok tok tok ");
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Stored whole: an unstreamed client gets the assembled answer, with its usage.
    let whole = send(&gateway, ALICE_KEY, &question, None).await;
    assert_eq!(header(&whole, "x-tollgate-cache"), "hit");
    let answer: Value = whole.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], live.as_str());
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["completion_tokens"], UPSTREAM_COMPLETION_TOKENS);
    // And a streaming client its replay, without the usage chunk it did not ask for.
    let again = send(&gateway, ALICE_KEY, &streamed, None).await;
    assert_eq!(header(&again, "x-tollgate-cache"), "hit");
    let replayed = events(&again.text().await.unwrap());
    assert!(replayed.iter().all(|e| e.get("usage").is_none()));
    let text: String = replayed.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, live);
    assert_eq!(upstream.seen().len(), 1);

    // A client that hangs up mid-stream leaves nothing stored.
    let mut slow = streamed.clone();
    slow["model"] = json!("slow");
    let mut cut = send(&gateway, ALICE_KEY, &slow, None).await;
    assert_eq!(header(&cut, "x-tollgate-cache"), "miss");
    assert!(cut.chunk().await.unwrap().is_some());
    drop(cut);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = send(&gateway, ALICE_KEY, &slow, None).await;
    assert_eq!(header(&retry, "x-tollgate-cache"), "miss", "the cut stream was not stored");
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn identical_requests_in_flight_together_make_one_upstream_call() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(&upstream.base_url(), "scope = \"global\""), ENV).await;
    let mut question = ask("Everyone asks this", 0.0);
    question["model"] = json!("slow-json");
    let answers = gateway.post_concurrently(10, "/v1/chat/completions", ALICE_KEY, &question).await;
    let mut verdicts = Vec::new();
    for answer in answers {
        assert_eq!(answer.status(), 200);
        verdicts.push(header(&answer, "x-tollgate-cache").to_owned());
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "hello from upstream");
    }
    assert_eq!(upstream.seen().len(), 1, "one upstream call for ten identical requests");
    verdicts.sort();
    assert_eq!(verdicts.iter().filter(|v| *v == "hit").count(), 9, "{verdicts:?}");

    // A leader that fails lets the others go on their own: none waits for ever, none is
    // served a failure from the cache.
    let mut failing = ask("Nobody can answer", 0.0);
    failing["model"] = json!("broken");
    let answers = gateway.post_concurrently(3, "/v1/chat/completions", ALICE_KEY, &failing).await;
    for answer in answers {
        assert_eq!((answer.status().as_u16(), header(&answer, "x-tollgate-cache")), (502, ""));
    }
    assert_eq!(upstream.seen().len(), 4, "each asked the backend itself");
}

#[tokio::test]
async fn replicas_share_hits_through_redis_and_redis_away_is_a_miss_not_an_error() {
    let upstream = Upstream::start().await;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &upstream.base_url(),
        "store = \"redis\"\nscope = \"global\"\nsecret_env = \"TEST_CACHE_SECRET\"\n\n\
         [ledger]\nbackend = \"redis\"\nurl = \"REDIS\"\non_ledger_error = \"fail-open\"\ntimeout_ms = 500\n",
    )
    .replace("REDIS", &redis.url());
    let env = [ENV, &[("TEST_CACHE_SECRET", "shared-by-the-replicas")]].concat();
    let (a, b) =
        (Replica::start_with_env(dir.path(), "a", &text, &env), Replica::start_with_env(dir.path(), "b", &text, &env));
    let client = reqwest::Client::new();
    let ask_at = |replica: &Replica, body: &Value| {
        client.post(replica.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(body).send()
    };
    let question = ask("Shared?", 0.0);
    let first = ask_at(&a, &question).await.unwrap();
    assert_eq!(header(&first, "x-tollgate-cache"), "miss");
    let answer: Value = first.json().await.unwrap();
    // The write lands on its own task, just after the answer.
    let mut verdict = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = ask_at(&b, &question).await.unwrap();
        verdict = header(&other, "x-tollgate-cache").to_owned();
        if verdict == "hit" {
            assert_eq!(header(&other, "x-tollgate-backend"), "premium");
            assert_eq!(other.json::<Value>().await.unwrap(), answer);
            break;
        }
    }
    assert_eq!(verdict, "hit", "replica b is served what replica a stored");

    // Single flight holds with the shared store too: the first request's guard is released
    // once Redis has its answer, so the ones waiting find it.
    let mut slow = ask("Shared and slow", 0.0);
    slow["model"] = json!("slow-json");
    let before = upstream.seen().len();
    let waiting: Vec<_> = (0..10).map(|_| ask_at(&a, &slow)).collect();
    for answer in futures_join(waiting).await {
        assert_eq!(answer.unwrap().status(), 200);
    }
    assert_eq!(upstream.seen().len(), before + 1, "one upstream call for ten identical requests");
    let calls = upstream.seen().len();

    redis.kill();
    let away = ask_at(&b, &question).await.unwrap();
    assert_eq!((away.status().as_u16(), header(&away, "x-tollgate-cache")), (200, "miss"), "a miss, not an error");
    assert_eq!(upstream.seen().len(), calls + 1);
    assert!(b.metric("tollgate_cache_store_errors_total").await >= 1.0);
}

#[tokio::test]
async fn an_answer_cut_by_a_budget_clamp_is_not_stored_but_one_cut_by_the_clients_own_limit_is() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&config(&upstream.base_url(), "scope = \"user\""), ENV).await;
    let mut long = ask("Write a long story", 0.0);
    long["model"] = json!("truncating");
    long["max_tokens"] = json!(1000);
    // Dave's budget pays fewer tokens than asked: clamped, and the answer stops at the clamp.
    for _ in 0..2 {
        let clamped = send(&gateway, DAVE_KEY, &long, None).await;
        assert_eq!(clamped.status(), 200);
        assert!(!header(&clamped, "x-tollgate-max-tokens-clamped").is_empty());
        assert_eq!(header(&clamped, "x-tollgate-cache"), "miss", "never stored: not the answer asked for");
    }
    assert_eq!(upstream.seen().len(), 2);
    // Alice's own max_tokens cut hers: that is the answer she asked for, and it is stored.
    assert_eq!(header(&send(&gateway, ALICE_KEY, &long, None).await, "x-tollgate-cache"), "miss");
    assert_eq!(header(&send(&gateway, ALICE_KEY, &long, None).await, "x-tollgate-cache"), "hit");
    assert_eq!(upstream.seen().len(), 3);
}

/// Awaits every future (in order), without a futures crate.
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
