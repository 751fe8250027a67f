//! The Redis ledger through its `Ledger` contract, against a real `redis-server`: expiry of a
//! dead replica's reservations, exact money above 2^53 pico-USD, period roll-over, scripts
//! reloaded after Redis forgot them, and the `[ledger]` keys' validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::fleet::RedisServer;
use tollgate::config::Config;
use tollgate::cost::Usd;
use tollgate::ledger::{Budgets, Ledger, RequestRecord, Reserve, Scope};
use tollgate::metrics::Metrics;

const USD: i64 = 1_000_000_000_000;
// 2026-11-28T12:00:00Z
const NOW: i64 = 1_795_867_200;

fn config_text(url: &str, ledger_extra: &str, user_extra: &str) -> String {
    format!(
        "[ledger]\nbackend = \"redis\"\nurl = \"{url}\"\n{ledger_extra}\n\
         [[backends]]\nname = \"sim\"\nsimulate = {{ ttft_ms = 1 }}\nmodel = \"sim\"\nquality = 0.5\ntimeout_s = 1\n\
         pricing = {{ input_per_mtok = 1, output_per_mtok = 1 }}\n\n\
         [[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n{user_extra}\n",
        "ab".repeat(32)
    )
}

fn parse(text: &str) -> Config {
    Config::parse(text, "t.toml", &|_: &str| None).unwrap_or_else(|e| panic!("{e}"))
}

/// A replica's ledger: what `tollgate serve` opens for this config.
fn open(config: &Config) -> Arc<dyn Ledger> {
    let metrics = Arc::new(Metrics::new().unwrap());
    let (ledger, _limiter) = tollgate::ledger::open(&config.ledger, &metrics).unwrap();
    ledger.requests_last_at_most(config.longest_request());
    ledger
}

async fn reserve(ledger: &Arc<dyn Ledger>, config: &Config, pico: i64, now: i64) -> Reserve {
    ledger.reserve(&Budgets::of_user(&config.users[0]), Usd::from_pico(pico), now).await.unwrap()
}

fn record(cost: i64) -> RequestRecord {
    RequestRecord {
        at_ms: NOW * 1000,
        user: "alice".into(),
        route: "auto".into(),
        backend: "sim".into(),
        reason: "quality-first".into(),
        prompt_tokens: 3,
        completion_tokens: 4,
        cost: Usd::from_pico(cost),
        status: 200,
        latency_ms: 5,
        request_id: tollgate::telemetry::RequestId::from_stored(&format!("req-{cost}")),
    }
}

#[tokio::test]
async fn a_dead_replicas_reservation_expires_with_its_ttl_and_a_live_ones_is_kept() {
    let redis = RedisServer::start();
    let config = parse(&config_text(&redis.url(), "reservation_ttl_s = 2", "budget_usd = 100"));
    let (dying, living, other) = (open(&config), open(&config), open(&config));
    assert!(matches!(reserve(&dying, &config, 40 * USD, NOW).await, Reserve::Reserved { .. }));
    let Reserve::Reserved { id, .. } = reserve(&living, &config, 40 * USD, NOW).await else { panic!() };
    drop(dying); // never settles nor releases: as if its process were killed

    assert_eq!(
        reserve(&other, &config, 30 * USD, NOW).await,
        Reserve::Refused { scope: Scope::User, remaining: Usd::from_pico(20 * USD) }
    );
    // Past the TTL: the dead replica's reservation is gone; the living one (a long stream)
    // was renewed by its replica and still counts.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let user = &Budgets::of_user(&config.users[0]);
    assert_eq!(other.remaining(user, NOW).await.unwrap().map(|l| l.usd), Some(Usd::from_pico(60 * USD)));
    living.release(user, id, Usd::from_pico(40 * USD), NOW);
    living.flush().await.unwrap();
    assert_eq!(other.remaining(user, NOW).await.unwrap().map(|l| l.usd), Some(Usd::from_pico(100 * USD)));
}

#[tokio::test]
async fn amounts_past_2_pow_53_pico_usd_are_compared_exactly() {
    let redis = RedisServer::start();
    let config = parse(&config_text(&redis.url(), "", "budget_usd = 1000000"));
    let ledger = open(&config);
    let budget = 1_000_000 * USD;
    assert!(matches!(reserve(&ledger, &config, budget - 1, NOW).await, Reserve::Reserved { .. }));
    assert_eq!(
        reserve(&ledger, &config, 2, NOW).await,
        Reserve::Refused { scope: Scope::User, remaining: Usd::from_pico(1) }
    );
    let Reserve::Reserved { remaining, .. } = reserve(&ledger, &config, 1, NOW).await else { panic!("1 pico fits") };
    assert_eq!(remaining.map(|l| l.usd), Some(Usd::ZERO));
    let usage = ledger.usage(Budgets::of_user(&config.users[0]).user(), NOW).await.unwrap();
    assert_eq!(usage.reserved, Usd::from_pico(budget));
}

