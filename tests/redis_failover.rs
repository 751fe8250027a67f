//! The shared ledger through a Redis Sentinel failover: a real primary, a real replica and
//! three real sentinels (`redis-server --sentinel`), two real `tollgate serve` processes that
//! know only the sentinels, and the primary killed with SIGKILL under load. Service comes back
//! on the promoted replica without a restart, fail-closed refuses in the gap, and the spend
//! recorded equals the successful requests' cost, including the settlements the replica never
//! received (the gateways apply their replay window again on the new primary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::fleet::{
    self, load, redis_gateway_config, ten_dollar_request, RedisServer, Replica, SentinelServer, REQUEST_COST_USD,
};
use support::*;
use tokio::time::Instant;

const PREFIX: &str = "t:";
const MASTER: &str = "tollgate-ledger";
const PASSWORD: &str = "failover-test-password";

fn config(sentinels: &[String]) -> String {
    let sentinels = sentinels.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let ledger = format!(
        "sentinels = [{sentinels}]\nsentinel_master = \"{MASTER}\"\npassword_env = \"TEST_REDIS_PASSWORD\"\n\
         key_prefix = \"{PREFIX}\"\non_ledger_error = \"fail-closed\"\ntimeout_ms = 500\nconnect_timeout_ms = 500"
    );
    let alice =
        format!("[[users]]\nname = \"alice\"\nkey_sha256 = \"{}\"\nbudget_usd = 1000000\n", key_hash(ALICE_KEY));
    redis_gateway_config(&ledger, &alice)
}

async fn redis_client(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", server.port);
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Alice's spend and requests in the current period, as this server holds them.
async fn redis_spend(server: &RedisServer) -> (f64, u64) {
    fleet::redis_spend(&mut redis_client(server).await, PREFIX, "alice").await
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut check: impl FnMut() -> F) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {limit:?}: {what}");
}

