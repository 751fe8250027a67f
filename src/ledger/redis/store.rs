//! The connection to Redis and what every Redis-backed part shares: one auto-reconnecting
//! multiplexed connection to the primary ([`primary`](super::primary): one URL or wherever
//! the sentinels say), the scripts, per-operation latency and error metrics, a short
//! fail-fast window after a failure, the backlog of writes waiting for Redis to return, and
//! the settlements of the last `replay_window_s`, applied again when another server takes
//! over as primary (Redis replicates asynchronously: a failover can lose the newest writes).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::primary::Connection;
use redis::{FromRedisValue, Script};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::local::Local;
use super::primary::{self, Target, PROBE_EVERY};
use super::replay::ReplayWindow;
use super::scripts::{Keys, Scripts};
use crate::config::{OnLedgerError, RedisStore};
use crate::cost::Usd;
use crate::ledger::LedgerError;
use crate::metrics::Metrics;

/// After a failed call, calls fail at once for this long instead of each waiting for the
/// timeout: a Redis outage costs requests microseconds, not `timeout_ms` each.
const FAIL_FAST: Duration = Duration::from_millis(250);
/// How often the backlog is retried while Redis is away.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// Writes waiting for Redis at most. Past it, fail-open stops admitting (it answers as
/// fail-closed would) rather than let unrecorded spend grow without bound.
pub const MAX_BACKLOG: usize = 100_000;

/// The operations, as the bounded `operation` label of the ledger metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Reserve,
    Settle,
    Release,
    Renew,
    Read,
    Records,
    RateLimit,
    RateSettle,
    /// The tenant directory's reads and writes.
    Tenants,
    /// The periodic check that the primary answers (and is still the same server).
    Probe,
    /// The response cache's reads and writes (`[cache] store = "redis"`).
    Cache,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Settle => "settle",
            Self::Release => "release",
            Self::Renew => "renew",
            Self::Read => "read",
            Self::Records => "records",
            Self::RateLimit => "rate_limit",
            Self::RateSettle => "rate_settle",
            Self::Tenants => "tenants",
            Self::Probe => "probe",
            Self::Cache => "cache",
        }
    }
}

/// Which script a deferred write runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteScript {
    Settle,
    Release,
    RateSettle,
}

/// A write that does not make its caller wait: run at once on its own task, and, if Redis
/// cannot take it and it `must_land`, kept in the backlog until Redis is back.
#[derive(Debug, Clone)]
pub struct Write {
    pub script: WriteScript,
    pub keys: Vec<String>,
    pub args: Vec<String>,
    /// The accounts and the cost it carries, to clear from the local accounting once applied.
    pub accounts: Vec<Arc<str>>,
    pub cost: Usd,
    /// Spend and reservations must land; a rate-limit correction may be lost.
    pub must_land: bool,
    /// Applied once already, and again after a failover.
    pub replayed: bool,
    /// On a cluster, what goes with the script to keys of other slots, each pipeline to one
    /// key: run once the script says it applied (not for a duplicate).
    pub then: Vec<redis::Pipeline>,
}

impl Write {
    fn op(&self) -> Op {
        match self.script {
            WriteScript::Settle => Op::Settle,
            WriteScript::Release => Op::Release,
            WriteScript::RateSettle => Op::RateSettle,
        }
    }
}

