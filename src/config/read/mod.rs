//! From a spanned TOML table to a [`Config`]: types, ranges and cross-field checks, with every
//! problem recorded (with its line) rather than stopping at the first.

mod backend;
mod server;

use std::collections::HashMap;
use std::sync::Arc;

use toml_edit::Table;

use self::backend::backend;
use self::server::{default_ledger, default_server, ledger, server};
use super::document::{Fields, Problems};
use super::{
    AccessLogFormat, Backend, BudgetPeriod, CacheScope, CacheSettings, CacheStore, Cacheable, Cascade, Config, Env,
    LedgerStore, LimitOverrides, Limits, MetricsSettings, Plan, Policy, Route, Telemetry, Usd, User,
};
use crate::secret::Secret;

const DEFAULT_MAX_TOKENS: u32 = 512;
/// A mean token log-probability below this (about 37% average token probability) is unsure.
const DEFAULT_CASCADE_THRESHOLD: f64 = -1.0;

pub(super) fn config(root: &Table, p: &mut Problems<'_>, env: &dyn Env) -> Config {
    let mut top = Fields::new("", root, 1);
    let server = top.table(p, "server").map_or_else(default_server, |mut f| server(&mut f, p, env));
    let (ledger, ttl_line) =
        top.table(p, "ledger").map_or_else(|| (default_ledger(), 0), |mut f| ledger(&mut f, p, env));
    let mut backend_fields = top.array_of_tables(p, "backends");
    let backends: Vec<Arc<Backend>> = backend_fields.iter_mut().map(|f| Arc::new(backend(f, p, env))).collect();
    let mut route_fields = top.array_of_tables(p, "routes");
    let routes: Vec<Route> = route_fields.iter_mut().map(|f| route(f, p, &backends)).collect();
    let mut plan_fields = top.array_of_tables(p, "plans");
    let plans: Vec<Arc<Plan>> = plan_fields.iter_mut().map(|f| Arc::new(plan(f, p))).collect();
    let mut user_fields = top.array_of_tables(p, "users");
    let users: Vec<Arc<User>> = user_fields.iter_mut().map(|f| Arc::new(user(f, p, &plans))).collect();
    let metrics = top.table(p, "metrics").map_or_else(MetricsSettings::default, |mut f| {
        let max_user_series =
            f.optional::<u64>(p, "max_user_series").map_or(1000, |v| u32::try_from(v).unwrap_or(u32::MAX));
        f.finish(p);
        MetricsSettings { max_user_series }
    });
    let telemetry = top.table(p, "telemetry").map_or_else(Telemetry::default, |mut f| telemetry(&mut f, p));
    let cache = top.table(p, "cache").map_or_else(CacheSettings::default, |mut f| cache(&mut f, p));

    if backends.is_empty() {
        p.at_line(1, "backends", "at least one [[backends]] entry is required");
    }
    unique(p, &backend_fields, "name", backends.iter().map(|b| b.name.as_str()));
    unique(p, &route_fields, "model", routes.iter().map(|r| r.model.as_str()));
    unique(p, &user_fields, "name", users.iter().map(|u| u.name.as_str()));
    unique(p, &plan_fields, "name", plans.iter().map(|plan| plan.name.as_str()));
    let key_hashes: Vec<String> = users.iter().map(|u| hex(&u.key_sha256)).collect();
    unique(p, &user_fields, "key_sha256", key_hashes.iter().map(String::as_str));
    for (route, f) in routes.iter().zip(&route_fields) {
        if backends.iter().any(|b| b.name == route.model) {
            let message = format!("route `{}` has the name of a backend; pinning would be ambiguous", route.model);
            p.at_line(f.line_of(p, "model"), &f.path_of("model"), message);
        }
    }

    let reservation_ttl = match &ledger.store {
        LedgerStore::Redis(redis) => redis.reservation_ttl,
        _ => None,
    };
    if let Some(ttl) = reservation_ttl {
        let longest = backends.iter().map(|b| b.timeout).max().unwrap_or_default();
        if ttl <= longest {
            let message = format!(
                "must be longer than the longest backend `timeout_s` ({} s), or a live request's reservation could expire",
                longest.as_secs()
            );
            p.at_line(ttl_line, "ledger.reservation_ttl_s", message);
        }
    }
    for f in backend_fields.into_iter().chain(route_fields).chain(plan_fields).chain(user_fields) {
        f.finish(p);
    }
    top.finish(p);
    if cache.enabled && cache.store == CacheStore::Redis && !matches!(ledger.store, LedgerStore::Redis(_)) {
        p.at_line(1, "cache.store", "\"redis\" is the ledger's Redis: set [ledger] backend = \"redis\"");
    }
    if cache.enabled && cache.store == CacheStore::Redis && cache.secret_env.is_none() {
        let message = "is needed with store = \"redis\": replicas must share the key of the cache's keys";
        p.at_line(1, "cache.secret_env", message);
    }
    Config { server, ledger, backends, routes, users, plans, metrics, telemetry, cache }
}

