//! The application: shared state and the router.
//!
//! A request's way through, in order:
//! 1. `http::proxy` loads **one** config [`Snapshot`] for the whole request, so a reload never
//!    mixes two configs within one request, and takes the request's id (`x-request-id`, or a
//!    new one: `telemetry::request_id`), which the answer, the backend and the record carry.
//! 2. The bearer key resolves to a `tenancy::Principal` (401 otherwise) before the body is read,
//!    so an unauthenticated client cannot make the gateway buffer anything: a config user of
//!    that snapshot (`auth`), else an API user's key from the tenant cache, or from the store on
//!    first sight. The principal carries every level's budget (key, user, team) and rate limits.
//! 3. The body is read up to `max_body_bytes` (413) and parsed into a `ProxyRequest` (400). A
//!    Responses or Messages request (`http::client_api`) is translated to chat first (`apis`),
//!    keeping the client's own request for a backend that serves that API itself.
//! 4. `dispatch` resolves the model (404), applies rate limits (429), asks `policy::decide`
//!    with the backends' health, capacity and the smallest budget left across levels, reserves
//!    the estimate at every level in one step (429 `budget_exceeded` naming the level), sends,
//!    and falls back on failures before the first byte.
//! 5. A `metering::Meter` holds the request's slot, reservation and occupancy ticket, and
//!    settles the actual cost when the answer ends, fails or is dropped by the client.
//! 6. Every error becomes an `ApiError`, answered in the OpenAI shape by its one `IntoResponse`;
//!    `http::client_api` turns answers and errors back into the client's API (Anthropic's error
//!    shape on `/v1/messages`).
//! 7. The access log's line (`telemetry::access_log`) is written by `http::proxy` when the
//!    handler returns, or by the meter when a stream ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use tokio::sync::Notify;

use crate::config::{Config, Env};
use crate::ledger::{self, Ledger};
use crate::metrics::Metrics;
use crate::ratelimit::Limiter;
use crate::snapshot::Snapshot;
use crate::telemetry::trace::Counters;
use crate::telemetry::{AccessLog, Tracing};
use crate::tenancy::cache::Tenants;

/// State shared by every request.
pub struct AppState {
    /// The current config snapshot; swapped whole on reload.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<dyn Ledger>,
    pub limiter: Limiter,
    /// API users, teams and keys: the store and the cache of resolved keys.
    pub tenants: Arc<Tenants>,
    /// Notified whenever a backend slot is freed: queued requests decide again.
    pub freed: Arc<Notify>,
    /// Requests waiting for a slot (bounded by `server.max_queue`).
    pub queued: AtomicU32,
    /// Set on SIGTERM: `/readyz` turns 503 so load balancers drain this replica.
    pub draining: AtomicBool,
    /// The file the config came from (`None`: the embedded defaults, which cannot be reloaded).
    pub config_path: Option<PathBuf>,
    /// Where a reload reads the environment variables the config names.
    pub env: Arc<dyn Env + Send + Sync>,
    /// One reload at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Confidence-cascade thresholds per route, calibrated online; they survive reloads.
    pub calibrators: dashmap::DashMap<String, crate::cascade::Calibrator>,
    /// One line per request on standard output (`telemetry.access_log`).
    pub access_log: Arc<AccessLog>,
    /// OTLP traces (`telemetry.otlp_endpoint`); set at start.
    pub tracing: Option<Arc<Tracing>>,
    /// The response cache (`[cache]`; `None`: off).
    pub cache: Option<crate::cache::ResponseCache>,
    /// The dashboard's login sessions, by the SHA-256 of their cookie's token (a leaked map
    /// holds no usable token). Per replica and in memory: a restart logs everyone out.
    pub dashboard_sessions: dashmap::DashMap<[u8; 32], crate::http::dashboard::Session>,
    /// When this process started (Unix seconds): the dashboard's totals count from here.
    pub started_at_unix: i64,
    /// Every user's order by the figures of its period, kept for `/admin/usage?sort=`.
    pub ranked_users: crate::http::RankedUsers,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Tenants(#[from] crate::tenancy::store::StoreError),
    #[error("the access log's writer thread: {0}")]
    AccessLog(#[from] std::io::Error),
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::trace::TraceError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

impl AppState {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        env: Arc<dyn Env + Send + Sync>,
    ) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new()?);
        let (ledger, limiter) = ledger::open(&config.ledger, &metrics)?;
        let directory = crate::tenancy::open(&config.ledger, limiter.shared_store())?;
        let tenants = Arc::new(Tenants::new(directory, Arc::clone(&metrics), config.server.max_cached_keys));
        if tenants.directory.feed().is_some() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(crate::tenancy::cache::follow_feed(Arc::downgrade(&tenants)));
            }
        }
        ledger.requests_last_at_most(config.longest_request());
        let access_log = AccessLog::to_stdout(config.telemetry.access_log, metrics.access_log_dropped.clone())?;
        let tracing = Tracing::start(
            &config.telemetry,
            env.as_ref(),
            Counters {
                exported: metrics.trace_spans_exported.clone(),
                failures: metrics.trace_export_failures.clone(),
                dropped: metrics.trace_spans_dropped.clone(),
            },
        )?;
        let cache = crate::cache::ResponseCache::open(
            &config.cache,
            env.as_ref(),
            metrics.cache.clone(),
            limiter.shared_store(),
        )?;
        let freed = Arc::new(Notify::new());
        let snapshot = Snapshot::new(config, None, &freed)?;
        Ok(Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            ledger,
            limiter,
            tenants,
            freed,
            queued: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            config_path,
            env,
            reload_lock: tokio::sync::Mutex::new(()),
            calibrators: dashmap::DashMap::new(),
            access_log,
            tracing,
            cache,
            dashboard_sessions: dashmap::DashMap::new(),
            ranked_users: crate::http::RankedUsers::default(),
            started_at_unix: crate::clock::unix_now(),
        }))
    }
}

impl AppState {
    /// The principal whose key the request presents: a config user of `snapshot`, else an API
    /// user's key (from the cache, or the store on first sight).
    pub async fn authenticate(
        &self,
        snapshot: &Snapshot,
        headers: &http::HeaderMap,
        now: tokio::time::Instant,
    ) -> Result<Arc<crate::tenancy::Principal>, crate::auth::AuthError> {
        let key = crate::auth::presented(headers)?;
        match snapshot.keys.get(&key) {
            Some(principal) => Ok(Arc::clone(principal)),
            None => self.tenants.resolve(&snapshot.config, key, crate::clock::unix_now(), now).await,
        }
    }
}

/// The router: the seam tests and `serve` share.
pub fn app(state: Arc<AppState>) -> Router {
    crate::http::routes(state)
}