pub struct Store {
    target: Target,
    /// The primary's connection; `None` before the first call and, with sentinels, after the
    /// primary was lost (the next call asks them again).
    primary: Mutex<Option<Connection>>,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    /// The server last seen as primary (its `run_id`; a cluster's slot owners): another one
    /// means a failover.
    server: Mutex<Option<String>>,
    /// With sentinels, the address of the primary connected to.
    address: Mutex<Option<String>>,
    /// The primary answered the last probe (`/readyz`).
    reachable: AtomicBool,
    /// Notified after a failover: the reservations this replica holds are restored on the new
    /// primary ([`super::RedisLedger`]'s renew loop).
    pub failed_over: Notify,
    /// Writes applied within the replay window.
    replay: ReplayWindow,
    pub keys: Keys,
    pub scripts: Scripts,
    pub policy: OnLedgerError,
    pub metrics: Arc<Metrics>,
    /// What this replica knows of budgets while Redis is away (fail-open).
    pub local: Local,
    timeout: Duration,
    connect_timeout: Duration,
    /// Calls fail at once until then (set by a failure).
    fail_fast_until: Mutex<Option<Instant>>,
    backlog: Mutex<VecDeque<Write>>,
    draining: tokio::sync::Mutex<()>,
    /// Deferred writes running now (not yet applied nor in the backlog).
    in_flight: AtomicUsize,
    settled: Notify,
    wake: Notify,
    pub runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("Store").field("keys", &self.keys).field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn unavailable(op: Op, reason: impl Into<String>) -> LedgerError {
    LedgerError::Unavailable { operation: op.label(), reason: reason.into() }
}

impl Store {
    /// Prepares the client; the connection is made on first use (and re-made after a
    /// failure), so a gateway starts while Redis is still down.
    pub fn open(settings: &RedisStore, policy: OnLedgerError, metrics: Arc<Metrics>) -> Result<Arc<Self>, LedgerError> {
        use redis::IntoConnectionInfo;
        // Errors name the category only: the URL may hold a password.
        let bad_url = |e: redis::RedisError| LedgerError::Storage(format!("redis url: {}", e.category()));
        let mut primary_settings = redis::RedisConnectionInfo::default();
        if let Some(password) = &settings.password {
            primary_settings = primary_settings.set_password(password.expose());
        }
        let target = match &settings.sentinel {
            None if !settings.cluster.is_empty() => {
                let nodes = settings.cluster.iter().map(|node| format!("redis://{node}"));
                let mut builder = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.timeout)
                    .retries(2);
                if let Some(password) = &settings.password {
                    builder = builder.password(password.expose());
                }
                let client =
                    builder.build().map_err(|e| LedgerError::Storage(format!("redis cluster: {}", e.category())))?;
                Target::Cluster(Box::new(client))
            }
            Some(sentinel) => Target::Sentinels(
                primary::Sentinels::new(sentinel, primary_settings)
                    .map_err(|e| LedgerError::Storage(format!("redis sentinels: {}", e.category())))?,
            ),
            None => {
                let mut info = settings.url.expose().into_connection_info().map_err(bad_url)?;
                if let Some(password) = &settings.password {
                    let redis = info.redis_settings().clone().set_password(password.expose());
                    info = info.set_redis_settings(redis);
                }
                Target::Direct(redis::Client::open(info).map_err(bad_url)?)
            }
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| LedgerError::Storage("the redis ledger needs a tokio runtime".into()))?;
        let store = Arc::new(Self {
            target,
            primary: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            server: Mutex::new(None),
            address: Mutex::new(None),
            reachable: AtomicBool::new(false),
            failed_over: Notify::new(),
            replay: ReplayWindow::new(settings.replay_window),
            keys: Keys::new(&settings.key_prefix),
            scripts: Scripts::default(),
            policy,
            metrics,
            local: Local::new(policy),
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            fail_fast_until: Mutex::new(None),
            backlog: Mutex::new(VecDeque::new()),
            draining: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            settled: Notify::new(),
            wake: Notify::new(),
            runtime,
        });
        store.runtime.spawn(reconcile_loop(Arc::downgrade(&store)));
        store.runtime.spawn(probe_loop(Arc::downgrade(&store)));
        Ok(store)
    }