fn cache(f: &mut Fields<'_>, p: &mut Problems<'_>) -> CacheSettings {
    let defaults = CacheSettings::default();
    let enabled = f.optional::<bool>(p, "enabled").unwrap_or(true);
    let mut choice = |key: &'static str, allowed: &[&'static str]| -> Option<&'static str> {
        let text = f.optional::<String>(p, key)?;
        let found = allowed.iter().find(|a| **a == text).copied();
        if found.is_none() {
            let list = allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
            p.at_line(f.line_of(p, key), &f.path_of(key), format!("`{text}` is not one of {list}"));
        }
        found
    };
    let store = match choice("store", &["memory", "redis"]) {
        Some("redis") => CacheStore::Redis,
        _ => defaults.store,
    };
    let scope = match choice("scope", &["user", "team", "global"]) {
        Some("team") => CacheScope::Team,
        Some("global") => CacheScope::Global,
        _ => defaults.scope,
    };
    let cacheable = match choice("cacheable", &["deterministic", "all"]) {
        Some("all") => Cacheable::All,
        _ => defaults.cacheable,
    };
    let max_bytes = f.optional::<u64>(p, "max_bytes").unwrap_or(defaults.max_bytes);
    let max_entry_bytes = f.optional::<u64>(p, "max_entry_bytes").unwrap_or(defaults.max_entry_bytes);
    if max_bytes == 0 {
        p.at_line(f.line_of(p, "max_bytes"), &f.path_of("max_bytes"), "must be positive");
    }
    if max_entry_bytes == 0 || max_entry_bytes > max_bytes {
        p.at_line(
            f.line_of(p, "max_entry_bytes"),
            &f.path_of("max_entry_bytes"),
            "must be positive and at most max_bytes",
        );
    }
    let ttl_s = f.optional::<u64>(p, "ttl_s").unwrap_or(defaults.ttl.as_secs());
    if ttl_s == 0 {
        p.at_line(
            f.line_of(p, "ttl_s"),
            &f.path_of("ttl_s"),
            "must be positive (set enabled = false to turn the cache off)",
        );
    }
    let secret_env = f.optional::<String>(p, "secret_env");
    f.finish(p);
    CacheSettings {
        enabled,
        store,
        max_bytes,
        max_entry_bytes,
        ttl: std::time::Duration::from_secs(ttl_s),
        scope,
        cacheable,
        secret_env,
    }
}

