//! The Redis ledger through its `Ledger` contract, against a real `redis-server`: expiry of a
//! dead replica's reservations, exact money above 2^53 pico-USD, period roll-over, scripts
//! reloaded after Redis forgot them, hourly rollups and standings, and the `[ledger]` keys'
//! validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::fleet::RedisServer;
use tollgate::config::BudgetPeriod;
use tollgate::config::{Config, LedgerStore};
use tollgate::cost::Usd;
use tollgate::ledger::budgets::{key_account, team_account};
use tollgate::ledger::rollup::{HourQuery, Rollups, HOUR_S};
use tollgate::ledger::{Budget, Budgets, Ledger, RequestRecord, Reserve, Scope};
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

/// The `i`th request of the rollup test: three users (and a fourth whose requests are all
/// free), two backends (one with a `/` in its name), over four hours, some failed, some costing
/// more than 2^53 pico-USD.
fn rollup_record(i: usize, this_hour: i64) -> RequestRecord {
    let n = i64::try_from(i).unwrap();
    let at_s = this_hour - HOUR_S * (n % 4) + (n * 97) % HOUR_S;
    RequestRecord {
        at_ms: at_s * 1000 + n % 1000,
        user: ["alice", "bob", "carol"][i % 3].into(),
        route: "auto".into(),
        backend: ["gpu/a", "cpu"][i / 3 % 2].into(),
        reason: "cost-first".into(),
        prompt_tokens: 10 + i as u64,
        completion_tokens: 2 * i as u64,
        cost: Usd::from_pico(if i % 5 == 0 { 10_000 * USD + n } else { n * 1_234_567 }),
        status: if i % 7 == 3 { 502 } else { 200 },
        latency_ms: 100 + 13 * i as u64,
        request_id: None,
    }
}

/// Reserves (more than any cost) and settles `record`.
async fn settle(ledger: &Arc<dyn Ledger>, budgets: &Budgets, record: RequestRecord, now: i64) {
    let reserved = Usd::from_pico(20_000 * USD);
    let Reserve::Reserved { id, .. } = ledger.reserve(budgets, reserved, now).await.unwrap() else {
        panic!("no budget: always reserved")
    };
    ledger.settle(budgets, id, reserved, record, now);
}