/// `SENTINEL MASTER <name>`'s field, as text.
async fn master_field(sentinel: &SentinelServer, field: &str) -> String {
    let mut client = sentinel.client().await;
    let fields: Vec<String> = redis::cmd("SENTINEL").arg("MASTER").arg(MASTER).query_async(&mut client).await.unwrap();
    fields.chunks_exact(2).find(|pair| pair[0] == field).map(|pair| pair[1].clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_resumes_within_10_s_refuses_in_the_gap_and_loses_no_spend() {
    let auth = ["--requirepass", PASSWORD, "--masterauth", PASSWORD];
    let primary_server = RedisServer::start_with(&auth);
    let primary_port = primary_server.port.to_string();
    let mut primary = Some(primary_server);
    let replica_args: Vec<&str> = auth.iter().copied().chain(["--replicaof", "127.0.0.1", &primary_port]).collect();
    let replica = RedisServer::start_with(&replica_args);
    let mut replica_client = redis_client(&replica).await;
    until("the replica in sync", Duration::from_secs(10), || {
        let mut client = replica_client.clone();
        async move {
            let info: String = redis::cmd("INFO").arg("replication").query_async(&mut client).await.unwrap();
            info.contains("master_link_status:up")
        }
    })
    .await;
    let sentinels: Vec<SentinelServer> =
        (0..3).map(|_| SentinelServer::start(MASTER, primary.as_ref().unwrap().port, 2, PASSWORD)).collect();
    // An election needs a majority of sentinels that know each other, and a replica to promote.
    for sentinel in &sentinels {
        until("each sentinel knows the others and the replica", Duration::from_secs(20), || async {
            master_field(sentinel, "num-other-sentinels").await == "2"
                && master_field(sentinel, "num-slaves").await == "1"
        })
        .await;
    }

    let dir = tempfile::tempdir().unwrap();
    let text = config(&sentinels.iter().map(SentinelServer::address).collect::<Vec<_>>());
    let env = [("TEST_REDIS_PASSWORD", PASSWORD)];
    let gateways: Vec<Replica> =
        (0..2).map(|i| Replica::start_with_env(dir.path(), &format!("g{i}"), &text, &env)).collect();
    let client = reqwest::Client::new();
    for gateway in &gateways {
        until("ready on the primary the sentinels name", Duration::from_secs(10), || async {
            client.get(gateway.url("/readyz")).send().await.unwrap().status() == 200
        })
        .await;
    }

    let (stop, running) = load(&gateways, &[ALICE_KEY.to_owned()], 8);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Cut the replica off (it can no longer authenticate to resync), so that what the primary
    // takes from now on exists only there: the asynchronous replication's loss window, made
    // long enough to see.
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("masterauth").arg("wrong").query_async(&mut replica_client).await.unwrap();
    let mut primary_client = redis_client(primary.as_ref().unwrap()).await;
    let _: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica").query_async(&mut primary_client).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (unreplicated_spend, unreplicated_requests) = redis_spend(primary.as_ref().unwrap()).await;
    let (replica_spend, _) = redis_spend(&replica).await;
    drop(primary_client);
    primary.take().unwrap().kill();
    let killed = Instant::now();
    println!(
        "at the kill: the primary held ${unreplicated_spend} ({unreplicated_requests} requests), the replica ${replica_spend}"
    );

    // Readiness drops while no primary answers, and comes back without a restart.
    let mut unready_at = None;
    loop {
        assert!(killed.elapsed() < Duration::from_secs(20), "readiness not lost and regained within 20 s");
        let ready = client.get(gateways[0].url("/readyz")).send().await.unwrap().status() == 200;
        if !ready && unready_at.is_none() {
            unready_at = Some(killed.elapsed());
        }
        if ready && unready_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut resumed = Vec::new();
    for gateway in &gateways {
        until("a 200 again through the promoted replica", Duration::from_secs(20), || async {
            let response =
                client.post(gateway.url("/v1/chat/completions")).bearer_auth(ALICE_KEY).json(&ten_dollar_request());
            response.send().await.unwrap().status() == 200
        })
        .await;
        resumed.push(killed.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let outcomes = running.await.unwrap();

    let ok = outcomes.iter().filter(|(_, _, s, _)| *s == 200).count();
    let refused = outcomes.iter().filter(|(_, _, s, c)| *s == 503 && c == "ledger_unavailable").count();
    assert_eq!(ok + refused, outcomes.len(), "only 200 or 503 ledger_unavailable (fail-closed): {outcomes:?}");
    assert!(refused > 0, "requests in the gap are refused, not served unmetered");
    let last_refusal = outcomes.iter().filter(|(_, _, s, _)| *s == 503).map(|(_, at, _, _)| *at).max().unwrap();
    let gap = last_refusal.duration_since(killed);
    let promoted = master_field(&sentinels[0], "port").await;
    assert_eq!(promoted, replica.port.to_string(), "the sentinels promoted the replica");
    let slowest = resumed.iter().max().unwrap();
    println!(
        "failover: readiness lost {:?} after the kill, 200 again after {resumed:?}, last 503 at {gap:?}; \
         {ok} answered 200, {refused} refused 503",
        unready_at.unwrap()
    );
    assert!(*slowest <= Duration::from_secs(10), "service resumed after {slowest:?}, over 10 s");

    // Every 200's settlement ends up on the new primary, the unreplicated ones included, once.
    let successful_cost = ok as f64 * REQUEST_COST_USD;
    // The 200s sent by the polling loops above count too.
    let polled = gateways.len() as u64;
    until("every settlement on the new primary", Duration::from_secs(20), || async {
        redis_spend(&replica).await.1 >= ok as u64 + polled
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (spent, requests) = redis_spend(&replica).await;
    let mut replayed = 0.0;
    for gateway in &gateways {
        assert!(gateway.metric("tollgate_ledger_failovers_total").await >= 1.0);
        replayed += gateway.metric("tollgate_ledger_replayed_settlements_total").await;
    }
    println!(
        "after: the new primary holds ${spent} for {requests} requests; the 200s cost ${}; \
         {replayed} settlements replayed that the replica had never received",
        successful_cost + polled as f64 * REQUEST_COST_USD
    );
    assert_eq!(requests, ok as u64 + polled, "one settlement per 200, none lost, none twice");
    assert_eq!(spent, successful_cost + polled as f64 * REQUEST_COST_USD);
    assert!(replayed > 0.0, "the settlements only the dead primary had were applied again");
}
