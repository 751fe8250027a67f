//! `GET /admin/dashboard/backends`: each backend's health, load, latency and cost. Live state
//! and latency come from this replica since its start (the metric families a scrape shows);
//! the last 24 hours' requests and spend come from the ledger's hourly rollups (every replica).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use prometheus::core::Collector;
use serde::Serialize;

use super::overview::{count, series, sum_by};
use crate::app::AppState;
use crate::error::ApiError;
use crate::http::admin::Admin;
use crate::ledger::period;
use crate::ledger::rollup::{HourQuery, Sums, HOUR_S};

#[derive(Serialize)]
pub struct Backends {
    object: &'static str,
    generated_at: String,
    /// What the live figures cover: `since_start_this_replica`.
    scope: &'static str,
    /// The hours `last_24h` sums (UTC, whole hours).
    window: Window,
    backends: Vec<Backend>,
}

#[derive(Serialize)]
struct Window {
    from: String,
    to: String,
}

#[derive(Serialize, Default)]
struct Backend {
    name: String,
    tier: Option<String>,
    quality: Option<f64>,
    /// In the running config (`false`: removed by a reload, its figures kept).
    configured: bool,
    pricing: Option<&'static str>,
    up: Option<bool>,
    in_flight: Option<u32>,
    max_in_flight: Option<u32>,
    /// An hourly backend's busy share of the time since start: its metered (busy) cost over
    /// metered plus idle cost, both at its hourly rate. `None` for per-token pricing.
    utilisation: Option<f64>,
    idle_cost_usd: f64,
    spend_usd: f64,
    requests: u64,
    errors: u64,
    latency_seconds: Option<Quantiles>,
    ttft_seconds: Option<Quantiles>,
    last_24h: Last24h,
}

#[derive(Serialize, Default)]
struct Last24h {
    requests: u64,
    errors: u64,
    spend_usd: f64,
    mean_latency_ms: Option<f64>,
}

#[derive(Serialize, Debug, PartialEq)]
struct Quantiles {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
}

/// The `q` quantile of a histogram, interpolated within its bucket as Prometheus's
/// `histogram_quantile` does: `buckets` are (upper bound, cumulative count), ascending.
fn quantile(buckets: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(upper, cumulative) in buckets {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        if cumulative as f64 >= rank {
            let in_bucket = (cumulative - lower.1) as f64;
            let into = if in_bucket > 0.0 { (rank - lower.1 as f64) / in_bucket } else { 1.0 };
            return Some(lower.0 + (upper - lower.0) * into);
        }
        lower = (upper, cumulative);
    }
    // Beyond the last finite bound: that bound is all that can be said.
    Some(lower.0)
}

/// Each backend's latency quantiles from a histogram family labelled by `backend`.
fn quantiles_by_backend(family: &dyn Collector) -> BTreeMap<String, Quantiles> {
    let mut out = BTreeMap::new();
    for f in family.collect() {
        for metric in f.get_metric() {
            let Some(backend) = metric.get_label().iter().find(|l| l.name() == "backend") else { continue };
            let h = metric.get_histogram();
            let buckets: Vec<(f64, u64)> =
                h.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
            let total = h.get_sample_count();
            let (Some(p50), Some(p90), Some(p99)) =
                (quantile(&buckets, total, 0.5), quantile(&buckets, total, 0.9), quantile(&buckets, total, 0.99))
            else {
                continue;
            };
            out.insert(backend.value().to_owned(), Quantiles { count: total, p50, p90, p99 });
        }
    }
    out
}

