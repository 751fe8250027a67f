//! `GET /admin/dashboard/overview`: the gateway's economics at a glance, read from its own
//! metric families, so every figure agrees with a `/metrics` scrape by construction. Totals
//! count from this process's start and cover this replica only (`scope`); per-user spend in a
//! budget period is the ledger's (`/admin/usage`).
//!
//! Which family each figure sums, and why:
//! - `spend_usd`: `tollgate_plan_cost_usd_total{plan,backend}`, which every settled request adds
//!   its cost to (`plan="none"` for a user on no plan). `tollgate_cost_usd_total{user,..}` holds
//!   only users with series of their own (config users, API users with `"metrics": true`), and
//!   `tollgate_team_cost_usd_total` only teams' members.
//! - `savings_usd`: `tollgate_plan_savings_usd_total{plan}`, everyone's, for the same reason
//!   (`tollgate_savings_usd_total{user}` is the per-user subset).
//! - `premium_share`: `tollgate_premium_tokens_total` over `tollgate_tokens_total`; both exist
//!   only per user with series, so the share is among those users' tokens.
//! - `requests`, `reasons` and each backend's `requests`: `tollgate_requests_total`, answers
//!   through a backend (a cache hit is none: it is in `cache`).
//! - `refusals`: `tollgate_rejected_requests_total{code}`, codes with at least one.
//! - `cache`: `tollgate_cache_requests_total{result}` and `tollgate_cache_saved_usd_total`;
//!   `null` when `[cache]` is off. `hit_rate` is hits / (hits + misses): bypasses could not hit.
//! - backends: `up` and `in_flight` are the live state (`tollgate_backend_up`,
//!   `tollgate_backend_in_flight` are set from it here as at a scrape), `idle_cost_usd` is
//!   `tollgate_idle_cost_usd_total`, booked up to now as a scrape does. A backend a reload
//!   removed stays listed while its counters do, with `configured: false`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use prometheus::core::Collector;
use prometheus::proto::MetricType;
use serde::Serialize;

use crate::app::AppState;
use crate::config::BudgetPeriod;
use crate::error::ApiError;
use crate::http::admin::Admin;
use crate::ledger::period;

#[derive(Serialize)]
pub struct Overview {
    /// `since_start_this_replica`: what every total below covers, but `today` and `month`.
    scope: &'static str,
    started_at: String,
    generated_at: String,
    /// The UTC day and month so far, every replica's, from the ledger's hourly rollups.
    today: SpanFigures,
    month: SpanFigures,
    spend_usd: f64,
    savings_usd: f64,
    idle_cost_usd: f64,
    premium_share: PremiumShare,
    requests: RequestCounts,
    /// Routing reasons by requests, most first.
    reasons: Vec<ReasonShare>,
    refusals: RefusalCounts,
    cache: Option<CacheOverview>,
    backends: Vec<BackendOverview>,
}

#[derive(Serialize)]
struct SpanFigures {
    from: String,
    to: String,
    #[serde(flatten)]
    figures: super::spend::Figures,
}

#[derive(Serialize)]
struct PremiumShare {
    premium_tokens: u64,
    tokens: u64,
    /// `None` before any token.
    share: Option<f64>,
}