#[tokio::test]
async fn a_new_day_starts_from_zero_spend_and_keeps_open_reservations() {
    let redis = RedisServer::start();
    let config = parse(&config_text(&redis.url(), "", "budget_usd = 100\nbudget_period = \"day\""));
    let ledger = open(&config);
    let user = &Budgets::of_user(&config.users[0]);
    let Reserve::Reserved { id, .. } = reserve(&ledger, &config, 30 * USD, NOW).await else { panic!() };
    ledger.settle(user, id, Usd::from_pico(30 * USD), record(20 * USD), NOW);
    assert!(matches!(reserve(&ledger, &config, 10 * USD, NOW).await, Reserve::Reserved { .. }));
    ledger.flush().await.unwrap();

    assert_eq!(ledger.remaining(user, NOW).await.unwrap().map(|l| l.usd), Some(Usd::from_pico(70 * USD)));
    let today = ledger.usage(user.user(), NOW).await.unwrap();
    assert_eq!((today.totals.spent, today.totals.requests), (Usd::from_pico(20 * USD), 1));
    assert_eq!(today.by_backend["sim"].completion_tokens, 4);
    let tomorrow = NOW + 86_400;
    assert_eq!(ledger.remaining(user, tomorrow).await.unwrap().map(|l| l.usd), Some(Usd::from_pico(90 * USD)));
    let next = ledger.usage(user.user(), tomorrow).await.unwrap();
    assert_eq!((next.totals.spent, next.reserved), (Usd::ZERO, Usd::from_pico(10 * USD)));
    let records = ledger.records(10).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].cost, Usd::from_pico(20 * USD));
    assert_eq!(records[0].request_id.as_ref().map(|id| id.as_str().to_owned()), Some(format!("req-{}", 20 * USD)));
}

#[tokio::test]
async fn a_release_frees_the_budget_and_scripts_forgotten_by_redis_are_loaded_again() {
    let redis = RedisServer::start();
    let config = parse(&config_text(&redis.url(), "", "budget_usd = 100"));
    let ledger = open(&config);
    let user = &Budgets::of_user(&config.users[0]);
    let Reserve::Reserved { id, .. } = reserve(&ledger, &config, 100 * USD, NOW).await else { panic!() };
    ledger.release(user, id, Usd::from_pico(100 * USD), NOW);
    ledger.flush().await.unwrap();
    // As after a Redis restart without persistence of its script cache.
    let mut client = redis.client().await;
    redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut client).await.unwrap();
    assert!(matches!(reserve(&ledger, &config, 100 * USD, NOW).await, Reserve::Reserved { .. }));
}

#[tokio::test]
async fn the_redis_password_comes_from_password_env() {
    let redis = RedisServer::start_with(&["--requirepass", "pw-from-env"]);
    let text = config_text(&redis.url(), "password_env = \"TEST_REDIS_PASSWORD\"\ntimeout_ms = 2000", "budget_usd = 1");
    let env = |name: &str| (name == "TEST_REDIS_PASSWORD").then(|| "pw-from-env".to_owned());
    let config = Config::parse(&text, "t.toml", &env).unwrap();
    assert!(matches!(reserve(&open(&config), &config, 1, NOW).await, Reserve::Reserved { .. }));

    let without = parse(&config_text(&redis.url(), "", "budget_usd = 1"));
    let error = open(&without).reserve(&Budgets::of_user(&without.users[0]), Usd::from_pico(1), NOW).await.unwrap_err();
    assert!(!error.to_string().contains("pw-from-env"));
}

#[test]
fn redis_settings_are_validated_with_file_line_and_field_and_the_url_never_printed() {
    let bad = config_text("redis://:s3cret@127.0.0.1:notaport", "key_prefix = \"has space\"\ntimeout_ms = 0", "");
    let error = Config::parse(&bad, "t.toml", &|_: &str| None).unwrap_err().to_string();
    assert!(error.contains("t.toml:3: ledger.url: not a valid"), "{error}");
    assert!(error.contains("t.toml:4: ledger.key_prefix:"), "{error}");
    assert!(error.contains("t.toml:5: ledger.timeout_ms: must be above 0"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    let short = config_text("redis://127.0.0.1:6379", "reservation_ttl_s = 1", "");
    let error = Config::parse(&short, "t.toml", &|_: &str| None).unwrap_err().to_string();
    assert!(error.contains("t.toml:4: ledger.reservation_ttl_s: must be longer than the longest backend"), "{error}");

    let good = parse(&config_text("redis://:s3cret@127.0.0.1:6379/2", "key_prefix = \"prod:\"", ""));
    assert!(!format!("{good:?}").contains("s3cret"), "the config's Debug hides the password");
}
