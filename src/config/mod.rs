//! The validated runtime configuration and how it is loaded.
//!
//! Loading is parse (spanned TOML) → read (types, ranges and cross-field checks, every problem
//! collected). A config either loads whole or not at all: a running gateway
//! never sees half of a bad file.

mod document;
mod read;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use document::Problem;
pub use read::hex;
pub(crate) use read::parse_sha256;

pub use crate::cost::{Pricing, Usd};
use crate::secret::Secret;

/// The defaults the binary carries, so `tollgate serve` runs anywhere.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/tollgate.toml");

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub ledger: Ledger,
    pub backends: Vec<Arc<Backend>>,
    pub routes: Vec<Route>,
    pub users: Vec<Arc<User>>,
    /// `[[plans]]`: the templates API-created users are on.
    pub plans: Vec<Arc<Plan>>,
    pub metrics: MetricsSettings,
    pub telemetry: Telemetry,
    pub cache: CacheSettings,
}

/// `[cache]`: the response cache, the zero-cost tier.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub enabled: bool,
    pub store: CacheStore,
    /// The memory store's bound (answers' bytes and their keys).
    pub max_bytes: u64,
    /// The largest answer stored.
    pub max_entry_bytes: u64,
    pub ttl: Duration,
    pub scope: CacheScope,
    pub cacheable: Cacheable,
    /// The environment variable holding the key of the cache keys' HMAC; a random one per
    /// process when unset (fine for one gateway's memory store).
    pub secret_env: Option<String>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            store: CacheStore::Memory,
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            ttl: Duration::from_secs(3600),
            scope: CacheScope::User,
            cacheable: Cacheable::Deterministic,
            secret_env: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStore {
    Memory,
    Redis,
}

/// Whose answers a request may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    User,
    /// The user's team's (a user on no team: its own).
    Team,
    Global,
}

impl CacheScope {
    pub fn label(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Team => "team",
            Self::Global => "global",
        }
    }
}

/// Which requests are looked up and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cacheable {
    /// `temperature` 0 or a `seed`: the answers a client can expect to repeat.
    Deterministic,
    All,
}

/// `[metrics]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Per-user series at most for users created with `"metrics": true` (config users always
    /// have theirs): the `user` label stays bounded by configuration, not by subscribers.
    pub max_user_series: u32,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { max_user_series: 1000 }
    }
}

/// `[telemetry]`: the access log and (OTLP) traces.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// An OTLP/HTTP collector's base URL (`http://host:4318`); no traces without one.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub sample_ratio: f64,
    pub access_log: AccessLogFormat,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "tollgate".into(),
            sample_ratio: 1.0,
            access_log: AccessLogFormat::Off,
        }
    }
}

/// `telemetry.access_log`: one line per request on standard output, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AccessLogFormat {
    Off = 0,
    Json = 1,
    Text = 2,
}

impl AccessLogFormat {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "off" => Some(Self::Off),
            "json" => Some(Self::Json),
            "text" => Some(Self::Text),
            _ => None,
        }
    }

    /// The inverse of `as u8`; anything else is `Off`.
    pub fn from_u8(n: u8) -> Self {
        match n {
            1 => Self::Json,
            2 => Self::Text,
            _ => Self::Off,
        }
    }
}

/// `[[plans]]`: a named template of a user's limits, and what a subscriber on it pays.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    /// What a subscriber pays per budget period (revenue, for margin).
    pub price_usd: Usd,
    pub limits: Limits,
}

/// Everything that governs what a user may spend and get: the fields a plan sets and a user
/// may override.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub policy: Policy,
    pub budget_usd: Option<Usd>,
    pub budget_period: BudgetPeriod,
    pub max_request_usd: Option<Usd>,
    pub min_quality: f64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub pacing: Option<Pacing>,
    pub clamp_max_tokens: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            policy: Policy::QualityFirst,
            budget_usd: None,
            budget_period: BudgetPeriod::Month,
            max_request_usd: None,
            min_quality: 0.0,
            rpm: None,
            tpm: None,
            pacing: None,
            clamp_max_tokens: false,
        }
    }
}