#[derive(Serialize)]
struct RequestCounts {
    total: u64,
    by_status: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct RefusalCounts {
    total: u64,
    /// Codes with at least one refusal.
    by_code: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct ReasonShare {
    reason: String,
    requests: u64,
    share: f64,
}

#[derive(Serialize)]
struct CacheOverview {
    hits: u64,
    misses: u64,
    bypasses: u64,
    saved_usd: f64,
    hit_rate: Option<f64>,
}

#[derive(Serialize)]
struct BackendOverview {
    name: String,
    tier: Option<String>,
    /// In the running config (`false`: removed by a reload, counters kept).
    configured: bool,
    /// `per_token` or `per_hour`.
    pricing: Option<&'static str>,
    up: Option<bool>,
    in_flight: Option<u32>,
    requests: u64,
    by_status: BTreeMap<String, u64>,
    spend_usd: f64,
    idle_cost_usd: f64,
}

/// `GET /admin/dashboard/overview` (admin).
pub async fn overview(State(state): State<Arc<AppState>>, _: Admin) -> Result<Json<Overview>, ApiError> {
    crate::http::health::refresh_backends(&state);
    let now = crate::clock::unix_now();
    let hour_end = (now.div_euclid(3600) + 1) * 3600;
    let (day_start, month_start) = (period::start(BudgetPeriod::Day, now), period::start(BudgetPeriod::Month, now));
    let [today, month] = super::spend::spans(&state, [day_start, month_start], hour_end).await?;
    let span = |from: i64, figures| SpanFigures { from: period::rfc3339(from), to: period::rfc3339(hour_end), figures };
    let (today, month) = (span(day_start, today), span(month_start, month));
    let m = &state.metrics;
    let plan_cost = series(&m.plan_cost);
    let requests = series(&m.requests);
    let idle_cost = series(&m.idle_cost);
    let spend_by_backend = sum_by(&plan_cost, "backend");
    let idle_by_backend = sum_by(&idle_cost, "backend");

    let requests_total = count(total(&requests));
    let mut reasons: Vec<ReasonShare> = sum_by(&requests, "reason")
        .into_iter()
        .map(|(reason, n)| ReasonShare { reason, requests: count(n), share: ratio(n, total(&requests)).unwrap_or(0.0) })
        .collect();
    reasons.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.reason.cmp(&b.reason)));

    let rejected = series(&m.rejected);
    let premium_tokens = total(&series(&m.premium_tokens));
    let tokens = total(&series(&m.tokens));

    let snapshot = state.snapshot.load();
    let mut backends: Vec<BackendOverview> = snapshot
        .upstreams
        .iter()
        .map(|upstream| BackendOverview {
            name: upstream.backend.name.clone(),
            tier: Some(upstream.backend.tier.clone()),
            configured: true,
            pricing: Some(if upstream.backend.pricing.is_per_hour() { "per_hour" } else { "per_token" }),
            up: Some(upstream.state.is_up()),
            in_flight: Some(upstream.state.in_flight()),
            requests: 0,
            by_status: BTreeMap::new(),
            spend_usd: 0.0,
            idle_cost_usd: 0.0,
        })
        .collect();
    let removed: Vec<String> = requests
        .iter()
        .map(|s| s.label("backend"))
        .chain(spend_by_backend.keys().map(String::as_str))
        .chain(idle_by_backend.keys().map(String::as_str))
        .filter(|name| !backends.iter().any(|b| b.name == *name))
        .map(str::to_owned)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    backends.extend(removed.into_iter().map(|name| BackendOverview {
        name,
        tier: None,
        configured: false,
        pricing: None,
        up: None,
        in_flight: None,
        requests: 0,
        by_status: BTreeMap::new(),
        spend_usd: 0.0,
        idle_cost_usd: 0.0,
    }));
    for backend in &mut backends {
        for s in requests.iter().filter(|s| s.label("backend") == backend.name) {
            backend.requests += count(s.value);
            *backend.by_status.entry(s.label("status").to_owned()).or_default() += count(s.value);
        }
        backend.spend_usd = spend_by_backend.get(&backend.name).copied().unwrap_or(0.0);
        backend.idle_cost_usd = idle_by_backend.get(&backend.name).copied().unwrap_or(0.0);
    }

    let cache = state.cache.as_ref().map(|_| {
        let results = sum_by(&series(&m.cache.requests), "result");
        let result = |name: &str| results.get(name).copied().unwrap_or(0.0);
        CacheOverview {
            hits: count(result("hit")),
            misses: count(result("miss")),
            bypasses: count(result("bypass")),
            saved_usd: m.cache.saved.get(),
            hit_rate: ratio(result("hit"), result("hit") + result("miss")),
        }
    });

