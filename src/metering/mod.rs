//! Metering: what one request used and cost, settled in the ledger exactly once, whether the
//! body ends, fails or the client hangs up.

mod body;
pub mod meters;
pub mod occupancy;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use body::{meter_json, MeteredBody};

use crate::app::AppState;
use crate::config::Backend;
pub use crate::cost::Baseline;
use crate::cost::{Pricing, Usd};
use crate::ledger::{RequestRecord, Reservation};
use crate::openai::Usage;
use crate::telemetry::{ClientSpan, Entry, RequestId, Trail};
use crate::tenancy::Principal;
use crate::upstream::{BackendState, Slot};
use meters::PairMeters;
use occupancy::Ticket;

/// How a metered request ended, as the `status` label of `tollgate_requests_total` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The body reached its end.
    Complete,
    /// The client hung up before the end (nginx's 499).
    ClientGone,
    /// The backend broke the body mid-way.
    BackendBroke,
    /// The backend's whole-request timeout passed mid-body.
    Deadline,
}

impl Ending {
    /// The HTTP status the client effectively got, given the status the head carried.
    fn status(self, head_status: u16) -> u16 {
        match self {
            Self::Complete => head_status,
            Self::ClientGone => 499,
            Self::BackendBroke => 502,
            Self::Deadline => 504,
        }
    }

    /// The error code a client saw (in-band, for a stream) when the answer did not complete.
    fn error_code(self) -> Option<&'static str> {
        match self {
            Self::Complete => None,
            Self::ClientGone => Some("client_closed_request"),
            Self::BackendBroke => Some("upstream_error"),
            Self::Deadline => Some("upstream_timeout"),
        }
    }
}

/// What a settled answer used and cost: what the access log says of it.
#[derive(Debug, Clone)]
pub struct Settled {
    pub user: Arc<str>,
    /// The route's alias, or the pinned backend's name.
    pub route: Arc<str>,
    pub backend: Arc<Backend>,
    pub reason: Cow<'static, str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// This answer's cost plus what earlier calls for the same request cost (a cascade's).
    pub cost: Usd,
    pub status: u16,
    pub error: Option<&'static str>,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// The smallest budget left after it, as far as the reservation tells.
    pub remaining: Option<Usd>,
    /// The response cache's verdict (`None`: no cache).
    pub cache: Option<&'static str>,
}

impl Settled {
    /// The access log's entry for request `id`, which arrived at `at_ms`.
    pub fn entry(&self, at_ms: i64, id: &RequestId) -> Entry {
        Entry {
            user: Some(Arc::clone(&self.user)),
            route: Some(Arc::clone(&self.route)),
            backend: Some(Arc::clone(&self.backend)),
            reason: Some(self.reason.clone()),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost: self.cost,
            budget_remaining: self.remaining,
            latency: self.latency,
            ttft: self.ttft,
            error: self.error,
            cache: self.cache,
            ..Entry::new(at_ms, id.clone())
        }
    }
}

/// Everything one dispatched request holds until it is settled.
pub struct MeterStart {
    pub state: Arc<AppState>,
    pub principal: Arc<Principal>,
    pub backend: Arc<Backend>,
    pub backend_state: Arc<BackendState>,
    /// The metric series this user and backend settle into.
    pub meters: Arc<PairMeters>,
    /// The route alias, or the pinned backend's name.
    pub route: Arc<str>,
    pub reason: Cow<'static, str>,
    /// When the gateway received the request.
    pub started: Instant,
    /// Unix milliseconds of the same moment, for the record.
    pub arrived_ms: i64,
    pub request_id: RequestId,
    /// The smallest budget left once the estimate was reserved.
    pub left_after_reserve: Option<Usd>,
    /// The estimate reserved.
    pub estimate: Usd,
    /// What earlier calls for this request cost (a cascade's first answer).
    pub prior_cost: Usd,
    /// This attempt's span (traces on), ended with the answer.
    pub client_span: Option<ClientSpan>,
    /// The response cache's verdict on the request (`None`: no cache).
    pub cache: Option<&'static str>,
    pub prompt_estimate: u64,
    /// Tokens taken from the user's tpm allowance at admission.
    pub tokens_estimate: u64,
    pub baseline: Option<Baseline>,
    /// Served by the route's highest-quality backend: its tokens count as premium tokens.
    pub premium: bool,
    pub slot: Slot,
    pub reservation: Reservation,
    pub ticket: Ticket,
}

/// One request's metering, from the backend's answer to its settlement. Settles when dropped:
/// a client that disconnects mid-stream drops the body, and with it this, so what it used is
/// still charged.
pub struct Meter {
    start: Option<MeterStart>,
    /// The status of the answer's head.
    status: u16,
    reported: Option<Usage>,
    counted_completion: u64,
    ending: Ending,
    cost: Option<Usd>,
    ttft: Option<Duration>,
    /// Set for an answer that settles after the request's handler returned (a stream): the
    /// meter then finishes the request's trail (log line, server span) itself.
    trail: Option<Trail>,
    /// Kept when asked for ([`Meter::keep_summary`]).
    summary: Option<Box<Settled>>,
    keep_summary: bool,
}

impl Meter {
    pub fn new(start: MeterStart, status: u16) -> Self {
        Self {
            start: Some(start),
            status,
            reported: None,
            counted_completion: 0,
            ending: Ending::ClientGone,
            cost: None,
            ttft: None,
            trail: None,
            summary: None,
            keep_summary: false,
        }
    }