/// A user's own values for some of its plan's fields; the rest come from the plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitOverrides {
    pub policy: Option<Policy>,
    pub budget_usd: Option<Usd>,
    pub budget_period: Option<BudgetPeriod>,
    pub max_request_usd: Option<Usd>,
    pub min_quality: Option<f64>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub pacing: Option<bool>,
    pub pacing_slack: Option<f64>,
    pub clamp_max_tokens: Option<bool>,
}

/// Budget share a paced user may run ahead of the period's elapsed share.
pub const DEFAULT_PACING_SLACK: f64 = 0.05;

impl LimitOverrides {
    /// `base` with these values in place of its own.
    pub fn apply(&self, base: &Limits) -> Limits {
        let pacing = match (self.pacing, self.pacing_slack) {
            (Some(false), _) => None,
            (Some(true), slack) => {
                Some(Pacing { slack: slack.or(base.pacing.map(|p| p.slack)).unwrap_or(DEFAULT_PACING_SLACK) })
            }
            (None, Some(slack)) => base.pacing.map(|_| Pacing { slack }),
            (None, None) => base.pacing,
        };
        Limits {
            policy: self.policy.unwrap_or(base.policy),
            budget_usd: self.budget_usd.or(base.budget_usd),
            budget_period: self.budget_period.unwrap_or(base.budget_period),
            max_request_usd: self.max_request_usd.or(base.max_request_usd),
            min_quality: self.min_quality.unwrap_or(base.min_quality),
            rpm: self.rpm.or(base.rpm),
            tpm: self.tpm.or(base.tpm),
            pacing,
            clamp_max_tokens: self.clamp_max_tokens.unwrap_or(base.clamp_max_tokens),
        }
    }
}

/// `[server]`
#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// `None` when no `admin_key_env` is set: the admin API is then closed.
    pub admin_key: Option<Secret>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a request may wait for a free slot when every candidate is at capacity.
    pub queue_timeout: Duration,
    /// How many requests may wait at once; beyond, 503 at once.
    pub max_queue: u32,
    /// Open client connections at most; beyond, a 503 and the connection is closed.
    pub max_connections: usize,
    /// A request head must arrive within this (also bounds idle keep-alive connections).
    pub header_read_timeout: Duration,
    /// A request body must arrive within this once its head is in.
    pub body_read_timeout: Duration,
    /// One header value at most (431 beyond).
    pub max_header_bytes: usize,
    /// When set, `/metrics` needs `Authorization: Bearer <this key>`.
    pub metrics_key: Option<Secret>,
    /// API keys resolved and kept in memory at most (about 2 KiB each with their account);
    /// read at start.
    pub max_cached_keys: usize,
}

/// `[ledger]`: where spend and reservations live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub store: LedgerStore,
    pub on_ledger_error: OnLedgerError,
    /// How long per-request records are kept.
    pub retention: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerStore {
    Memory,
    Sqlite { path: String },
    Redis(Box<RedisStore>),
}

/// `[ledger] backend = "redis"`: one Redis shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStore {
    /// `redis://` or `rediss://`; it may carry a password, so it never prints. With
    /// sentinels, the primary is found through them instead.
    pub url: Secret,
    /// `[ledger] sentinels` and `sentinel_master`: ask these Redis Sentinels where the primary
    /// of that master is, and follow its failovers.
    pub sentinel: Option<Sentinel>,
    /// `[ledger] cluster`: `host:port` of some Redis Cluster nodes, from which the client
    /// learns the rest (empty: not a cluster).
    pub cluster: Vec<String>,
    /// The Redis password (`AUTH`), from `password_env`: keeps it out of the config file.
    pub password: Option<Secret>,
    /// Every key starts with it, so several gateways (or environments) can share one Redis.
    pub key_prefix: String,
    /// Deadline of one Redis operation (a reservation, a read, a settlement).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a reservation holds budget if its replica dies before settling it. `None`:
    /// the longest backend `timeout_s` plus a margin, recomputed on reload.
    pub reservation_ttl: Option<Duration>,
    /// Settlements applied to Redis in this window before a failover are applied again on the
    /// new primary (each at most once: Redis remembers settlement ids), since replication is
    /// asynchronous and the newest writes may not have reached the replica that took over.
    pub replay_window: Duration,
}

