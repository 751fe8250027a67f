//! Every metric family, declared once on a private registry with the `tollgate_` prefix.

use crate::request::Endpoint;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for whole LLM requests: from a cached embedding (ms) to a long generation (minutes).
const REQUEST_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Buckets for the gateway's own added latency: a few microseconds (its usual figure on an idle
/// core: see docs/PERFORMANCE.md) to the tens of milliseconds of an overloaded host.
const OVERHEAD_BUCKETS: &[f64] =
    &[0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1];
/// Buckets for one ledger operation: a Redis round trip on a LAN (~100 µs) to a timeout.
const LEDGER_BUCKETS: &[f64] = &[0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0];
/// Buckets for the time to first token: what a streaming user waits before text appears.
const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The gateway's metrics. Label values come from config names and closed enums only.
pub struct Metrics {
    registry: Registry,
    /// `tollgate_requests_total{backend,tier,reason,status}`: answered requests that reached a backend.
    pub requests: IntCounterVec,
    /// `tollgate_tokens_total{user,backend,kind}`: kind is `prompt` or `completion`.
    pub tokens: IntCounterVec,
    /// `tollgate_premium_tokens_total{user}`: tokens served by the route's highest-quality
    /// backend; divided by `tollgate_tokens_total` it is the user's premium token share.
    pub premium_tokens: IntCounterVec,
    /// `tollgate_rejected_requests_total{code}`: refused before any backend (bad key, bad body...).
    pub rejected: IntCounterVec,
    /// Its series for [`ApiError::REFUSAL_CODES`](crate::error::ApiError::REFUSAL_CODES), found
    /// once: a refusal (a flood of bad keys) then hashes no label.
    rejected_by_code: Box<[(&'static str, IntCounter)]>,
    /// `tollgate_usage_estimated_total{backend}`: requests whose usage was counted locally
    /// because the backend reported none (a client hung up mid-stream, or no usage field).
    pub usage_estimated: IntCounterVec,
    /// `tollgate_request_duration_seconds{backend}`
    pub request_duration: HistogramVec,
    /// `tollgate_time_to_first_token_seconds{backend}`: first body byte from the backend.
    pub time_to_first_token: HistogramVec,
    /// `tollgate_backend_in_flight{backend}`: set from the backends' state at each scrape.
    pub in_flight: IntGaugeVec,
    /// `tollgate_backend_up{backend}`: 0 while its circuit is open.
    pub backend_up: IntGaugeVec,
    /// `tollgate_cost_usd_total{user,backend}`: marginal cost charged.
    pub cost: CounterVec,
    /// `tollgate_savings_usd_total{user}`: the route's most expensive candidate's price for the
    /// same usage, minus what was charged.
    pub savings: CounterVec,
    /// `tollgate_plan_cost_usd_total{plan,backend}`: everyone's cost, by plan (`none` for a
    /// config user on no plan): bounded by the plans, not the users.
    pub plan_cost: CounterVec,
    /// `tollgate_team_cost_usd_total{team,backend}`: the cost of teams' members.
    pub team_cost: CounterVec,
    /// `tollgate_plan_savings_usd_total{plan}`: savings (as `savings_usd_total`) by plan.
    pub plan_savings: CounterVec,
    /// `tollgate_principal_cache_total{result}`: client keys found in the in-memory cache
    /// (`hit`), looked up in the store (`miss`), or refused from the cache of unknown keys
    /// (`negative`).
    pub principal_cache: IntCounterVec,
    /// `tollgate_idle_cost_usd_total{backend}`: hourly backends' cost with nothing in flight.
    pub idle_cost: CounterVec,
    /// `tollgate_budget_remaining_usd{user}`: set at each scrape for users with a budget.
    pub budget_remaining: GaugeVec,
    /// `tollgate_overhead_seconds{endpoint}`: the gateway's own time in a request answered
    /// through a backend: before the backend is called (auth, body, parsing, decision,
    /// reservation) plus after it answered (metering a whole answer, headers), without the
    /// time spent waiting on the backend.
    /// One series per endpoint, resolved here once, in [`Endpoint::ALL`]'s order.
    overhead: [Histogram; Endpoint::ALL.len()],
    /// `tollgate_config_reloads_total{result}`: `success` or `failure`.
    pub config_reloads: IntCounterVec,
    /// `tollgate_queued_requests`: requests waiting for a free backend slot.
    pub queued: IntGauge,
    /// `tollgate_cascade_threshold{route}`: the confidence threshold in force (calibrated).
    pub cascade_threshold: GaugeVec,
    /// `tollgate_upstream_failures_total{backend,kind}`: connect, timeout, status.
    pub upstream_failures: IntCounterVec,
    /// `tollgate_ledger_operation_duration_seconds{operation}`: shared-ledger (Redis) calls.
    pub ledger_duration: HistogramVec,
    /// `tollgate_ledger_errors_total{operation}`: shared-ledger calls that failed or timed out.
    pub ledger_errors: IntCounterVec,
    /// `tollgate_ledger_up`: 1 while the shared ledger answers, 0 after a failed call.
    pub ledger_up: IntGauge,
    /// `tollgate_ledger_reconcile_backlog`: settlements and releases waiting for Redis.
    pub ledger_backlog: IntGauge,
    /// `tollgate_ledger_reconciled_total`: writes applied to Redis after it came back.
    pub ledger_reconciled: IntCounter,
    /// `tollgate_ledger_failovers_total`: times another Redis server took over as the
    /// ledger's primary (a sentinel failover, or a restart seen by its new `run_id`).
    pub ledger_failovers: IntCounter,
    /// `tollgate_ledger_replayed_settlements_total`: settlements a new primary lacked (lost
    /// with the old one's unreplicated writes) and got again from this replica.
    pub ledger_replayed: IntCounter,
    /// `tollgate_ledger_fail_open_reservations_total`: reservations granted by this replica's
    /// own accounting because Redis could not be reached (`on_ledger_error = "fail-open"`).
    pub ledger_fail_open: IntCounter,
    /// `tollgate_access_log_dropped_total`: access log lines dropped because standard output
    /// did not keep up (the proxy never waits for its log).
    pub access_log_dropped: IntCounter,
    /// `tollgate_trace_spans_exported_total`: spans the OTLP collector accepted.
    pub trace_spans_exported: IntCounter,
    /// `tollgate_trace_export_failures_total`: span batches the collector did not take
    /// (unreachable, refused, timed out): their spans are lost, no request is.
    pub trace_export_failures: IntCounter,
    /// `tollgate_trace_spans_dropped_total`: spans dropped because the export queue was full
    /// (the collector slower than the traffic); requests never wait for it.
    pub trace_spans_dropped: IntCounter,
    /// `tollgate_cache_requests_total{result}`, `tollgate_cache_saved_usd_total`,
    /// `tollgate_cache_bytes`.
    pub cache: crate::cache::CacheMetrics,
    /// The metered pairs of the users without series of their own.
    pub shared_pairs: crate::metering::meters::SharedPairs,
}

impl Metrics {
    /// Counts a request refused with `code` in `tollgate_rejected_requests_total`.
    pub fn count_rejected(&self, code: &str) {
        match self.rejected_by_code.iter().find(|(known, _)| *known == code) {
            Some((_, counter)) => counter.inc(),
            None => self.rejected.with_label_values(&[code]).inc(),
        }
    }

    /// Observes the gateway's own time in a request to `endpoint`.
    pub fn observe_overhead(&self, endpoint: Endpoint, seconds: f64) {
        self.overhead[endpoint as usize].observe(seconds);
    }

    /// Registers every family; fails only on a programming error (a duplicate name).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("tollgate".into()), None)?;
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let requests = counter(
            "requests_total",
            "Requests answered through a backend, by backend, tier, routing reason and HTTP status.",
            &["backend", "tier", "reason", "status"],
        )?;
        let tokens = counter("tokens_total", "Tokens metered per user and backend.", &["user", "backend", "kind"])?;
        let premium_tokens = counter(
            "premium_tokens_total",
            "Tokens served by the route's highest-quality backend, per user (the premium token share's numerator).",
            &["user"],
        )?;
        let rejected = counter(
            "rejected_requests_total",
            "Requests refused before reaching a backend, by error code.",
            &["code"],
        )?;
        let usage_estimated = counter(
            "usage_estimated_total",
            "Requests whose token usage was counted locally because the backend reported none.",
            &["backend"],
        )?;
        let upstream_failures = counter(
            "upstream_failures_total",
            "Backend attempts that failed before an answer: connect, timeout or status.",
            &["backend", "kind"],
        )?;
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &["backend"])?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let request_duration = histogram(
            "request_duration_seconds",
            "Whole request duration through a backend, until the last byte or a hang-up.",
            REQUEST_BUCKETS,
        )?;
        let time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to the backend's first body byte.",
            TTFT_BUCKETS,
        )?;
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                "overhead_seconds",
                "Gateway's own time per request answered through a backend, without the time waiting on it.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        registry.register(Box::new(overhead.clone()))?;
        let int_gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let in_flight = int_gauge("backend_in_flight", "Requests in flight per backend.", &["backend"])?;
        let backend_up =
            int_gauge("backend_up", "1 when the backend's circuit is closed, 0 while open.", &["backend"])?;
        let usd_counter = |name: &str, help: &str, labels: &[&str]| -> Result<CounterVec, prometheus::Error> {
            let c = CounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let cost = usd_counter("cost_usd_total", "Marginal cost charged, per user and backend.", &["user", "backend"])?;
        let savings = usd_counter(
            "savings_usd_total",
            "What the same requests would have cost on the route's most expensive backend, minus what they cost.",
            &["user"],
        )?;
        let plan_cost = usd_counter(
            "plan_cost_usd_total",
            "Marginal cost charged to every user, per plan (`none`: config users on no plan) and backend.",
            &["plan", "backend"],
        )?;
        let team_cost = usd_counter(
            "team_cost_usd_total",
            "Marginal cost charged to teams' members, per team and backend.",
            &["team", "backend"],
        )?;
        let plan_savings = usd_counter(
            "plan_savings_usd_total",
            "Savings against the route's most expensive backend, per plan.",
            &["plan"],
        )?;
        let principal_cache = counter(
            "principal_cache_total",
            "Client keys resolved from the in-memory cache (hit), the store (miss), or refused as known-unknown (negative).",
            &["result"],
        )?;
        for result in ["hit", "miss", "negative"] {
            principal_cache.with_label_values(&[result]);
        }
        let idle_cost = usd_counter(
            "idle_cost_usd_total",
            "Hourly backends' cost while nothing was in flight: never charged to a user.",
            &["backend"],
        )?;
        let budget_remaining = GaugeVec::new(
            Opts::new("budget_remaining_usd", "Budget left in the current period (budget - spent - reserved)."),
            &["user"],
        )?;
        registry.register(Box::new(budget_remaining.clone()))?;
        let config_reloads = counter("config_reloads_total", "Config reloads by result.", &["result"])?;
        let queued = IntGauge::new("queued_requests", "Requests waiting for a free backend slot.")?;
        registry.register(Box::new(queued.clone()))?;
        let cascade_threshold = GaugeVec::new(
            Opts::new("cascade_threshold", "Mean token log-probability under which a cascade escalates, per route."),
            &["route"],
        )?;
        registry.register(Box::new(cascade_threshold.clone()))?;
        let ledger_duration = HistogramVec::new(
            HistogramOpts::new("ledger_operation_duration_seconds", "Shared ledger (Redis) operations, by operation.")
                .buckets(LEDGER_BUCKETS.to_vec()),
            &["operation"],
        )?;
        registry.register(Box::new(ledger_duration.clone()))?;
        let ledger_errors = counter(
            "ledger_errors_total",
            "Shared ledger (Redis) operations that failed or timed out, by operation.",
            &["operation"],
        )?;
        let int_gauge_one = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let ledger_up =
            int_gauge_one("ledger_up", "1 while the shared ledger (Redis) answers, 0 after a failed call.")?;
        let ledger_backlog = int_gauge_one(
            "ledger_reconcile_backlog",
            "Settlements and releases waiting for the shared ledger (Redis) to come back.",
        )?;
        let int_counter_one = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let ledger_reconciled =
            int_counter_one("ledger_reconciled_total", "Writes applied to the shared ledger after it came back.")?;
        let ledger_failovers = int_counter_one(
            "ledger_failovers_total",
            "Times another Redis server took over as the shared ledger's primary (failover or restart).",
        )?;
        let ledger_replayed = int_counter_one(
            "ledger_replayed_settlements_total",
            "Settlements a new Redis primary had lost and this replica applied again after the failover.",
        )?;
        let ledger_fail_open = int_counter_one(
            "ledger_fail_open_reservations_total",
            "Reservations granted by this replica alone because the shared ledger was unreachable (fail-open).",
        )?;
        let access_log_dropped = int_counter_one(
            "access_log_dropped_total",
            "Access log lines dropped because standard output did not keep up (requests never wait for the log).",
        )?;
        let trace_spans_exported = int_counter_one("trace_spans_exported_total", "Spans the OTLP collector accepted.")?;
        let trace_export_failures = int_counter_one(
            "trace_export_failures_total",
            "Span batches the OTLP collector did not take (unreachable, refused or timed out); requests are unaffected.",
        )?;
        let trace_spans_dropped = int_counter_one(
            "trace_spans_dropped_total",
            "Spans dropped because the OTLP export queue was full; requests never wait for the exporter.",
        )?;
        let cache = crate::cache::CacheMetrics {
            requests: counter(
                "cache_requests_total",
                "Requests looked up in the response cache, by result (hit, miss, bypass: not cacheable or Cache-Control).",
                &["result"],
            )?,
            saved: {
                let c = prometheus::Counter::new(
                    "cache_saved_usd_total",
                    "What the answers served from the cache would have cost from their backends.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            bytes: {
                let g = prometheus::IntGauge::new("cache_bytes", "Bytes the response cache's memory store holds.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            errors: int_counter_one(
                "cache_store_errors_total",
                "Response cache reads that failed (the Redis store away); each was served as a miss.",
            )?,
        };
        // Labelled counters that alerts watch exist at 0 from the start, so that `increase()`
        // and `rate()` see their first event.
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        let rejected_by_code = crate::error::ApiError::REFUSAL_CODES
            .iter()
            .map(|&code| (code, rejected.with_label_values(&[code])))
            .collect();
        Ok(Self {
            registry,
            requests,
            tokens,
            premium_tokens,
            rejected,
            rejected_by_code,
            usage_estimated,
            request_duration,
            time_to_first_token,
            in_flight,
            upstream_failures,
            backend_up,
            cost,
            savings,
            plan_cost,
            team_cost,
            plan_savings,
            principal_cache,
            idle_cost,
            budget_remaining,
            overhead: Endpoint::ALL.map(|e| overhead.with_label_values(&[e.label()])),
            config_reloads,
            queued,
            cascade_threshold,
            ledger_duration,
            ledger_errors,
            ledger_up,
            ledger_backlog,
            ledger_reconciled,
            ledger_failovers,
            ledger_replayed,
            ledger_fail_open,
            access_log_dropped,
            trace_spans_exported,
            trace_export_failures,
            trace_spans_dropped,
            cache,
            shared_pairs: Default::default(),
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
