//! The response cache: the zero-cost tier of the routing decision. An exact-match cache of
//! complete 200 answers, filed under a keyed hash of the scope and the canonical request
//! (`key`), served only to requests whose quality floor the producing backend meets, replayed
//! as a stream to streaming clients (`replay`), metered at $0 with the cost it avoided.

pub mod assemble;
mod key;
pub mod replay;
mod store;

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use prometheus::{Counter, IntCounterVec, IntGauge};

pub use self::key::{canonical, is_cacheable, CacheKey};
use crate::config::{CacheScope, CacheSettings, CacheStore, Env};
use crate::cost::Usd;
use crate::request::{Endpoint, ProxyRequest};
use crate::tenancy::Principal;

/// The routing reason of an answer served from the cache, in records, headers and metrics.
pub const REASON: &str = "cache";

/// Why the cache could not start.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache.secret_env: the environment variable `{0}` is not set or empty")]
    MissingSecret(String),
    #[error("cache.store = \"redis\" needs the ledger on redis")]
    NoRedis,
}

/// One stored answer.
#[derive(Debug)]
pub struct Cached {
    pub endpoint: Endpoint,
    /// The answer's JSON body, as it was served.
    pub body: Bytes,
    /// The backend that produced it, as configured then.
    pub backend: Arc<crate::config::Backend>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the answer cost when it was produced: what each hit saves.
    pub cost: Usd,
}

/// The verdict on one request, as `x-tollgate-cache` and the metrics say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Hit,
    Miss,
    /// Not looked up (not cacheable, `Cache-Control: no-cache`/`no-store`).
    Bypass,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// What a request does with the cache.
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    pub key: CacheKey,
    /// Served from the cache if there (not under `no-cache`).
    pub read: bool,
    /// Its answer stored (not under `no-store`).
    pub write: bool,
}

/// The cache's metrics.
#[derive(Clone)]
pub struct CacheMetrics {
    pub requests: IntCounterVec,
    pub saved: Counter,
    pub bytes: IntGauge,
    /// Store reads that failed (Redis away): served as misses.
    pub errors: prometheus::IntCounter,
}

pub struct ResponseCache {
    settings: CacheSettings,
    secret: Vec<u8>,
    store: store::Store,
    metrics: CacheMetrics,
    /// Requests whose answer is on its way, by key: identical requests wait for it.
    flights: Flights,
}

type Flights = Arc<dashmap::DashMap<CacheKey, tokio::sync::watch::Receiver<()>>>;

/// A request's part in single flight.
pub enum Flight {
    /// The first of identical requests: it asks the backend; its guard, dropped once its
    /// answer is stored (or failed), wakes the others.
    Leader(FlightGuard),
    /// Another is asking: wait on this (it closes when the leader's guard drops).
    Follower(tokio::sync::watch::Receiver<()>),
}

/// Held by a leader until its answer is stored or it gave up.
pub struct FlightGuard {
    flights: Flights,
    key: CacheKey,
    _done: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for FlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightGuard").finish_non_exhaustive()
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // Removed before the sender drops: a request arriving now leads a new flight rather
        // than waiting on a finished one.
        self.flights.remove(&self.key);
    }
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// The cache `settings` describe, or `None` when it is off.
    /// `redis`: the ledger's store, for `store = "redis"`.
    pub fn open(
        settings: &CacheSettings,
        env: &dyn Env,
        metrics: CacheMetrics,
        redis: Option<&Arc<crate::ledger::redis::Store>>,
    ) -> Result<Option<Self>, CacheError> {
        if !settings.enabled {
            return Ok(None);
        }
        let secret = match &settings.secret_env {
            Some(name) => env
                .var(name)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| CacheError::MissingSecret(name.clone()))?
                .into_bytes(),
            None => {
                let mut random = vec![0u8; 32];
                // Without the OS's randomness, a per-process value still keeps keys unguessable
                // from outside the process for this process's lifetime.
                if getrandom::getrandom(&mut random).is_err() {
                    random = format!("{}:{}", std::process::id(), crate::clock::unix_now_ns()).into_bytes();
                }
                random
            }
        };
        let store = match (settings.store, redis) {
            (CacheStore::Memory, _) => store::Store::memory(settings.max_bytes, settings.ttl, metrics.bytes.clone()),
            (CacheStore::Redis, Some(ledger)) => store::Store::Redis { ledger: Arc::clone(ledger), ttl: settings.ttl },
            (CacheStore::Redis, None) => return Err(CacheError::NoRedis),
        };
        for verdict in [Verdict::Hit, Verdict::Miss, Verdict::Bypass] {
            metrics.requests.with_label_values(&[verdict.label()]);
        }
        Ok(Some(Self { settings: settings.clone(), secret, store, metrics, flights: Flights::default() }))
    }

    /// What `request` from `principal` does with the cache: `None` when it bypasses it (not
    /// cacheable, or `Cache-Control: no-store` and `no-cache` both).
    pub fn lookup(&self, principal: &Principal, request: &ProxyRequest, headers: Option<&HeaderMap>) -> Option<Lookup> {
        if !is_cacheable(request, self.settings.cacheable) {
            return None;
        }
        let (no_cache, no_store) = headers.map_or((false, false), cache_control);
        let (read, write) = (!no_cache && !no_store, !no_store);
        if !read && !write {
            return None;
        }
        let user = &principal.user;
        let scope_id = match self.settings.scope {
            CacheScope::User => user.name.as_str(),
            CacheScope::Team => user.team.as_deref().unwrap_or(user.name.as_str()),
            CacheScope::Global => "",
        };
        // A user on no team under `team` scope is its own team, apart from any team's name.
        let scope = match (self.settings.scope, &user.team) {
            (CacheScope::Team, None) => CacheScope::User,
            (scope, _) => scope,
        };
        Some(Lookup { key: key::key(&self.secret, scope, scope_id, request), read, write })
    }

    /// A stored answer for `key` from a backend at least as good as `min_quality`;
    /// `backends`: the configuration in force. A store that fails is a miss.
    pub async fn get(
        &self,
        key: &CacheKey,
        min_quality: f64,
        backends: &[Arc<crate::config::Backend>],
    ) -> Option<Arc<Cached>> {
        match self.store.get(key, backends).await {
            Ok(found) => found.filter(|cached| cached.backend.quality >= min_quality),
            Err(e) => {
                self.metrics.errors.inc();
                tracing::debug!(error = %e, "the cache store failed: a miss");
                None
            }
        }
    }

    /// Joins the flight for `key`: leads it if no identical request is on its way.
    pub fn flight(&self, key: CacheKey) -> Flight {
        match self.flights.entry(key) {
            dashmap::Entry::Occupied(leader) => Flight::Follower(leader.get().clone()),
            dashmap::Entry::Vacant(place) => {
                let (done, waiting) = tokio::sync::watch::channel(());
                place.insert(waiting);
                Flight::Leader(FlightGuard { flights: Arc::clone(&self.flights), key, _done: done })
            }
        }
    }

    /// Stores `cached` under `key`, unless it is larger than an entry may be. `flight`: the
    /// leader's, released once the entry can be read (after Redis took it), so that the
    /// requests waiting on it find it.
    pub fn put(&self, key: CacheKey, cached: Cached, flight: Option<FlightGuard>) {
        if cached.body.len() as u64 > self.settings.max_entry_bytes {
            return;
        }
        self.store.put(key, cached, flight);
    }

    /// Counts a request's verdict, and what a hit saved.
    pub fn count(&self, verdict: Verdict, saved: Usd) {
        self.metrics.requests.with_label_values(&[verdict.label()]).inc();
        if verdict == Verdict::Hit {
            self.metrics.saved.inc_by(saved.as_f64());
        }
    }
}

