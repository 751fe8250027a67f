//! From a spanned TOML table to a [`Config`]: types, ranges and cross-field checks, with every
//! problem recorded (with its line) rather than stopping at the first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use toml_edit::Table;

use super::document::{Fields, Problems};
use super::{
    Backend, BudgetPeriod, Cascade, Config, Env, Ledger, LedgerStore, OnLedgerError, Pacing, Policy, Pricing,
    RedisStore, Route, Server, Simulate, Target, Usd, User,
};
use crate::secret::Secret;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
const DEFAULT_SHUTDOWN_GRACE_S: u64 = 30;
const DEFAULT_TIMEOUT_S: u64 = 120;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_MAX_TOKENS: u32 = 512;
const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_MAX_CONNECTIONS: u64 = 4096;
const DEFAULT_HEADER_READ_TIMEOUT_S: u64 = 10;
const DEFAULT_BODY_READ_TIMEOUT_S: u64 = 30;
const DEFAULT_MAX_HEADER_BYTES: u64 = 8192;
const DEFAULT_MAX_QUEUE: u32 = 256;
const DEFAULT_RETENTION_DAYS: u64 = 30;
const DEFAULT_REDIS_KEY_PREFIX: &str = "tollgate:";
/// A Redis round trip is well under a millisecond on a LAN; past this, something is wrong and
/// the failure policy decides rather than the client waiting.
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 500;
const DEFAULT_REDIS_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// A small model on a CPU core: what hourly estimates assume unless told otherwise.
const DEFAULT_EXPECTED_TOKENS_PER_S: u32 = 20;
/// A mean token log-probability below this (about 37% average token probability) is unsure.
const DEFAULT_CASCADE_THRESHOLD: f64 = -1.0;
/// Budget share a paced user may run ahead of the period's elapsed share.
const DEFAULT_PACING_SLACK: f64 = 0.05;
const DEFAULT_SIMULATED_TEXT: &str = "This answer comes from a simulated Tollgate backend.";

pub(super) fn config(root: &Table, p: &mut Problems<'_>, env: &dyn Env) -> Config {
    let mut top = Fields::new("", root, 1);
    let server = top.table(p, "server").map_or_else(default_server, |mut f| server(&mut f, p, env));
    let (ledger, ttl_line) =
        top.table(p, "ledger").map_or_else(|| (default_ledger(), 0), |mut f| ledger(&mut f, p, env));
    let mut backend_fields = top.array_of_tables(p, "backends");
    let backends: Vec<Arc<Backend>> = backend_fields.iter_mut().map(|f| Arc::new(backend(f, p, env))).collect();
    let mut route_fields = top.array_of_tables(p, "routes");
    let routes: Vec<Route> = route_fields.iter_mut().map(|f| route(f, p, &backends)).collect();
    let mut user_fields = top.array_of_tables(p, "users");
    let users: Vec<Arc<User>> = user_fields.iter_mut().map(|f| Arc::new(user(f, p))).collect();

    if backends.is_empty() {
        p.at_line(1, "backends", "at least one [[backends]] entry is required");
    }
    unique(p, &backend_fields, "name", backends.iter().map(|b| b.name.as_str()));
    unique(p, &route_fields, "model", routes.iter().map(|r| r.model.as_str()));
    unique(p, &user_fields, "name", users.iter().map(|u| u.name.as_str()));
    let key_hashes: Vec<String> = users.iter().map(|u| hex(&u.key_sha256)).collect();
    unique(p, &user_fields, "key_sha256", key_hashes.iter().map(String::as_str));
    for (route, f) in routes.iter().zip(&route_fields) {
        if backends.iter().any(|b| b.name == route.model) {
            let message = format!("route `{}` has the name of a backend; pinning would be ambiguous", route.model);
            p.at_line(f.line_of(p, "model"), &f.path_of("model"), message);
        }
    }

    if let LedgerStore::Redis(RedisStore { reservation_ttl: Some(ttl), .. }) = &ledger.store {
        let longest = backends.iter().map(|b| b.timeout).max().unwrap_or_default();
        if *ttl <= longest {
            let message = format!(
                "must be longer than the longest backend `timeout_s` ({} s), or a live request's reservation could expire",
                longest.as_secs()
            );
            p.at_line(ttl_line, "ledger.reservation_ttl_s", message);
        }
    }
    for f in backend_fields.into_iter().chain(route_fields).chain(user_fields) {
        f.finish(p);
    }
    top.finish(p);
    Config { server, ledger, backends, routes, users }
}