    Ok(Json(Overview {
        scope: "since_start_this_replica",
        started_at: period::rfc3339(state.started_at_unix),
        generated_at: period::rfc3339(now),
        today,
        month,
        spend_usd: total(&plan_cost),
        savings_usd: total(&series(&m.plan_savings)),
        idle_cost_usd: total(&idle_cost),
        premium_share: PremiumShare {
            premium_tokens: count(premium_tokens),
            tokens: count(tokens),
            share: ratio(premium_tokens, tokens),
        },
        requests: RequestCounts { total: requests_total, by_status: counts(sum_by(&requests, "status")) },
        reasons,
        refusals: RefusalCounts { total: count(total(&rejected)), by_code: counts(sum_by(&rejected, "code")) },
        cache,
        backends,
    }))
}

/// The non-zero counts of a sum by label.
pub(super) fn counts(sums: BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    sums.into_iter().map(|(label, value)| (label, count(value))).filter(|(_, n)| *n > 0).collect()
}

/// One series of a family: its labels and its value.
pub(super) struct Series {
    pub(super) labels: Vec<(String, String)>,
    pub(super) value: f64,
}

impl Series {
    pub(super) fn label(&self, name: &str) -> &str {
        self.labels.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v)
    }
}

/// Every series of a counter or gauge family, as a scrape would show it.
pub(super) fn series(family: &dyn Collector) -> Vec<Series> {
    let mut out = Vec::new();
    for f in family.collect() {
        let gauge = f.get_field_type() == MetricType::GAUGE;
        for metric in f.get_metric() {
            out.push(Series {
                labels: metric.get_label().iter().map(|l| (l.name().to_owned(), l.value().to_owned())).collect(),
                value: if gauge { metric.get_gauge().get_value() } else { metric.get_counter().get_value() },
            });
        }
    }
    out
}

pub(super) fn total(series: &[Series]) -> f64 {
    // From +0.0: `sum()` of no `f64` is -0.0, which JSON would show as `-0.0`.
    series.iter().fold(0.0, |sum, s| sum + s.value)
}

pub(super) fn sum_by(series: &[Series], label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for s in series {
        *sums.entry(s.label(label).to_owned()).or_default() += s.value;
    }
    sums
}

/// A counter's value as a count (integer counters are exposed as `f64`).
pub(super) fn count(value: f64) -> u64 {
    // Saturating: a counter is never negative, and no count reaches 2^53.
    value.round() as u64
}

pub(super) fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn series_are_summed_by_label_as_a_scrape_shows_them() {
        let metrics = Metrics::new().unwrap();
        metrics.plan_cost.with_label_values(&["pro", "gpu"]).inc_by(0.25);
        metrics.plan_cost.with_label_values(&["none", "gpu"]).inc_by(0.5);
        metrics.plan_cost.with_label_values(&["pro", "cpu"]).inc_by(0.125);
        let cost = series(&metrics.plan_cost);
        assert_eq!(total(&cost), 0.875);
        assert_eq!(sum_by(&cost, "backend"), BTreeMap::from([("cpu".into(), 0.125), ("gpu".into(), 0.75)]));

        metrics.requests.with_label_values(&["gpu", "premium", "quality-first", "200"]).inc_by(3);
        metrics.requests.with_label_values(&["cpu", "economy", "spill", "499"]).inc();
        let requests = series(&metrics.requests);
        assert_eq!(count(total(&requests)), 4);
        assert_eq!(sum_by(&requests, "status").get("499"), Some(&1.0));
        assert!(metrics.render().unwrap().contains("tollgate_plan_cost_usd_total{backend=\"gpu\",plan=\"pro\"} 0.25"));
    }

    #[test]
    fn a_share_of_nothing_is_none() {
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, 4.0), Some(0.25));
    }

    #[test]
    fn counts_keep_only_the_nonzero() {
        let sums = BTreeMap::from([("a".to_owned(), 2.0), ("b".to_owned(), 0.0)]);
        assert_eq!(counts(sums), BTreeMap::from([("a".to_owned(), 2)]));
    }
}