    fn current(&self) -> Option<Connection> {
        self.primary.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether the ledger is a Redis Cluster (keys in their chain root's slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    async fn connection(&self) -> redis::RedisResult<Connection> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let (mut connection, address) = match &self.target {
            Target::Cluster(client) => (Connection::Cluster(client.get_async_connection().await?), None),
            _ => {
                let (client, address) = self.target.primary(self.connect_timeout).await?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                (Connection::Single(ConnectionManager::new_with_config(client, config).await?), address)
            }
        };
        if self.target.follows_sentinels() {
            // A sentinel may still name a primary it has just demoted.
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut connection).await?;
            if !primary::is_primary(&role) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                    "the address the sentinels gave is not a primary (yet)",
                )));
            }
        }
        // Loaded once up front (on a cluster, `SCRIPT LOAD` goes to every node); `EVALSHA`
        // reloads one after a `NOSCRIPT` (a restarted Redis, a promoted replica).
        for script in self.scripts.all() {
            script.load_async(&mut connection).await?;
        }
        let (_, server) = self.identify(&mut connection).await?;
        match &address {
            Some(address) => tracing::info!(primary = %address, "connected to the redis ledger's primary"),
            None => tracing::info!("connected to the redis ledger"),
        }
        *self.address.lock().unwrap_or_else(PoisonError::into_inner) = address;
        *self.primary.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
        if let Some(server) = server {
            self.saw_server(&server);
        }
        Ok(connection)
    }

    /// Whether the ledger can serve (a cluster: every slot owned), and which server answers
    /// as primary: its `run_id`, or a cluster's slot owners.
    async fn identify(&self, connection: &mut Connection) -> redis::RedisResult<(bool, Option<String>)> {
        if self.is_cluster() {
            // While a failed primary's slots have no owner, the cluster answers `CLUSTERDOWN`.
            let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(connection).await?;
            let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(connection).await?;
            return Ok((info.contains("cluster_state:ok"), Some(primary::slot_owners(&nodes))));
        }
        let info: String = redis::cmd("INFO").arg("server").query_async(connection).await?;
        Ok((true, primary::run_id(&info).map(str::to_owned)))
    }

    /// Drops the connection so that the next call asks the sentinels again (with one URL the
    /// connection manager reconnects by itself).
    fn forget_primary(&self) {
        if self.target.follows_sentinels() {
            self.primary.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }

    /// Records the primary's `run_id` (a cluster's: its slot owners); another server than the
    /// last one seen means a failover (or a restart): the writes of the replay window are
    /// applied again.
    fn saw_server(&self, server: &str) {
        let before = self.server.lock().unwrap_or_else(PoisonError::into_inner).replace(server.to_owned());
        if before.is_none_or(|before| before == server) {
            return;
        }
        let replay = self.replay.take(Instant::now());
        self.metrics.ledger_failovers.inc();
        tracing::warn!(
            replaying = replay.len(),
            window_s = self.replay.window().as_secs(),
            "another redis server is now the ledger's primary: applying again the settlements of the replay window"
        );
        // At the back, behind what waits already: the drain pops the front it applied, and
        // the order does not matter (settlements add up, a release of a gone hold is a no-op).
        let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        backlog.extend(replay);
        self.metrics.ledger_backlog.set(i64::try_from(backlog.len()).unwrap_or(i64::MAX));
        drop(backlog);
        self.failed_over.notify_one();
        self.wake.notify_one();
    }

    /// Whether the primary answered its last probe: `/readyz` under fail-closed.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// With sentinels, asks where the primary is and lets go of one that moved; then checks
    /// that the primary answers, and which server it is.
    async fn probe(&self) {
        if let Ok(Some(address)) = self.target.primary_address(self.connect_timeout).await {
            let moved =
                self.address.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|a| *a != address);
            if moved {
                tracing::warn!(primary = %address, "the sentinels name another primary for the redis ledger");
                self.forget_primary();
            }
        }
        let identity = self
            .guarded(Op::Probe, async {
                let mut connection = self.connection().await?;
                self.identify(&mut connection).await
            })
            .await;
        self.reachable.store(identity.as_ref().is_ok_and(|(serving, _)| *serving), Ordering::Relaxed);
        if let Ok((_, Some(server))) = identity {
            self.saw_server(&server);
        }
    }

    fn failing_fast(&self) -> bool {
        let until = self.fail_fast_until.lock().unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|t| Instant::now() < t)
    }

    fn outcome(&self, op: Op, ok: bool, started: Instant) {
        let m = &self.metrics;
        m.ledger_duration.with_label_values(&[op.label()]).observe(started.elapsed().as_secs_f64());
        let mut until = self.fail_fast_until.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            if until.take().is_some() {
                tracing::info!("the redis ledger answers again");
            }
            m.ledger_up.set(1);
        } else {
            m.ledger_errors.with_label_values(&[op.label()]).inc();
            m.ledger_up.set(0);
            *until = Some(Instant::now() + FAIL_FAST);
        }
    }

    /// Runs `script` with `keys` and `args`, within the operation timeout.
    pub async fn script<T: FromRedisValue>(
        &self,
        op: Op,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, LedgerError> {
        self.guarded(op, async {
            let mut connection = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs a plain command (reads that need no atomicity).
    pub async fn command<T: FromRedisValue>(&self, op: Op, command: redis::Cmd) -> Result<T, LedgerError> {
        self.guarded(op, async {
            let mut connection = self.connection().await?;
            command.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs plain commands in one round trip (reads of many keys that need no atomicity); the
    /// answer holds one value per command.
    /// Runs commands on one key (so one slot, even on a cluster) in one round trip, as they
    /// are (an atomic pipeline stays a `MULTI`/`EXEC`).
    pub async fn pipeline_on_one_key<T: FromRedisValue>(
        &self,
        op: Op,
        pipeline: &redis::Pipeline,
    ) -> Result<T, LedgerError> {
        self.guarded(op, async {
            let mut connection = self.connection().await?;
            pipeline.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// On a cluster the commands may be in different slots, so each is sent on its own (all
    /// at once, over the cluster client's connections) and the answers gathered in order.
    pub async fn pipeline<T: FromRedisValue>(&self, op: Op, pipeline: redis::Pipeline) -> Result<T, LedgerError> {
        self.guarded(op, async {
            let connection = self.connection().await?;
            if let Connection::Cluster(_) = connection {
                let calls = pipeline.cmd_iter().map(|command| {
                    let mut connection = connection.clone();
                    async move { command.query_async::<redis::Value>(&mut connection).await }
                });
                let mut answers = Vec::with_capacity(pipeline.len());
                for answer in futures_util::future::join_all(calls).await {
                    answers.push(answer?);
                }
                return Ok(T::from_redis_value(redis::Value::Array(answers))?);
            }
            let mut connection = connection;
            pipeline.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// One Redis call as every operation makes it: refused at once while failing fast, bounded
    /// by the operation timeout, timed and counted.
    async fn guarded<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LedgerError> {
        if self.failing_fast() {
            self.metrics.ledger_errors.with_label_values(&[op.label()]).inc();
            return Err(unavailable(op, "redis failed moments ago; retrying shortly"));
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            // The error text names the failure (refused, timed out...), never the URL.
            Ok(Err(e)) => {
                if primary::primary_lost(&e) {
                    self.forget_primary();
                }
                Err(unavailable(op, e.to_string()))
            }
            Err(_) => {
                self.forget_primary();
                Err(unavailable(op, format!("no answer within {} ms", self.timeout.as_millis())))
            }
        };
        if let Err(e) = &result {
            // Calls refused while failing fast are not logged: an outage would log every request.
            tracing::warn!(error = %e, "redis ledger operation failed");
        }
        self.outcome(op, result.is_ok(), started);
        result
    }

    async fn apply(&self, write: &Write) -> Result<(), LedgerError> {
        let script = match write.script {
            WriteScript::Settle => &self.scripts.settle,
            WriteScript::Release => &self.scripts.release,
            WriteScript::RateSettle => &self.scripts.rate_settle,
        };
        let applied = self.script::<i64>(write.op(), script, &write.keys, &write.args).await?;
        for account in &write.accounts {
            self.local.confirmed(account, write.cost);
        }
        if write.replayed && write.script == WriteScript::Settle && applied == 1 {
            self.metrics.ledger_replayed.inc();
        }
        if applied == 1 {
            for pipeline in &write.then {
                // Reports only (records, rankings, everyone's hour): a failure is counted and
                // logged, the spend is already in.
                let _ = self.pipeline_on_one_key::<()>(write.op(), pipeline).await;
            }
        }
        Ok(())
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn backlog_full(&self) -> bool {
        self.backlog_len() >= MAX_BACKLOG
    }

    fn defer(&self, write: Write) {
        if !write.must_land {
            return;
        }
        let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        if backlog.len() >= MAX_BACKLOG {
            // Only reachable past the bound fail-open stops at; say so loudly.
            tracing::error!(accounts = ?write.accounts, "the ledger backlog is full: a write to redis was dropped");
            return;
        }
        backlog.push_back(write);
        self.metrics.ledger_backlog.set(i64::try_from(backlog.len()).unwrap_or(i64::MAX));
    }

    /// Applies `write` on its own task; the caller never waits (it runs in a `Drop`).
    pub fn submit(self: &Arc<Self>, write: Write) {
        if self.failing_fast() || self.backlog_len() > 0 {
            // Redis is away: straight to the backlog, in order behind the others.
            self.defer(write);
            self.wake.notify_one();
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let store = Arc::clone(self);
        self.runtime.spawn(async move {
            match store.apply(&write).await {
                Ok(()) => store.replay.remember(write, Instant::now()),
                Err(_) => store.defer(write),
            }
            store.in_flight.fetch_sub(1, Ordering::AcqRel);
            store.settled.notify_waiters();
        });
    }

    /// Tries every write in the backlog, in order, until one fails. Returns what is left.
    async fn drain(&self) -> usize {
        // The reconcile loop and a flush may both drain: one at a time, or both would apply
        // the same front and each pop one.
        let _one_at_a_time = self.draining.lock().await;
        loop {
            let next = self.backlog.lock().unwrap_or_else(PoisonError::into_inner).front().cloned();
            let Some(write) = next else { return 0 };
            if self.apply(&write).await.is_err() {
                return self.backlog_len();
            }
            let left = {
                let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
                backlog.pop_front();
                backlog.len()
            };
            self.metrics.ledger_reconciled.inc();
            self.metrics.ledger_backlog.set(i64::try_from(left).unwrap_or(i64::MAX));
            self.replay.remember(write, Instant::now());
        }
    }

    /// Waits for the writes in flight, then tries the backlog once.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        loop {
            let settled = self.settled.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
            // A short cap: a notification racing the check costs milliseconds, not a hang.
            let _ = tokio::time::timeout(Duration::from_millis(20), settled).await;
        }
        // The fail-fast window must not turn a flush into an instant failure.
        *self.fail_fast_until.lock().unwrap_or_else(PoisonError::into_inner) = None;
        match self.drain().await {
            0 => Ok(()),
            left => Err(LedgerError::Unavailable {
                operation: "settle",
                reason: format!("{left} settlement(s) are still waiting for redis"),
            }),
        }
    }
}

/// Probes the primary while the store lives.
async fn probe_loop(store: Weak<Store>) {
    loop {
        let Some(strong) = store.upgrade() else { return };
        strong.probe().await;
        drop(strong);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Retries the backlog while the store lives.
async fn reconcile_loop(store: Weak<Store>) {
    loop {
        let Some(strong) = store.upgrade() else { return };
        if strong.backlog_len() > 0 && !strong.failing_fast() {
            let left = strong.drain().await;
            if left == 0 {
                tracing::info!("every settlement made while redis was away is now in redis");
            }
        }
        let wake = async { strong.wake.notified().await };
        let _ = tokio::time::timeout(RECONCILE_EVERY, wake).await;
        drop(strong);
    }
}