fn default_ledger() -> Ledger {
    Ledger {
        store: LedgerStore::Memory,
        on_ledger_error: OnLedgerError::FailClosed,
        retention: Duration::from_secs(DEFAULT_RETENTION_DAYS * 86_400),
    }
}

fn default_server() -> Server {
    Server {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        max_body_bytes: DEFAULT_MAX_BODY_BYTES as usize,
        admin_key: None,
        shutdown_grace: Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_S),
        queue_timeout: Duration::from_millis(DEFAULT_QUEUE_TIMEOUT_MS),
        max_queue: DEFAULT_MAX_QUEUE,
        max_connections: DEFAULT_MAX_CONNECTIONS as usize,
        header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_S),
        body_read_timeout: Duration::from_secs(DEFAULT_BODY_READ_TIMEOUT_S),
        max_header_bytes: DEFAULT_MAX_HEADER_BYTES as usize,
        metrics_key: None,
    }
}

fn server(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Server {
    let listen_text = f.optional::<String>(p, "listen").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = listen_text.parse().unwrap_or_else(|_| {
        let message = format!("`{listen_text}` is not an address like 127.0.0.1:8080");
        p.at_line(f.line_of(p, "listen"), &f.path_of("listen"), message);
        default_server().listen
    });
    let max_body_bytes = positive(f, p, "max_body_bytes").unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let admin_key = secret(f, p, env, "admin_key_env");
    let grace = f.optional::<u64>(p, "shutdown_grace_s").unwrap_or(DEFAULT_SHUTDOWN_GRACE_S);
    let queue_timeout_ms = f.optional::<u64>(p, "queue_timeout_ms").unwrap_or(DEFAULT_QUEUE_TIMEOUT_MS);
    let max_queue = f.optional::<u32>(p, "max_queue").unwrap_or(DEFAULT_MAX_QUEUE);
    let max_connections = positive(f, p, "max_connections").unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let header_read_timeout_s = positive(f, p, "header_read_timeout_s").unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_S);
    let body_read_timeout_s = positive(f, p, "body_read_timeout_s").unwrap_or(DEFAULT_BODY_READ_TIMEOUT_S);
    let max_header_bytes = positive(f, p, "max_header_bytes").unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    let metrics_key = secret(f, p, env, "metrics_key_env");
    f.finish(p);
    Server {
        listen,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        admin_key,
        shutdown_grace: Duration::from_secs(grace),
        queue_timeout: Duration::from_millis(queue_timeout_ms),
        max_queue,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_read_timeout: Duration::from_secs(header_read_timeout_s),
        body_read_timeout: Duration::from_secs(body_read_timeout_s),
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
        metrics_key,
    }
}