/// The Sentinels watching the ledger's primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// `host:port` of each sentinel, asked in turn.
    pub addresses: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    pub master: String,
    /// `AUTH` for the sentinels themselves (`sentinel_password_env`); the primary uses
    /// `password_env`.
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLedgerError {
    FailClosed,
    FailOpen,
}

/// One OpenAI-compatible upstream (or an in-process simulated one).
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    /// A label for headers and metrics (`quality`, `economy`, ...).
    pub tier: String,
    pub target: Target,
    /// The API the upstream speaks: requests to an `Anthropic` backend are translated to the
    /// Messages API and its answers back (`apis::messages`).
    pub api: Api,
    /// The client APIs it serves itself: their requests go to it as they came.
    pub native: NativeApis,
    /// The upstream's model name: requests are rewritten to it.
    pub model: String,
    /// Token quality, 0..=1.
    pub quality: f64,
    /// Prompt plus completion tokens the backend accepts.
    pub context_window: u32,
    pub max_concurrency: u32,
    /// The longest the backend may stay silent: before its answer is complete (non-streamed),
    /// or between two pieces of a stream.
    pub timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers.
    pub first_byte_timeout: Duration,
    pub pricing: Pricing,
    /// Generation speed assumed when estimating an hourly-priced request's occupied time.
    pub expected_tokens_per_s: u32,
}

/// The API a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// The client APIs other than chat a backend serves itself (`native_apis`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NativeApis {
    pub responses: bool,
    pub messages: bool,
}

impl NativeApis {
    pub fn serves(self, dialect: crate::apis::Dialect) -> bool {
        match dialect {
            crate::apis::Dialect::Responses => self.responses,
            crate::apis::Dialect::Messages => self.messages,
            crate::apis::Dialect::Chat => true,
        }
    }
}

/// Where a backend's answers come from.
#[derive(Debug)]
pub enum Target {
    Http {
        /// Base URL without a trailing slash, e.g. `http://127.0.0.1:9001/v1`.
        base_url: String,
        /// Sent upstream as a bearer token; read from `api_key_env` at load.
        api_key: Option<Secret>,
    },
    Simulated(Simulate),
}

/// An in-process backend that answers like an OpenAI server without any network.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulate {
    pub ttft: Duration,
    pub tokens_per_s: f64,
    /// The text it answers with (repeated or cut to the completion length).
    pub quality_text: String,
}

/// A model alias that clients ask for, with its candidate backends.
#[derive(Debug)]
pub struct Route {
    pub model: String,
    /// Indexes into [`Config::backends`], in the order the file lists them.
    pub backends: Vec<usize>,
    /// Completion estimate when the request gives no `max_tokens`.
    pub default_max_tokens: u32,
    /// Confidence cascade for non-streamed chat: cheapest first, escalate when unsure.
    pub cascade: Option<Cascade>,
}

/// `cascade = { threshold = -1.0, metric = "mean_logprob", target_premium_share = 0.2 }`
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cascade {
    /// Answers whose mean token log-probability is below this are asked again one tier up.
    pub threshold: f64,
    /// When set, the threshold adapts online so that about this share of requests escalates.
    pub target_premium_share: Option<f64>,
}