#[tokio::test]
async fn hourly_rollups_and_standings_read_back_what_was_settled_an_outages_settlements_too() {
    let mut redis = RedisServer::persistent();
    let users = [
        ("bob", "day"),
        ("carol", "total"),
        // All of dave's requests are free (cache hits): he has requests, and no spend.
        ("dave", "month"),
        ("erin", "month"),
    ];
    let mut user_extra = "budget_period = \"month\"\n".to_owned();
    for (i, (name, period)) in users.iter().enumerate() {
        let hash = format!("{:02x}", i + 1).repeat(32);
        user_extra.push_str(&format!(
            "\n[[users]]\nname = \"{name}\"\nkey_sha256 = \"{hash}\"\nbudget_period = \"{period}\"\n"
        ));
    }
    let config = parse(&config_text(&redis.url(), "on_ledger_error = \"fail-open\"\ntimeout_ms = 2000", &user_extra));
    let user = |name: &str| config.users.iter().find(|u| u.name == name).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let (ledger, _limiter) = tollgate::ledger::open(&config.ledger, &metrics).unwrap();
    let now = tollgate::clock::unix_now();
    let this_hour = now.div_euclid(HOUR_S) * HOUR_S;
    // Some requests also have a key's and a team's budget: the hours are still the user's.
    let key = Budget::new(Scope::Key, key_account("k1"), None, BudgetPeriod::Day);
    let team = Budget::new(Scope::Team, team_account("t1"), None, BudgetPeriod::Month);

    let mut reference = Rollups::default();
    let mut records = Vec::new();
    let budgets_of = |record: &RequestRecord, i: usize| {
        let who = user(&record.user);
        if i % 4 == 0 {
            Budgets::new(Some(key.clone()), who, Some(team.clone()))
        } else {
            Budgets::of_user(who)
        }
    };
    for i in 0..36 {
        let record = rollup_record(i, this_hour);
        reference.add(&record);
        records.push(record.clone());
        settle(&ledger, &budgets_of(&record, i), record, now).await;
    }
    for i in 0..3 {
        let record = RequestRecord { user: "dave".into(), cost: Usd::ZERO, ..rollup_record(i, this_hour) };
        reference.add(&record);
        records.push(record.clone());
        ledger.record_free(&Budgets::of_user(user("dave")), record, now);
    }
    ledger.flush().await.unwrap();

    // Redis goes away: fail-open reserves locally and the settlements wait in the backlog.
    redis.kill();
    for i in 36..48 {
        let record = rollup_record(i, this_hour);
        reference.add(&record);
        records.push(record.clone());
        settle(&ledger, &budgets_of(&record, i), record, now).await;
    }
    assert_eq!(metrics.ledger_backlog.get(), 12, "the outage's settlements wait for redis");
    redis.restart();
    let mut landed = false;
    for _ in 0..100 {
        if ledger.flush().await.is_ok() {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(landed, "the backlog reached redis once it was back");
    assert_eq!(metrics.ledger_backlog.get(), 0);

    let from = this_hour - 3 * HOUR_S;
    let to = this_hour + HOUR_S;
    let queries = [
        (None, from, to),
        // Only the hours starting in [from, to): a window not on the hour drops the first.
        (None, from + 1, this_hour),
        (Some("alice"), from, to),
        (Some("bob"), from, to),
        (Some("carol"), this_hour - HOUR_S, to),
        (Some("dave"), from, to),
        (Some("erin"), from, to),
    ];
    for (who, from, to) in queries {
        let query = HourQuery { user: who.map(Arc::from), from, to };
        let got = ledger.hourly(query.clone()).await.unwrap();
        assert_eq!(got, reference.read(&query), "{query:?}");
    }
    // The reference is checked against a sum by hand elsewhere; here, that the rows are not
    // trivially empty and hold what the records say.
    let everyone = ledger.hourly(HourQuery { user: None, from, to }).await.unwrap();
    assert_eq!(everyone.len(), 8, "4 hours x 2 backends: {everyone:?}");
    let total = |f: fn(&RequestRecord) -> i64| records.iter().map(f).sum::<i64>();
    let rows = |f: fn(&tollgate::ledger::rollup::Sums) -> i64| everyone.iter().map(|r| f(&r.sums)).sum::<i64>();
    assert_eq!(rows(|s| s.spent.pico()), total(|r| r.cost.pico()));
    assert_eq!(rows(|s| s.requests as i64), 51);
    assert_eq!(rows(|s| s.errors as i64), total(|r| i64::from(r.status >= 400)));
    assert_eq!(rows(|s| s.latency_ms as i64), total(|r| r.latency_ms as i64));
    assert!(everyone.iter().any(|r| &*r.backend == "gpu/a") && everyone.iter().any(|r| &*r.backend == "cpu"));
    assert!(ledger.hourly(HourQuery { user: Some("~key:k1".into()), from, to }).await.unwrap().is_empty());

    // A user's hours last as long as the records (30 days, the default, after the hour ends);
    // everyone's, 400 days after the hour starts.
    let mut client = redis.client().await;
    let expire_time = |key: String| redis::cmd("EXPIRETIME").arg(key).to_owned();
    let user_hour: i64 =
        expire_time(format!("tollgate:{{alice}}:hour:{this_hour}")).query_async(&mut client).await.unwrap();
    assert_eq!(user_hour, this_hour + HOUR_S + 30 * 86_400);
    let hour: i64 = expire_time(format!("tollgate:hour:{this_hour}")).query_async(&mut client).await.unwrap();
    assert_eq!(hour, this_hour + 400 * 86_400);

    let standings = ledger.standings(now).await.unwrap();
    let mut named: Vec<&str> = standings.iter().map(|s| &*s.user).collect();
    named.sort_unstable();
    assert_eq!(named, ["alice", "bob", "carol", "dave"], "erin has no request; keys and teams are no users");
    for standing in &standings {
        let usage = ledger.usage(Budgets::of_user(user(&standing.user)).user(), now).await.unwrap();
        assert_eq!(standing.account.period_start, usage.period_start, "{}", standing.user);
        assert_eq!(standing.account.totals, usage.totals, "{}", standing.user);
        assert_eq!(standing.account.by_backend, usage.by_backend, "{}", standing.user);
        let requests = records.iter().filter(|r| *r.user == *standing.user).count() as u64;
        assert_eq!(standing.account.totals.requests, requests, "{}", standing.user);
    }
    let dave = standings.iter().find(|s| &*s.user == "dave").unwrap();
    assert_eq!((dave.account.totals.requests, dave.account.totals.spent), (3, Usd::ZERO));
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

#[test]
fn sentinel_and_cluster_settings_are_validated_and_replace_the_url() {
    let sentinels = "sentinels = [\"127.0.0.1:26379\", \"[::1]:26380\"]\nsentinel_master = \"ledger\"";
    let text = config_text("redis://127.0.0.1:6379", "", "").replace("url = \"redis://127.0.0.1:6379\"", sentinels);
    let config = parse(&text);
    let LedgerStore::Redis(redis) = &config.ledger.store else { panic!("a redis ledger: {config:?}") };
    let sentinel = redis.sentinel.as_ref().unwrap();
    assert_eq!(sentinel.addresses, ["127.0.0.1:26379", "[::1]:26380"]);
    assert_eq!(sentinel.master, "ledger");
    assert_eq!(redis.replay_window, Duration::from_secs(10), "the default replay window");

    let both = config_text("redis://127.0.0.1:6379", sentinels, "");
    let error = Config::parse(&both, "t.toml", &|_: &str| None).unwrap_err().to_string();
    assert!(error.contains("ledger.url: set either `url` or `sentinels`"), "{error}");
    let no_master = text.replace("sentinel_master = \"ledger\"", "replay_window_s = 0");
    let error = Config::parse(&no_master, "t.toml", &|_: &str| None).unwrap_err().to_string();
    assert!(error.contains("ledger.sentinels: sentinels need `sentinel_master`"), "{error}");
    let cluster = config_text("redis://127.0.0.1:6379", "", "")
        .replace("url = \"redis://127.0.0.1:6379\"", "cluster = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]");
    let config = parse(&cluster);
    let LedgerStore::Redis(redis) = &config.ledger.store else { panic!("a redis ledger: {config:?}") };
    assert_eq!(redis.cluster, ["127.0.0.1:7000", "127.0.0.1:7001"]);
    let error =
        Config::parse(&cluster.replace("[[backends]]", &format!("{sentinels}\n[[backends]]")), "t.toml", &|_: &str| {
            None
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("ledger.cluster: set either `sentinels` or `cluster`"), "{error}");
    let error = Config::parse(
        &cluster.replace("cluster = [", "url = \"redis://127.0.0.1:6379\"\ncluster = ["),
        "t.toml",
        &|_: &str| None,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("ledger.url: set either `url` or `cluster`"), "{error}");
    let bad_address = text.replace("127.0.0.1:26379", "127.0.0.1");
    let error = Config::parse(&bad_address, "t.toml", &|_: &str| None).unwrap_err().to_string();
    assert!(error.contains("ledger.sentinels: `127.0.0.1` is not a `host:port` address"), "{error}");
}