/// The `[ledger]` table, and the line of `reservation_ttl_s` (checked against the backends).
fn ledger(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> (Ledger, usize) {
    let kind = f.optional::<String>(p, "backend").unwrap_or_else(|| "memory".to_owned());
    let path = f.optional::<String>(p, "path");
    let url = f.optional::<String>(p, "url");
    let redis = redis_settings(f, p, env);
    let store = match kind.as_str() {
        "memory" => LedgerStore::Memory,
        "sqlite" => LedgerStore::Sqlite { path: path.unwrap_or_else(|| "data/tollgate.db".to_owned()) },
        "redis" => match url {
            Some(url) if redis_url_ok(&url) => LedgerStore::Redis(RedisStore { url: Secret::new(url), ..redis }),
            Some(_) => {
                // The URL may hold a password: the message never repeats it.
                let message = "not a valid `redis://[:password@]host:port[/db]` or `rediss://` URL";
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), message);
                LedgerStore::Memory
            }
            None => {
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), "redis needs `url = \"redis://host:port\"`");
                LedgerStore::Memory
            }
        },
        other => {
            let message = format!("`{other}` is not one of \"memory\", \"sqlite\", \"redis\"");
            p.at_line(f.line_of(p, "backend"), &f.path_of("backend"), message);
            LedgerStore::Memory
        }
    };
    let on_ledger_error = match f.optional::<String>(p, "on_ledger_error").as_deref() {
        None | Some("fail-closed") => OnLedgerError::FailClosed,
        Some("fail-open") => OnLedgerError::FailOpen,
        Some(other) => {
            let message = format!("`{other}` is not one of \"fail-closed\", \"fail-open\"");
            p.at_line(f.line_of(p, "on_ledger_error"), &f.path_of("on_ledger_error"), message);
            OnLedgerError::FailClosed
        }
    };
    let retention_days = positive(f, p, "retention_days").unwrap_or(DEFAULT_RETENTION_DAYS);
    let ttl_line = f.line_of(p, "reservation_ttl_s");
    f.finish(p);
    let retention = Duration::from_secs(retention_days.saturating_mul(86_400));
    (Ledger { store, on_ledger_error, retention }, ttl_line)
}