fn telemetry(f: &mut Fields<'_>, p: &mut Problems<'_>) -> Telemetry {
    let defaults = Telemetry::default();
    let otlp_endpoint = f.optional::<String>(p, "otlp_endpoint");
    if let Some(endpoint) = &otlp_endpoint {
        let problem = match endpoint.parse::<http::Uri>() {
            Err(_) => Some("is not a URL (e.g. \"http://127.0.0.1:4318\")".to_owned()),
            Ok(uri) if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() => {
                Some("must be an http:// or https:// URL with a host (e.g. \"http://127.0.0.1:4318\")".into())
            }
            Ok(_) => None,
        };
        if let Some(message) = problem {
            p.at_line(f.line_of(p, "otlp_endpoint"), &f.path_of("otlp_endpoint"), message);
        }
    }
    let service_name = f.optional::<String>(p, "service_name").unwrap_or(defaults.service_name);
    if service_name.trim().is_empty() {
        p.at_line(f.line_of(p, "service_name"), &f.path_of("service_name"), "must not be empty");
    }
    let sample_ratio = f.optional::<f64>(p, "sample_ratio").unwrap_or(defaults.sample_ratio);
    if !(0.0..=1.0).contains(&sample_ratio) {
        p.at_line(f.line_of(p, "sample_ratio"), &f.path_of("sample_ratio"), "must be between 0 and 1");
    }
    let access_log = match f.optional::<String>(p, "access_log") {
        None => defaults.access_log,
        Some(text) => AccessLogFormat::parse(&text).unwrap_or_else(|| {
            let message = format!("`{text}` is not an access log format (\"json\", \"text\" or \"off\")");
            p.at_line(f.line_of(p, "access_log"), &f.path_of("access_log"), message);
            defaults.access_log
        }),
    };
    f.finish(p);
    Telemetry { otlp_endpoint, service_name, sample_ratio, access_log }
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

/// `[[plans]]`: a name, a price and the limits every user on it gets.
fn plan(f: &mut Fields<'_>, p: &mut Problems<'_>) -> Plan {
    let name = f.required::<String>(p, "name").unwrap_or_default();
    check_label(f, p, "name", &name);
    let price_usd = amount(f, p, "price_usd").unwrap_or(Usd::ZERO);
    let limits = limit_overrides(f, p).apply(&Limits::default());
    Plan { name, price_usd, limits }
}

/// `[[users]]`: a key and limits, its own or its plan's with its own values on top.
fn user(f: &mut Fields<'_>, p: &mut Problems<'_>, plans: &[Arc<Plan>]) -> User {
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
    let plan = f.optional::<String>(p, "plan").and_then(|plan_name| {
        let found = plans.iter().find(|plan| plan.name == plan_name).cloned();
        if found.is_none() {
            p.at_line(f.line_of(p, "plan"), &f.path_of("plan"), format!("no plan is named `{plan_name}`"));
        }
        found
    });
    let base = plan.as_ref().map_or_else(Limits::default, |plan| plan.limits.clone());
    let limits = limit_overrides(f, p).apply(&base);
    let mut user = User::new(name, &limits);
    user.key_sha256 = key_sha256;
    user.series = true;
    if let Some(plan) = plan {
        user.plan = Some(plan.name.as_str().into());
        user.price_usd = Some(plan.price_usd);
    }
    user
}

/// The limit fields of a plan or a user, each as given (or absent).
fn limit_overrides(f: &mut Fields<'_>, p: &mut Problems<'_>) -> LimitOverrides {
    let policy = f.optional::<String>(p, "policy").map(|text| {
        Policy::parse(&text).unwrap_or_else(|| {
            let message = format!("`{text}` is not one of \"quality-first\", \"cost-first\"");
            p.at_line(f.line_of(p, "policy"), &f.path_of("policy"), message);
            Policy::QualityFirst
        })
    });
    let budget_usd = amount(f, p, "budget_usd");
    let budget_period = f.optional::<String>(p, "budget_period").map(|text| {
        BudgetPeriod::parse(&text).unwrap_or_else(|| {
            let message = format!("`{text}` is not one of \"day\", \"month\", \"total\"");
            p.at_line(f.line_of(p, "budget_period"), &f.path_of("budget_period"), message);
            BudgetPeriod::Month
        })
    });
    let max_request_usd = amount(f, p, "max_request_usd");
    let min_quality = f.optional::<f64>(p, "min_quality");
    if let Some(q) = min_quality.filter(|q| !(0.0..=1.0).contains(q)) {
        let message = format!("must be between 0 and 1, got {q}");
        p.at_line(f.line_of(p, "min_quality"), &f.path_of("min_quality"), message);
    }
    let rpm = positive(f, p, "rpm").map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let tpm = positive(f, p, "tpm");
    let pacing = f.optional::<bool>(p, "pacing");
    let pacing_slack = f.optional::<f64>(p, "pacing_slack");
    if let Some(slack) = pacing_slack.filter(|s| !(0.0..=1.0).contains(s)) {
        let message = format!("must be between 0 and 1, got {slack}");
        p.at_line(f.line_of(p, "pacing_slack"), &f.path_of("pacing_slack"), message);
    }
    let clamp_max_tokens = f.optional::<bool>(p, "clamp_max_tokens");
    LimitOverrides {
        policy,
        budget_usd,
        budget_period,
        max_request_usd,
        min_quality,
        rpm,
        tpm,
        pacing,
        pacing_slack,
        clamp_max_tokens,
    }
}

/// A backend named by `*_env` is read now: a missing variable is a config problem, not a
/// surprise 401 from the upstream at the first request.
pub(super) fn secret(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env, key: &'static str) -> Option<Secret> {
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

pub(super) fn positive(f: &mut Fields<'_>, p: &mut Problems<'_>, key: &'static str) -> Option<u64> {
    let value = f.optional::<u64>(p, key)?;
    if value == 0 {
        p.at_line(f.line_of(p, key), &f.path_of(key), "must be above 0");
        return None;
    }
    Some(value)
}

/// A USD amount: non-negative, at most [`Usd::CONFIG_MAX`], exact to the pico-dollar.
pub(super) fn amount(f: &mut Fields<'_>, p: &mut Problems<'_>, key: &'static str) -> Option<Usd> {
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
pub(super) fn check_label(f: &Fields<'_>, p: &mut Problems<'_>, key: &str, value: &str) {
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