/// `GET /admin/dashboard/backends` (admin).
pub async fn backends(State(state): State<Arc<AppState>>, _: Admin) -> Result<Json<Backends>, ApiError> {
    crate::http::health::refresh_backends(&state);
    let now = crate::clock::unix_now();
    let to = (now.div_euclid(HOUR_S) + 1) * HOUR_S;
    let from = to - 24 * HOUR_S;
    let rows = state.ledger.hourly(HourQuery { user: None, from, to }).await?;
    let mut last_24h: BTreeMap<&str, Sums> = BTreeMap::new();
    for row in &rows {
        last_24h.entry(&row.backend).or_default().add(&row.sums);
    }

    let m = &state.metrics;
    let requests = series(&m.requests);
    let spend = sum_by(&series(&m.plan_cost), "backend");
    let idle = sum_by(&series(&m.idle_cost), "backend");
    let mut latency = quantiles_by_backend(&m.request_duration);
    let mut ttft = quantiles_by_backend(&m.time_to_first_token);

    let snapshot = state.snapshot.load();
    let mut list: Vec<Backend> = snapshot
        .upstreams
        .iter()
        .map(|upstream| {
            let b = &upstream.backend;
            Backend {
                name: b.name.clone(),
                tier: Some(b.tier.clone()),
                quality: Some(b.quality),
                configured: true,
                pricing: Some(if b.pricing.is_per_hour() { "per_hour" } else { "per_token" }),
                up: Some(upstream.state.is_up()),
                in_flight: Some(upstream.state.in_flight()),
                max_in_flight: (b.max_concurrency > 0).then_some(b.max_concurrency),
                ..Backend::default()
            }
        })
        .collect();
    let gone: std::collections::BTreeSet<&str> = requests
        .iter()
        .map(|s| s.label("backend"))
        .chain(spend.keys().map(String::as_str))
        .chain(last_24h.keys().copied())
        .filter(|name| !name.is_empty() && !list.iter().any(|b| b.name == *name))
        .collect();
    list.extend(gone.into_iter().map(|name| Backend { name: name.to_owned(), ..Backend::default() }));

    for backend in &mut list {
        for s in requests.iter().filter(|s| s.label("backend") == backend.name) {
            backend.requests += count(s.value);
            if s.label("status").parse::<u16>().is_ok_and(|status| status >= 400) {
                backend.errors += count(s.value);
            }
        }
        backend.spend_usd = spend.get(&backend.name).copied().unwrap_or(0.0);
        backend.idle_cost_usd = idle.get(&backend.name).copied().unwrap_or(0.0);
        if backend.pricing == Some("per_hour") {
            let metered = backend.spend_usd + backend.idle_cost_usd;
            backend.utilisation = (metered > 0.0).then(|| backend.spend_usd / metered);
        }
        backend.latency_seconds = latency.remove(&backend.name);
        backend.ttft_seconds = ttft.remove(&backend.name);
        if let Some(sums) = last_24h.get(backend.name.as_str()) {
            #[expect(clippy::cast_precision_loss, reason = "a mean")]
            let mean = (sums.requests > 0).then(|| sums.latency_ms as f64 / sums.requests as f64);
            backend.last_24h = Last24h {
                requests: sums.requests,
                errors: sums.errors,
                spend_usd: sums.spent.as_f64(),
                mean_latency_ms: mean,
            };
        }
    }
    Ok(Json(Backends {
        object: "dashboard.backends",
        generated_at: period::rfc3339(now),
        scope: "since_start_this_replica",
        window: Window { from: period::rfc3339(from), to: period::rfc3339(to) },
        backends: list,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_a_bucket_like_histogram_quantile() {
        // 10 samples: 5 under 0.1 s, 4 more under 0.5 s, 1 under 1 s.
        // As the client library lists them: finite bounds only (`+Inf` is the sample count).
        let buckets = [(0.1, 5), (0.5, 9), (1.0, 10)];
        assert_eq!(quantile(&buckets, 10, 0.5), Some(0.1));
        let p90 = quantile(&buckets, 10, 0.9).unwrap_or_default();
        assert!((p90 - 0.5).abs() < 1e-12, "{p90}");
        let p99 = quantile(&buckets, 10, 0.99).unwrap_or_default();
        assert!((p99 - 0.95).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&buckets, 0, 0.5), None);
        // Everything beyond the last finite bound: that bound.
        assert_eq!(quantile(&[(0.05, 0), (0.1, 0)], 3, 0.5), Some(0.1));
    }
}
