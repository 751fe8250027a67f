//! Fills a gateway's tenant store with API users for the scale benchmark
//! (`benches/scale/run.py`): user `bench-<i>` on `--plan`, with one key each, written through
//! the same store code the admin API uses (SQLite tables or Redis scripts).
//!
//! ```text
//! seed_tenants --config tollgate.toml --users 1000000 [--plan basic] [--from 0] [--concurrency 64]
//! ```
//! Keys are derived, not random, so that the load client can name them without a file of a
//! million secrets: user i's key is `tg-` and the hex SHA-256 of `tollgate-scale-bench:<i>`
//! (the format generated keys have). Never use such keys outside a benchmark.
//! Prints one JSON object: users written and seconds taken.

use std::path::PathBuf;
use std::sync::Arc;
use tokio::time::Instant;

use tollgate::config::{BudgetPeriod, Config, ProcessEnv};
use tollgate::tenancy::model::{ApiKey, Member};
use tollgate::tenancy::store::Directory;

fn bench_key(i: u64) -> String {
    let digest = tollgate::auth::sha256(format!("tollgate-scale-bench:{i}").as_bytes());
    format!("tg-{}", tollgate::config::hex(&digest))
}

async fn seed_one(directory: &dyn Directory, plan: &str, i: u64, now: i64) -> Result<(), String> {
    let name = format!("bench-{i}");
    let member = Member {
        name: name.clone(),
        plan: plan.to_owned(),
        team: None,
        overrides: Default::default(),
        metrics: false,
        created_at: now,
    };
    directory.insert_user(member).await.map_err(|e| e.to_string())?;
    let key = bench_key(i);
    let id = format!("key_bench{i:016}");
    directory
        .insert_key(ApiKey {
            id: id.clone(),
            user: name,
            sha256: tollgate::auth::sha256(key.as_bytes()),
            prefix: key[..11].to_owned(),
            label: None,
            created_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            budget_usd: None,
            budget_period: BudgetPeriod::Month,
            rpm: None,
            lineage: id,
            end_users: None,
        })
        .await
        .map_err(|e| e.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut config_path, mut users, mut plan, mut from, mut concurrency) =
        (PathBuf::new(), 0u64, "basic".to_owned(), 0u64, 64u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => config_path = value.into(),
            "--users" => users = value.parse()?,
            "--plan" => plan = value,
            "--from" => from = value.parse()?,
            "--concurrency" => concurrency = value.parse::<u64>()?.max(1),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let config = Config::load(&config_path, &ProcessEnv)?;
    if config.plan(&plan).is_none() {
        return Err(format!("the config has no plan `{plan}`").into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let metrics = Arc::new(tollgate::metrics::Metrics::new()?);
        let (_ledger, limiter) = tollgate::ledger::open(&config.ledger, &metrics)?;
        let directory = tollgate::tenancy::open(&config.ledger, limiter.shared_store())?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let started = Instant::now();
        // SQLite writes on the caller's thread, one at a time anyway; Redis pipelines the
        // concurrent scripts over its one multiplexed connection.
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..concurrency {
            let (directory, plan) = (Arc::clone(&directory), plan.clone());
            workers.spawn(async move {
                let mut i = from + worker;
                while i < from + users {
                    seed_one(directory.as_ref(), &plan, i, now).await?;
                    i += concurrency;
                }
                Ok::<(), String>(())
            });
        }
        while let Some(done) = workers.join_next().await {
            done??;
        }
        println!(r#"{{"users":{users},"seconds":{:.3}}}"#, started.elapsed().as_secs_f64());
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