/// The Redis keys other than `url` (read whatever the backend, so none is an unknown key).
fn redis_settings(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> RedisStore {
    let key_prefix = f.optional::<String>(p, "key_prefix").unwrap_or_else(|| DEFAULT_REDIS_KEY_PREFIX.to_owned());
    let ok = key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'));
    if key_prefix.is_empty() || !ok {
        let message = "must be non-empty and hold only letters, digits, `-`, `_`, `.`, `:` and `/`";
        p.at_line(f.line_of(p, "key_prefix"), &f.path_of("key_prefix"), message);
    }
    let timeout_ms = positive(f, p, "timeout_ms").unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
    let connect_ms = positive(f, p, "connect_timeout_ms").unwrap_or(DEFAULT_REDIS_CONNECT_TIMEOUT_MS);
    let reservation_ttl = positive(f, p, "reservation_ttl_s").map(Duration::from_secs);
    let password = secret(f, p, env, "password_env");
    RedisStore {
        url: Secret::new(String::new()),
        password,
        key_prefix,
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_millis(connect_ms),
        reservation_ttl,
    }
}

fn redis_url_ok(url: &str) -> bool {
    use redis::IntoConnectionInfo;
    (url.starts_with("redis://") || url.starts_with("rediss://")) && url.into_connection_info().is_ok()
}

fn backend(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Backend {
    let name = f.required::<String>(p, "name").unwrap_or_default();
    check_label(f, p, "name", &name);
    let tier = f.optional::<String>(p, "tier").unwrap_or_else(|| "default".to_owned());
    check_label(f, p, "tier", &tier);
    let model = f.required::<String>(p, "model").unwrap_or_default();
    let quality = f.required::<f64>(p, "quality").unwrap_or(0.0);
    if !(0.0..=1.0).contains(&quality) {
        p.at_line(f.line_of(p, "quality"), &f.path_of("quality"), format!("must be between 0 and 1, got {quality}"));
    }
    let context_window = positive(f, p, "context_window").map_or(8192, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let max_concurrency = positive(f, p, "max_concurrency").map_or(64, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let timeout_s = positive(f, p, "timeout_s").unwrap_or(DEFAULT_TIMEOUT_S);
    let connect_ms = positive(f, p, "connect_timeout_ms").unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
    let first_byte_s = positive(f, p, "first_byte_timeout_s").unwrap_or(timeout_s);
    let target = target(f, p, env);
    let pricing = pricing(f, p);
    let expected_tokens_per_s = positive(f, p, "expected_tokens_per_s").map_or_else(
        || match &target {
            // A simulated backend's speed is known exactly.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "speed rounded to whole tokens"
            )]
            Target::Simulated(sim) => (sim.tokens_per_s.round() as u32).max(1),
            Target::Http { .. } => DEFAULT_EXPECTED_TOKENS_PER_S,
        },
        |v| u32::try_from(v).unwrap_or(u32::MAX),
    );
    Backend {
        name,
        tier,
        target,
        model,
        quality,
        context_window,
        max_concurrency,
        timeout: Duration::from_secs(timeout_s),
        connect_timeout: Duration::from_millis(connect_ms),
        first_byte_timeout: Duration::from_secs(first_byte_s.min(timeout_s)),
        pricing,
        expected_tokens_per_s,
    }
}

fn target(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Target {
    let base_url = f.optional::<String>(p, "base_url");
    let api_key = secret(f, p, env, "api_key_env");
    let simulate = f.table(p, "simulate").map(|mut s| {
        let ttft_ms = s.optional::<u64>(p, "ttft_ms").unwrap_or(200);
        let tokens_per_s = s.optional::<f64>(p, "tokens_per_s").unwrap_or(50.0);
        if tokens_per_s <= 0.0 {
            p.at_line(s.line_of(p, "tokens_per_s"), &s.path_of("tokens_per_s"), "must be above 0");
        }
        let quality_text = s.optional::<String>(p, "quality_text").unwrap_or_else(|| DEFAULT_SIMULATED_TEXT.to_owned());
        if quality_text.split_whitespace().next().is_none() {
            p.at_line(s.line_of(p, "quality_text"), &s.path_of("quality_text"), "must hold at least one word");
        }
        s.finish(p);
        Simulate {
            ttft: Duration::from_millis(ttft_ms),
            tokens_per_s: tokens_per_s.max(f64::MIN_POSITIVE),
            quality_text,
        }
    });
    match (base_url, simulate) {
        (Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.parse::<http::Uri>().is_err() {
                // The URL itself is not echoed: it may carry credentials.
                p.at_line(f.line_of(p, "base_url"), &f.path_of("base_url"), "is not an http:// or https:// URL");
            }
            Target::Http { base_url: url.trim_end_matches('/').to_owned(), api_key }
        }
        (None, Some(sim)) => Target::Simulated(sim),
        (Some(_), Some(sim)) => {
            p.at_line(
                f.line_of(p, "simulate"),
                &f.path_of("simulate"),
                "set either `base_url` or `simulate`, not both",
            );
            Target::Simulated(sim)
        }
        (None, None) => {
            p.at_line(f.line(), &f.path_of("base_url"), "set `base_url` (a real upstream) or `simulate`");
            Target::Http { base_url: String::new(), api_key }
        }
    }
}

fn pricing(f: &mut Fields<'_>, p: &mut Problems<'_>) -> Pricing {
    let free = Pricing::PerToken { input_per_mtok: Usd::ZERO, output_per_mtok: Usd::ZERO, cached_input_per_mtok: None };
    let Some(mut t) = f.table(p, "pricing") else {
        p.at_line(f.line(), &f.path_of("pricing"), "missing required field `pricing` (per token or per hour)");
        return free;
    };
    let input = amount(&mut t, p, "input_per_mtok");
    let output = amount(&mut t, p, "output_per_mtok");
    let cached = amount(&mut t, p, "cached_input_per_mtok");
    let hourly = amount(&mut t, p, "hourly_usd");
    let per_token = input.is_some() || output.is_some() || cached.is_some();
    let pricing = match (per_token, hourly) {
        (true, None) => {
            if input.is_none() || output.is_none() {
                p.at_line(
                    t.line(),
                    &t.path_of("input_per_mtok"),
                    "per-token pricing needs both `input_per_mtok` and `output_per_mtok`",
                );
            }
            Pricing::PerToken {
                input_per_mtok: input.unwrap_or(Usd::ZERO),
                output_per_mtok: output.unwrap_or(Usd::ZERO),
                cached_input_per_mtok: cached,
            }
        }
        (false, Some(hourly_usd)) => Pricing::PerHour { hourly_usd },
        (true, Some(_)) => {
            p.at_line(t.line(), t.path(), "set per-token prices or `hourly_usd`, not both");
            free
        }
        (false, None) => {
            p.at_line(t.line(), t.path(), "set per-token prices (`input_per_mtok`, `output_per_mtok`) or `hourly_usd`");
            free
        }
    };
    t.finish(p);
    pricing
}

fn route(f: &mut Fields<'_>, p: &mut Problems<'_>, backends: &[Arc<Backend>]) -> Route {
    let model = f.required::<String>(p, "model").unwrap_or_default();
    let names = f.required::<Vec<String>>(p, "backends").unwrap_or_default();
    let mut indexes = Vec::with_capacity(names.len());
    for name in &names {
        match backends.iter().position(|b| &b.name == name) {
            Some(i) if indexes.contains(&i) => {
                p.at_line(
                    f.line_of(p, "backends"),
                    &f.path_of("backends"),
                    format!("backend `{name}` is listed twice"),
                );
            }
            Some(i) => indexes.push(i),
            None => {
                p.at_line(f.line_of(p, "backends"), &f.path_of("backends"), format!("no backend is named `{name}`"));
            }
        }
    }
    if f.has("backends") && names.is_empty() {
        p.at_line(f.line_of(p, "backends"), &f.path_of("backends"), "a route needs at least one backend");
    }
    let default_max_tokens =
        positive(f, p, "default_max_tokens").map_or(DEFAULT_MAX_TOKENS, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let cascade = f.table(p, "cascade").map(|mut c| {
        let threshold = c.optional::<f64>(p, "threshold").unwrap_or(DEFAULT_CASCADE_THRESHOLD);
        match c.optional::<String>(p, "metric").as_deref() {
            None | Some("mean_logprob") => {}
            Some(other) => {
                let message = format!("`{other}` is not a known confidence metric (\"mean_logprob\")");
                p.at_line(c.line_of(p, "metric"), &c.path_of("metric"), message);
            }
        }
        let target_premium_share = c.optional::<f64>(p, "target_premium_share");
        if let Some(share) = target_premium_share.filter(|s| !(0.0..=1.0).contains(s)) {
            let message = format!("must be between 0 and 1, got {share}");
            p.at_line(c.line_of(p, "target_premium_share"), &c.path_of("target_premium_share"), message);
        }
        c.finish(p);
        Cascade { threshold, target_premium_share }
    });
    if cascade.is_some() && indexes.len() < 2 {
        p.at_line(f.line_of(p, "cascade"), &f.path_of("cascade"), "a cascade needs at least two backends");
    }
    Route { model, backends: indexes, default_max_tokens, cascade }
}

fn user(f: &mut Fields<'_>, p: &mut Problems<'_>) -> User {
    let name = f.required::<String>(p, "name").unwrap_or_default();
    check_label(f, p, "name", &name);
    let key_text = f.required::<String>(p, "key_sha256").unwrap_or_default();
    let key_sha256 = parse_sha256(&key_text).unwrap_or_else(|| {
        if f.has("key_sha256") {
            let message = "must be 64 hex digits, the output of `tollgate hash-key`";
            p.at_line(f.line_of(p, "key_sha256"), &f.path_of("key_sha256"), message);
        }
        [0; 32]
    });
    let policy = match f.optional::<String>(p, "policy").as_deref() {
        None | Some("quality-first") => Policy::QualityFirst,
        Some("cost-first") => Policy::CostFirst,
        Some(other) => {
            let message = format!("`{other}` is not one of \"quality-first\", \"cost-first\"");
            p.at_line(f.line_of(p, "policy"), &f.path_of("policy"), message);
            Policy::QualityFirst
        }
    };
    let budget_usd = amount(f, p, "budget_usd");
    let budget_period = match f.optional::<String>(p, "budget_period").as_deref() {
        None | Some("month") => BudgetPeriod::Month,
        Some("day") => BudgetPeriod::Day,
        Some("total") => BudgetPeriod::Total,
        Some(other) => {
            let message = format!("`{other}` is not one of \"day\", \"month\", \"total\"");
            p.at_line(f.line_of(p, "budget_period"), &f.path_of("budget_period"), message);
            BudgetPeriod::Month
        }
    };
    let max_request_usd = amount(f, p, "max_request_usd");
    let min_quality = f.optional::<f64>(p, "min_quality").unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_quality) {
        let message = format!("must be between 0 and 1, got {min_quality}");
        p.at_line(f.line_of(p, "min_quality"), &f.path_of("min_quality"), message);
    }
    let rpm = positive(f, p, "rpm").map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let tpm = positive(f, p, "tpm");
    let pacing_on = f.optional::<bool>(p, "pacing").unwrap_or(false);
    let slack = f.optional::<f64>(p, "pacing_slack").unwrap_or(DEFAULT_PACING_SLACK);
    if !(0.0..=1.0).contains(&slack) {
        p.at_line(
            f.line_of(p, "pacing_slack"),
            &f.path_of("pacing_slack"),
            format!("must be between 0 and 1, got {slack}"),
        );
    }
    let pacing = pacing_on.then_some(Pacing { slack });
    let clamp_max_tokens = f.optional::<bool>(p, "clamp_max_tokens").unwrap_or(false);
    User {
        name,
        key_sha256,
        policy,
        budget_usd,
        budget_period,
        max_request_usd,
        min_quality,
        rpm,
        tpm,
        pacing,
        clamp_max_tokens,
    }
}

/// A backend named by `*_env` is read now: a missing variable is a config problem, not a
/// surprise 401 from the upstream at the first request.
fn secret(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env, key: &'static str) -> Option<Secret> {
    let name = f.optional::<String>(p, key)?;
    match env.var(&name) {
        Some(value) if !value.is_empty() => Some(Secret::new(value)),
        _ => {
            let message = format!("environment variable `{name}` is not set");
            p.at_line(f.line_of(p, key), &f.path_of(key), message);
            None
        }
    }
}

fn positive(f: &mut Fields<'_>, p: &mut Problems<'_>, key: &'static str) -> Option<u64> {
    let value = f.optional::<u64>(p, key)?;
    if value == 0 {
        p.at_line(f.line_of(p, key), &f.path_of(key), "must be above 0");
        return None;
    }
    Some(value)
}

/// A USD amount: non-negative, at most [`Usd::CONFIG_MAX`], exact to the pico-dollar.
fn amount(f: &mut Fields<'_>, p: &mut Problems<'_>, key: &'static str) -> Option<Usd> {
    let value = f.optional::<f64>(p, key)?;
    if value < 0.0 {
        p.at_line(f.line_of(p, key), &f.path_of(key), format!("cannot be negative, got {value}"));
        return Some(Usd::ZERO);
    }
    Usd::from_config(value).or_else(|| {
        p.at_line(f.line_of(p, key), &f.path_of(key), format!("must be at most {}, got {value}", Usd::CONFIG_MAX));
        Some(Usd::ZERO)
    })
}

/// Names become metric label values and header values: keep them to a safe alphabet.
fn check_label(f: &Fields<'_>, p: &mut Problems<'_>, key: &str, value: &str) {
    let ok = value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !value.is_empty() && !ok {
        let message = format!("`{value}` may hold only letters, digits, `-`, `_` and `.`");
        p.at_line(f.line_of(p, key), &f.path_of(key), message);
    }
}

/// Reports the second and later entries whose `key` repeats an earlier one.
fn unique<'a>(p: &mut Problems<'_>, fields: &[Fields<'_>], key: &str, values: impl Iterator<Item = &'a str>) {
    let mut first_line: HashMap<&str, usize> = HashMap::new();
    for (value, f) in values.zip(fields) {
        if value.is_empty() || value.bytes().all(|b| b == b'0') {
            continue;
        }
        let line = f.line_of(p, key);
        if let Some(first) = first_line.get(value) {
            p.at_line(line, &f.path_of(key), format!("duplicate `{value}` (first at line {first})"));
        } else {
            first_line.insert(value, line);
        }
    }
}

pub(crate) fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
