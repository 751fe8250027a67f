//! Metering: what one request used, recorded exactly once, whether the body ends, fails or the
//! client hangs up.

mod body;

use std::sync::Arc;

use tokio::time::Instant;

pub use body::{BodyKind, MeteredBody};

use crate::config::{Backend, User};
use crate::metrics::Metrics;
use crate::openai::Usage;

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
    fn status_label(self, head_status: u16) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Complete => head_status.to_string().into(),
            Self::ClientGone => "499".into(),
            Self::BackendBroke => "502".into(),
            Self::Deadline => "504".into(),
        }
    }
}

/// One request's metering, started when a backend answered and recorded when dropped. Being a
/// drop guard is the point: a client that disconnects mid-stream drops the body, and with it
/// this, so its tokens are still counted.
pub struct Meter {
    metrics: Arc<Metrics>,
    user: Arc<User>,
    backend: Arc<Backend>,
    reason: String,
    started: Instant,
    prompt_estimate: u64,
    /// The status of the answer's head.
    status: u16,
    /// Whether this answer consumed tokens (a 2xx); refusals carry no usage.
    billable: bool,
    reported: Option<Usage>,
    counted_completion: u64,
    ending: Ending,
}

/// What the dispatcher knows when a backend's answer head arrives.
pub struct MeterStart {
    pub metrics: Arc<Metrics>,
    pub user: Arc<User>,
    pub backend: Arc<Backend>,
    pub reason: String,
    pub started: Instant,
    pub prompt_estimate: u64,
    pub status: u16,
}

impl Meter {
    pub fn new(start: MeterStart) -> Self {
        start.metrics.in_flight.with_label_values(&[&start.backend.name]).inc();
        Self {
            billable: (200..300).contains(&start.status),
            status: start.status,
            ending: Ending::ClientGone,
            reported: None,
            counted_completion: 0,
            metrics: start.metrics,
            user: start.user,
            backend: start.backend,
            reason: start.reason,
            started: start.started,
            prompt_estimate: start.prompt_estimate,
        }
    }

    pub fn first_byte(&self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.metrics.time_to_first_token.with_label_values(&[&self.backend.name]).observe(elapsed);
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

    /// The usage to charge: as reported, or counted locally.
    fn usage(&self) -> (Usage, bool) {
        match self.reported {
            Some(usage) => (usage, false),
            None if self.billable => (Usage::new(self.prompt_estimate, self.counted_completion), true),
            None => (Usage::default(), false),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let backend = self.backend.name.as_str();
        let (usage, estimated) = self.usage();
        let m = &self.metrics;
        m.in_flight.with_label_values(&[backend]).dec();
        m.tokens.with_label_values(&[&self.user.name, backend, "prompt"]).inc_by(usage.prompt_tokens);
        m.tokens.with_label_values(&[&self.user.name, backend, "completion"]).inc_by(usage.completion_tokens);
        if estimated {
            m.usage_estimated.with_label_values(&[backend]).inc();
        }
        let status = self.ending.status_label(self.status);
        m.requests.with_label_values(&[backend, &self.backend.tier, &self.reason, &status]).inc();
        m.request_duration.with_label_values(&[backend]).observe(self.started.elapsed().as_secs_f64());
        tracing::debug!(
            user = %self.user.name, backend, reason = %self.reason, status = %status,
            prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, estimated,
            "request metered"
        );
    }
}