/// A cacheable streamed answer on its way to the client, stored once it ended cleanly.
pub struct StreamCapture {
    assembler: assemble::Assembler,
    state: Arc<crate::app::AppState>,
    key: CacheKey,
    backend: Arc<crate::config::Backend>,
    /// Budget clamping shortened `max_tokens`: an answer cut by length is not stored.
    clamped: bool,
    /// A leader's flight: identical requests wait until the stream ends (and its answer is
    /// stored, when it is).
    flight: Option<FlightGuard>,
}

impl StreamCapture {
    /// `None` unless the request's answer may be stored.
    pub fn new(
        state: &Arc<crate::app::AppState>,
        lookup: Option<Lookup>,
        endpoint: Endpoint,
        backend: &Arc<crate::config::Backend>,
        clamped: bool,
        flight: Option<FlightGuard>,
    ) -> Option<Box<Self>> {
        let cache = state.cache.as_ref()?;
        let lookup = lookup.filter(|l| l.write)?;
        let max_bytes = usize::try_from(cache.settings.max_entry_bytes).unwrap_or(usize::MAX);
        Some(Box::new(Self {
            assembler: assemble::Assembler::new(endpoint, max_bytes),
            state: Arc::clone(state),
            key: lookup.key,
            backend: Arc::clone(backend),
            clamped,
            flight,
        }))
    }

    /// Complete events, as they go to the client.
    pub fn feed(&mut self, events: &[u8]) {
        self.assembler.feed(events);
    }

    /// The stream ended cleanly (`[DONE]`): stores the answer it made, if it made one.
    pub fn store(self, usage: Option<crate::openai::Usage>, cost: Usd) {
        let Self { assembler, state, key, backend, clamped, flight } = self;
        let Some(cache) = state.cache.as_ref() else { return };
        let endpoint = assembler.endpoint();
        let Some(answer) = assembler.finish(usage) else { return };
        if clamped && cut_by_length(&answer) {
            return;
        }
        let usage = usage.unwrap_or_default();
        let cached = Cached {
            endpoint,
            // Exactly its length: a serialiser's spare capacity would be kept with it.
            body: Bytes::copy_from_slice(&answer),
            backend,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost,
        };
        cache.put(key, cached, flight);
    }
}

/// Whether an answer ended because it ran out of tokens (`finish_reason: "length"` in any
/// choice).
pub fn cut_by_length(answer: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        finish_reason: Option<String>,
    }
    serde_json::from_slice::<Answer>(answer)
        .map_or(true, |a| a.choices.iter().any(|c| c.finish_reason.as_deref() == Some("length")))
}

/// `Cache-Control: no-cache` (do not serve from the cache) and `no-store` (do not store, nor
/// serve), case-insensitive, in any of the header's values.
fn cache_control(headers: &HeaderMap) -> (bool, bool) {
    let mut found = (false, false);
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        for directive in value.to_str().unwrap_or_default().split(',') {
            let directive = directive.trim();
            found.0 |= directive.eq_ignore_ascii_case("no-cache");
            found.1 |= directive.eq_ignore_ascii_case("no-store");
        }
    }
    found
}