    /// Keeps what the settlement used and cost, for [`Meter::summary`].
    pub fn keep_summary(&mut self) {
        self.keep_summary = true;
    }

    /// Finishes the request's trail when this settles (a streamed answer's).
    pub fn finish_when_settled(&mut self, trail: Trail) {
        self.keep_summary = true;
        self.trail = Some(trail);
    }

    /// The usage the backend reported, if it did.
    pub fn reported_usage(&self) -> Option<Usage> {
        self.reported
    }

    /// What the settlement used and cost, if kept.
    pub fn summary(&self) -> Option<&Settled> {
        self.summary.as_deref()
    }

    pub fn first_byte(&mut self) {
        if let Some(s) = &self.start {
            let elapsed = s.started.elapsed();
            self.ttft = Some(elapsed);
            s.state.metrics.time_to_first_token.with_label_values(&[&s.backend.name]).observe(elapsed.as_secs_f64());
        }
    }

    /// The backend's usage, once seen.
    pub fn reported(&mut self, usage: Usage) {
        self.reported = Some(usage);
    }

    /// The local completion count so far, used when no usage is reported.
    pub fn counted(&mut self, completion_tokens: u64) {
        self.counted_completion = completion_tokens;
    }

    pub fn end(&mut self, ending: Ending) {
        self.ending = ending;
    }

    fn billable(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Settles now (idempotent) and returns the cost charged.
    pub fn settle(&mut self) -> Usd {
        if let Some(cost) = self.cost {
            return cost;
        }
        let Some(mut s) = self.start.take() else { return Usd::ZERO };
        let (usage, estimated) = match self.reported {
            Some(usage) => (usage, false),
            None if self.billable() => (Usage::new(s.prompt_estimate, self.counted_completion), true),
            None => (Usage::default(), false),
        };
        let now = Instant::now();
        let occupied = s.backend_state.occupancy.leave(s.ticket, now);
        let cost = match s.backend.pricing {
            Pricing::PerToken { .. } => s.backend.pricing.price_tokens(&usage),
            Pricing::PerHour { .. } => occupied,
        };
        self.cost = Some(cost);
        let status = self.ending.status(self.status);
        if matches!(self.ending, Ending::BackendBroke | Ending::Deadline) {
            s.backend_state.failed(now);
        }
        let latency = now.saturating_duration_since(s.started);
        let total_tokens = usage.prompt_tokens + usage.completion_tokens;
        s.state.limiter.settle_tokens(
            &s.principal.allowances,
            s.principal.budgets.root(),
            s.tokens_estimate,
            total_tokens,
        );

        let (m, pair, user, backend) =
            (&s.state.metrics, &s.meters, s.principal.user.name.as_str(), s.backend.name.as_str());
        pair.add(usage.prompt_tokens, usage.completion_tokens, cost.as_f64());
        if let Some(baseline) = s.baseline {
            pair.add_savings(m, baseline.savings(&usage, cost).as_f64());
        }
        if s.premium {
            pair.add_premium_tokens(m, usage.prompt_tokens + usage.completion_tokens);
        }
        if estimated {
            pair.usage_estimated(m).inc();
        }
        pair.count_request(m, &s.backend.tier, &s.reason, &status_label(status));
        pair.request_duration.observe(latency.as_secs_f64());
        tracing::debug!(
            user, backend, reason = %s.reason, status, prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens, cost_usd = %cost, estimated, "request settled"
        );
        let record = RequestRecord {
            at_ms: s.arrived_ms,
            user: Arc::clone(s.principal.name()),
            route: s.route,
            backend: Arc::clone(pair.backend()),
            reason: s.reason,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost,
            status,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            request_id: Some(s.request_id.clone()),
        };
        if self.keep_summary {
            let summary = Settled {
                user: Arc::clone(&record.user),
                route: Arc::clone(&record.route),
                backend: Arc::clone(&s.backend),
                reason: record.reason.clone(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cost: s.prior_cost.saturating_add(cost),
                status,
                error: self.ending.error_code(),
                latency,
                ttft: self.ttft,
                remaining: s.left_after_reserve.map(|left| crate::ledger::left_after(left, s.estimate, cost)),
                cache: s.cache,
            };
            if let Some(span) = s.client_span.take() {
                span.finish(&summary, cost);
            }
            if let Some(trail) = self.trail.take() {
                trail.finish(summary.entry(s.arrived_ms, &s.request_id));
            }
            self.summary = Some(Box::new(summary));
        }
        s.reservation.settle(record, crate::clock::unix_at(s.arrived_ms, s.started, now));
        drop(s.slot);
        cost
    }
}

/// The `status` label: the common ones without formatting a string per request.
fn status_label(status: u16) -> Cow<'static, str> {
    match status {
        200 => "200".into(),
        400 => "400".into(),
        429 => "429".into(),
        499 => "499".into(),
        500 => "500".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.settle();
    }
}