/// A tenant's effective limits (its plan's, with its own overrides), whether it comes from
/// the file or the admin API. Config users are identified by the SHA-256 of their key; API
/// users have keys of their own (see `tenancy`) and a zero `key_sha256`.
///
/// Laid out (`repr(C)`) with what every request's routing decision reads first, in the first
/// two cache lines of its allocation: with thousands of users in use, each is cold.
#[derive(Debug)]
#[repr(C)]
pub struct User {
    pub policy: Policy,
    pub budget_period: BudgetPeriod,
    /// When the budget cannot pay `max_tokens`, shorten it to what it can pay.
    pub clamp_max_tokens: bool,
    /// Whether it has per-user metric series (config users, and API users created with
    /// `"metrics": true`).
    pub series: bool,
    pub min_quality: f64,
    /// `None`: no budget.
    pub budget_usd: Option<Usd>,
    pub max_request_usd: Option<Usd>,
    /// Budget pacing (quality-first users): ahead of the pace line by more than the slack,
    /// requests a cheaper backend can serve go there.
    pub pacing: Option<Pacing>,
    pub name: String,
    /// The plan it is on (`None`: a config user with limits of its own).
    pub plan: Option<Arc<str>>,
    /// The team whose budget it shares.
    pub team: Option<Arc<str>>,
    /// What it pays per budget period (its plan's `price_usd`), for margin.
    pub price_usd: Option<Usd>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub key_sha256: [u8; 32],
}

impl User {
    /// A user with `limits` and no plan, team or key.
    pub fn new(name: impl Into<String>, limits: &Limits) -> Self {
        Self {
            name: name.into(),
            key_sha256: [0; 32],
            plan: None,
            team: None,
            price_usd: None,
            series: false,
            policy: limits.policy,
            budget_usd: limits.budget_usd,
            budget_period: limits.budget_period,
            max_request_usd: limits.max_request_usd,
            min_quality: limits.min_quality,
            rpm: limits.rpm,
            tpm: limits.tpm,
            pacing: limits.pacing,
            clamp_max_tokens: limits.clamp_max_tokens,
        }
    }

    /// Its effective limits.
    pub fn limits(&self) -> Limits {
        Limits {
            policy: self.policy,
            budget_usd: self.budget_usd,
            budget_period: self.budget_period,
            max_request_usd: self.max_request_usd,
            min_quality: self.min_quality,
            rpm: self.rpm,
            tpm: self.tpm,
            pacing: self.pacing,
            clamp_max_tokens: self.clamp_max_tokens,
        }
    }
}

/// `pacing = true` and `pacing_slack`: how far ahead of the period's elapsed share the spent
/// share of the budget may run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    pub slack: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    QualityFirst,
    CostFirst,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QualityFirst => "quality-first",
            Self::CostFirst => "cost-first",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "quality-first" => Some(Self::QualityFirst),
            "cost-first" => Some(Self::CostFirst),
            _ => None,
        }
    }
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "total" => Some(Self::Total),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
    Total,
}

/// A config that did not load: every problem found, or why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{}", list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Where `${NAME}` values come from: the process environment, or a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl Backend {
    /// Completion tokens left in the context window after `prompt_tokens`.
    pub fn context_window_room(&self, prompt_tokens: u64) -> u64 {
        u64::from(self.context_window).saturating_sub(prompt_tokens)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Self::parse(&text, &file, env)
    }

    /// Validates config `text`; `file` names it in messages.
    pub fn parse(text: &str, file: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let mut problems = document::Problems::new(file, text);
        let doc = match toml_edit::ImDocument::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                problems.at(e.span(), "", format!("invalid TOML: {}", e.message()));
                return Err(ConfigError::Invalid(problems.into_vec()));
            }
        };
        let config = read::config(doc.as_table(), &mut problems, env);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems.into_vec()))
        }
    }

    /// The longest a request may live: the longest backend `timeout_s`.
    pub fn longest_request(&self) -> Duration {
        self.backends.iter().map(|b| b.timeout).max().unwrap_or_default()
    }

    pub fn plan(&self, name: &str) -> Option<&Arc<Plan>> {
        self.plans.iter().find(|p| p.name == name)
    }

    /// Index of the backend called `name`.
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == name)
    }
}
