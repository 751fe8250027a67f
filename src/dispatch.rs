//! One request's life after authentication and parsing: rate limits → decide → reserve →
//! send (falling back on failures before the first byte) → meter → `x-tollgate-*` headers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::app::AppState;
use crate::config::{Cascade, User};
use crate::cost::Usd;
use crate::error::ApiError;
use crate::ledger::{self, period};
use crate::metering::{meter_json, Ending, Meter, MeterStart, MeteredBody};
use crate::policy::{self, Candidate, Decision, Reason, Refusal};
use crate::request::{Endpoint, ProxyRequest};
use crate::snapshot::{ModelTarget, Snapshot};
use crate::upstream::health::Admission;
use crate::upstream::{BackendState, Upstream, UpstreamError};

pub const HEADER_BACKEND: &str = "x-tollgate-backend";
pub const HEADER_TIER: &str = "x-tollgate-tier";
pub const HEADER_REASON: &str = "x-tollgate-reason";
pub const HEADER_COST: &str = "x-tollgate-cost-usd";
pub const HEADER_BUDGET_REMAINING: &str = "x-tollgate-budget-remaining-usd";
pub const HEADER_MAX_TOKENS_CLAMPED: &str = "x-tollgate-max-tokens-clamped";

/// A whole non-streamed answer is read before it is forwarded (to meter it exactly and put
/// its cost in a header); beyond this size it is refused as a broken backend answer.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Decisions re-taken when concurrent requests spent the budget between decision and
/// reservation: each round sees less budget, so this ends quickly.
const MAX_DECISION_ROUNDS: usize = 8;

pub use crate::policy::plan::Hints;

/// The request's context as it goes through: who asks, for what.
pub struct RequestContext {
    pub snapshot: Arc<Snapshot>,
    pub user: Arc<User>,
    pub request: ProxyRequest,
    pub hints: Hints,
    /// When the gateway received the request (for durations and deadlines).
    pub started: Instant,
    pub arrived_ms: i64,
    /// `max_tokens` as shortened to what the budget pays (`clamp_max_tokens`).
    pub clamped: Option<u64>,
    /// What earlier calls for this request cost (a cascade's unsure first answer).
    pub prior_cost: Usd,
}

/// The shared plan (see [`policy::plan`]) and the route's cascade when this request can go
/// through it (non-streamed text).
struct Plan<'s> {
    shared: policy::plan::Plan<'s>,
    cascade: Option<Cascade>,
}

impl<'s> std::ops::Deref for Plan<'s> {
    type Target = policy::plan::Plan<'s>;
    fn deref(&self) -> &Self::Target {
        &self.shared
    }
}

fn plan<'s>(snapshot: &'s Snapshot, request: &ProxyRequest) -> Result<Plan<'s>, ApiError> {
    let target = snapshot.resolve(&request.model).ok_or_else(|| ApiError::UnknownModel(request.model.clone()))?;
    let embeddings = request.endpoint == Endpoint::Embeddings;
    let shape = policy::plan::Shape {
        prompt_tokens: request.prompt_tokens_estimate,
        max_tokens: request.max_tokens,
        embeddings,
    };
    let cascade = match target {
        ModelTarget::Route(i) => snapshot.config.routes[i].cascade.filter(|_| !request.stream && !embeddings),
        ModelTarget::Backend(_) => None,
    };
    Ok(Plan { shared: policy::plan::plan(&snapshot.config, target, shape), cascade })
}

pub async fn run(state: &Arc<AppState>, ctx: RequestContext) -> Result<Response, ApiError> {
    let mut unsure_answer = None;
    match decide_and_send(state, ctx, &mut unsure_answer).await {
        // A cascade's escalation that cannot happen (budget spent by the first call, every
        // better backend down, the ledger gone) still leaves a paid-for answer: serve it.
        Err(e) if unsure_answer.is_some() => {
            tracing::info!(error = %e, "cascade escalation not possible; serving the first answer");
            unsure_answer.ok_or(e)
        }
        result => result,
    }
}

async fn decide_and_send(
    state: &Arc<AppState>,
    mut ctx: RequestContext,
    unsure_answer: &mut Option<Response>,
) -> Result<Response, ApiError> {
    let snapshot = Arc::clone(&ctx.snapshot);
    let mut plan = plan(&snapshot, &ctx.request)?;
    let user = &ctx.user;
    let tokens_estimate = plan.prompt_tokens + plan.completion_tokens;
    state.limiter.admit(user, tokens_estimate, Instant::now()).await?;
    let mut tokens_held = TokenHold { state, user, tokens: tokens_estimate, armed: true };

    let queue_deadline = ctx.started + snapshot.config.server.queue_timeout;
    let mut queue_place: Option<QueuePlace<'_>> = None;
    let mut rounds = 0;
    // After an unsure cascade answer: only backends better than the one that gave it.
    let mut escalated_from: Option<f64> = None;
    loop {
        let unix = crate::clock::unix_now();
        let remaining = state.ledger.remaining(user, unix).await?;
        let now = Instant::now();
        let mut candidates = candidates(&snapshot, &plan, now);
        if let Some(quality) = escalated_from {
            candidates.retain(|c| c.quality > quality);
        }
        let facts = policy::plan::facts(user, ctx.hints, &plan, candidates, remaining, unix);
        let refusal = match policy::decide(&facts) {
            Ok(mut decision) => {
                let probe = match (plan.cascade, escalated_from) {
                    (_, Some(_)) => {
                        decision.reason = Reason::EscalatedConfidence;
                        None
                    }
                    // Worth probing only when a better backend is there to escalate to.
                    (Some(cascade), None) => {
                        let first = facts.candidates.iter().find(|c| Some(&c.index) == decision.order.first());
                        let better = first.is_some_and(|f| facts.candidates.iter().any(|c| c.quality > f.quality));
                        better.then_some(Probe {
                            route: plan.route,
                            cascade,
                            quality: first.map_or(0.0, |f| f.quality),
                        })
                    }
                    (None, None) => None,
                };
                match attempt(state, &ctx, &plan, decision, &mut tokens_held, probe.as_ref()).await? {
                    Outcome::Answered(response) => return Ok(response),
                    Outcome::Unsure { quality, cost, answer } => {
                        escalated_from = Some(quality);
                        ctx.prior_cost = ctx.prior_cost.saturating_add(cost);
                        *unsure_answer = Some(answer);
                        continue;
                    }
                    Outcome::NotStarted if rounds < MAX_DECISION_ROUNDS => {
                        rounds += 1;
                        continue;
                    }
                    Outcome::NotStarted => Refusal::AtCapacity,
                }
            }
            Err(refusal) => refusal,
        };
        let clamped = ctx.clamped.is_some();
        if let Some(tokens) = policy::plan::retry_clamped(&snapshot.config, user, &plan, &facts, &refusal, clamped) {
            ctx.request.set_max_tokens(tokens);
            ctx.clamped = Some(tokens);
            plan = self::plan(&snapshot, &ctx.request)?;
            continue;
        }
        match refusal {
            Refusal::AtCapacity => {
                if queue_place.is_none() {
                    queue_place = Some(QueuePlace::take(state, snapshot.config.server.max_queue)?);
                }
                let notified = state.freed.notified();
                // The notification can race with the decision above; a short cap on the wait
                // makes a missed wake-up cost milliseconds, not the whole queue timeout.
                let wait_until = queue_deadline.min(Instant::now() + std::time::Duration::from_millis(50));
                if Instant::now() >= queue_deadline {
                    return Err(Refusal::AtCapacity.into());
                }
                let _ = tokio::time::timeout_at(wait_until, notified).await;
            }
            Refusal::BudgetExceeded { .. } => return Err(refused(user, refusal, unix)),
            Refusal::ContextTooLong { .. } => {
                let largest = policy::plan::largest_context(&snapshot.config, &plan);
                return Err(Refusal::ContextTooLong { needed: tokens_estimate, largest }.into());
            }
            other => return Err(other.into()),
        }
    }
}

/// A budget refusal, with `Retry-After` until the period resets.
fn refused(user: &User, refusal: Refusal, now: i64) -> ApiError {
    let remaining = match &refusal {
        Refusal::BudgetExceeded { remaining, .. } => Some(*remaining),
        _ => None,
    };
    let retry_after = match refusal {
        Refusal::BudgetExceeded { .. } => {
            period::end(user.budget_period, now).map(|end| u64::try_from(end - now).unwrap_or(0))
        }
        _ => None,
    };
    ApiError::Refused { refusal, retry_after, remaining }
}

/// The candidates as the backends' live state (circuit, in-flight count) has them now.
fn candidates<'s>(snapshot: &'s Snapshot, plan: &Plan<'_>, now: Instant) -> Vec<Candidate<'s>> {
    policy::plan::candidates(&snapshot.config, plan, |index| {
        let upstream = &snapshot.upstreams[index];
        (upstream.state.is_available(now), upstream.state.in_flight() < upstream.backend.max_concurrency)
    })
}

/// The tokens a request took from its user's tpm allowance at admission: given back if it is
/// refused or fails before a backend answers; once metered, the meter corrects them instead.
struct TokenHold<'a> {
    state: &'a AppState,
    user: &'a User,
    tokens: u64,
    armed: bool,
}

impl Drop for TokenHold<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.limiter.settle_tokens(self.user, self.tokens, 0);
        }
    }
}

/// A place in the bounded wait queue, given back when dropped.
struct QueuePlace<'a> {
    state: &'a AppState,
}

impl<'a> QueuePlace<'a> {
    fn take(state: &'a AppState, max_queue: u32) -> Result<Self, ApiError> {
        state
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_queue).then_some(n + 1))
            .map_err(|_| ApiError::from(Refusal::AtCapacity))?;
        state.metrics.queued.inc();
        Ok(Self { state })
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.state.queued.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.queued.dec();
    }
}

/// A half-open circuit's probe: if the request is dropped before a verdict, the next request
/// may probe instead.
struct ProbeGuard<'a> {
    state: &'a BackendState,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.probe_abandoned();
        }
    }
}

/// A cascade's first call: judge the answer's confidence before returning it.
struct Probe<'s> {
    route: &'s str,
    cascade: Cascade,
    /// Quality of the backend probed (escalation goes above it).
    quality: f64,
}

/// How an attempt over the decided backends ended.
enum Outcome {
    Answered(Response),
    /// The probed backend's answer was unsure (metered and charged `cost`): escalate, and
    /// serve `answer` if escalating fails.
    Unsure {
        quality: f64,
        cost: Usd,
        answer: Response,
    },
    /// None could be started (slots or budget taken by concurrent requests since the
    /// decision): decide again.
    NotStarted,
}

/// Tries the decided backends in order, falling back on failures before the first byte.
async fn attempt(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    plan: &Plan<'_>,
    decision: Decision,
    tokens_held: &mut TokenHold<'_>,
    probe: Option<&Probe<'_>>,
) -> Result<Outcome, ApiError> {
    let snapshot = &ctx.snapshot;
    let mut reason = decision.reason;
    let mut last_error = None;
    let mut before_send = None;
    for (position, &index) in decision.order.iter().enumerate() {
        let upstream = &snapshot.upstreams[index];
        let backend = &upstream.backend;
        let Some(slot) = upstream.state.try_slot(backend.max_concurrency) else { continue };
        let admission = upstream.state.admit(Instant::now());
        if admission == Admission::Refused {
            continue;
        }
        let mut breaker_probe = ProbeGuard { state: &upstream.state, armed: admission == Admission::Probe };
        let estimate = plan.candidates.iter().position(|&c| c == index).map_or(Usd::ZERO, |i| plan.estimates[i]);
        let unix = crate::clock::unix_now();
        let Ok((reservation, remaining)) = ledger::reserve(&state.ledger, &ctx.user, estimate, unix).await? else {
            continue;
        };
        let ticket = upstream.state.occupancy.enter(Instant::now());
        // The gateway's time before the first backend call; the time spent on its answer is
        // added in `respond`, and the sum observed as `tollgate_overhead_seconds`.
        let gateway_before = *before_send.get_or_insert_with(|| ctx.started.elapsed());
        let is_last = position + 1 == decision.order.len();
        let probe = probe.filter(|_| position == 0);
        let sent = match upstream.send(&ctx.request, probe.is_some()).await {
            // The estimate (characters / 4) can be far off for code or hex: when the backend
            // itself says the prompt does not fit and a later candidate may, escalate.
            Ok(answer) if answer.status() == StatusCode::BAD_REQUEST && !is_last => {
                context_overflow(answer, ctx.started + backend.timeout, &backend.name).await
            }
            other => other,
        };
        let failure = match sent {
            Err(UpstreamError::ContextOverflow { backend: name }) => {
                upstream.state.succeeded();
                UpstreamError::ContextOverflow { backend: name }
            }
            Ok(answer) if answer.status() == StatusCode::TOO_MANY_REQUESTS && !is_last => {
                // Overloaded, not broken: try elsewhere without counting against its health.
                UpstreamError::Status { backend: backend.name.clone(), status: 429 }
            }
            // 501: the backend does not offer this endpoint; that is an answer, not a fault.
            Ok(answer) if answer.status().is_server_error() && answer.status() != StatusCode::NOT_IMPLEMENTED => {
                upstream.state.failed(Instant::now());
                UpstreamError::Status { backend: backend.name.clone(), status: answer.status().as_u16() }
            }
            Ok(answer) => {
                upstream.state.succeeded();
                breaker_probe.armed = false;
                // The tpm allowance was taken once at admission; a second (cascade) call
                // charges its own tokens on top.
                let tokens_estimate = if tokens_held.armed { tokens_held.tokens } else { 0 };
                tokens_held.armed = false;
                let meter = Meter::new(
                    MeterStart {
                        state: Arc::clone(state),
                        user: Arc::clone(&ctx.user),
                        backend: Arc::clone(backend),
                        backend_state: Arc::clone(&upstream.state),
                        route: plan.route.to_owned(),
                        reason: reason.label().into_owned(),
                        started: ctx.started,
                        arrived_ms: ctx.arrived_ms,
                        prompt_estimate: plan.prompt_tokens,
                        tokens_estimate,
                        baseline: plan.baseline,
                        premium: plan.premium == Some(index),
                        slot,
                        reservation,
                        ticket,
                    },
                    answer.status().as_u16(),
                );
                let answered = Answered {
                    upstream,
                    reason: &reason,
                    estimate,
                    remaining_after_reserve: remaining,
                    before_send: gateway_before,
                };
                return respond(state, ctx, answered, answer, meter, probe).await;
            }
            Err(e) => {
                upstream.state.failed(Instant::now());
                e
            }
        };
        breaker_probe.armed = false;
        // Nothing reached the client: free everything and charge nothing for this attempt.
        upstream.state.occupancy.leave(ticket, Instant::now());
        drop((reservation, slot));
        state.metrics.upstream_failures.with_label_values(&[&backend.name, failure.kind()]).inc();
        tracing::warn!(backend = %backend.name, error = %failure, "backend attempt failed");
        reason = match failure {
            UpstreamError::ContextOverflow { .. } => Reason::EscalatedContext,
            _ => Reason::Fallback(backend.name.clone()),
        };
        last_error = Some(failure);
    }
    match last_error {
        Some(e) => Err(e.into()),
        None => Ok(Outcome::NotStarted),
    }
}

/// Reads a 400 answer: a context-window overflow becomes `ContextOverflow` (try a larger
/// backend); any other 400 is handed back whole, to be passed through.
async fn context_overflow(
    answer: http::Response<crate::upstream::UpstreamBody>,
    deadline: Instant,
    backend: &str,
) -> Result<http::Response<crate::upstream::UpstreamBody>, UpstreamError> {
    let (head, body) = answer.into_parts();
    let bytes = match read_whole(body, deadline, backend).await {
        Ok(bytes) => bytes,
        Err(_) => return Err(UpstreamError::Broken { backend: backend.to_owned() }),
    };
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    if text.contains("context") && ["length", "size", "window", "too long"].iter().any(|w| text.contains(w)) {
        return Err(UpstreamError::ContextOverflow { backend: backend.to_owned() });
    }
    let body = http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync();
    Ok(http::Response::from_parts(head, body))
}

/// Where an answer came from and what the headers say of it.
struct Answered<'a> {
    upstream: &'a Upstream,
    reason: &'a Reason,
    estimate: Usd,
    remaining_after_reserve: Option<Usd>,
    /// The gateway's time before the backend was called.
    before_send: std::time::Duration,
}

fn endpoint_label(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat_completions",
        Endpoint::Completions => "completions",
        Endpoint::Embeddings => "embeddings",
    }
}

async fn respond(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    answered: Answered<'_>,
    answer: http::Response<crate::upstream::UpstreamBody>,
    mut meter: Meter,
    probe: Option<&Probe<'_>>,
) -> Result<Outcome, ApiError> {
    let Answered { upstream, reason, estimate, remaining_after_reserve, before_send } = answered;
    let backend = &upstream.backend;
    // The gateway's own time after the backend answered: from here (the head; for a
    // non-streamed answer, from its last byte) until the response is handed to the server.
    let mut answered_at = Instant::now();
    let (head, body) = answer.into_parts();
    let deadline = ctx.started + backend.timeout;
    let mut headers = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(value) = head.headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    put(&mut headers, HEADER_BACKEND, &backend.name);
    put(&mut headers, HEADER_TIER, &backend.tier);
    put(&mut headers, HEADER_REASON, &reason.label());
    if let Some(clamped) = ctx.clamped {
        put(&mut headers, HEADER_MAX_TOKENS_CLAMPED, &clamped.to_string());
    }

    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut unsure = None;
    let body = if ctx.request.stream && head.status.is_success() && is_sse {
        // Streamed: the cost is known only at the end; the headers carry the estimate.
        put(&mut headers, HEADER_COST, &estimate.to_string());
        if let Some(remaining) = remaining_after_reserve {
            put(&mut headers, HEADER_BUDGET_REMAINING, &remaining.to_string());
        }
        Body::new(MeteredBody::new(body, meter, !ctx.request.client_wants_usage, backend.timeout))
    } else {
        let bytes = match read_whole(body, deadline, backend.name.as_str()).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let timed_out = matches!(&e, ApiError::Upstream(u) if u.is_timeout());
                meter.end(if timed_out { Ending::Deadline } else { Ending::BackendBroke });
                meter.settle();
                return Err(e);
            }
        };
        answered_at = Instant::now();
        if head.status.is_success() && !meter_json(&bytes, &mut meter) {
            meter.end(Ending::BackendBroke);
            meter.settle();
            return Err(ApiError::UpstreamGarbage);
        }
        meter.end(Ending::Complete);
        let cost = meter.settle();
        let bytes = match probe.filter(|_| head.status.is_success()) {
            Some(probe) => {
                let (is_unsure, bytes) = judge(state, ctx, probe, bytes);
                unsure = is_unsure.then_some((probe.quality, cost));
                bytes
            }
            None => bytes,
        };
        put(&mut headers, HEADER_COST, &ctx.prior_cost.saturating_add(cost).to_string());
        // The answer is served and charged by now: a ledger that cannot be read any more must
        // not turn it into an error (the client would be charged for a 503). The header then
        // says what was left at the reservation, corrected by the actual cost.
        let remaining = match state.ledger.remaining(&ctx.user, crate::clock::unix_now()).await {
            Ok(remaining) => remaining,
            Err(_) => remaining_after_reserve.map(|r| r.saturating_add(estimate).saturating_sub(cost).max(Usd::ZERO)),
        };
        if let Some(remaining) = remaining {
            put(&mut headers, HEADER_BUDGET_REMAINING, &remaining.to_string());
        }
        Body::from(bytes)
    };
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    Ok(match unsure {
        Some((quality, cost)) => Outcome::Unsure { quality, cost, answer: response },
        None => {
            let overhead = before_send + answered_at.elapsed();
            let endpoint = endpoint_label(ctx.request.endpoint);
            state.metrics.overhead.with_label_values(&[endpoint]).observe(overhead.as_secs_f64());
            Outcome::Answered(response)
        }
    })
}

/// The cascade's verdict on a probed answer (already metered): whether it is unsure, and the
/// answer as a client should see it (without the log-probabilities it did not ask for).
fn judge(state: &AppState, ctx: &RequestContext, probe: &Probe<'_>, bytes: Bytes) -> (bool, Bytes) {
    let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return (false, bytes) };
    let Some(confidence) = crate::cascade::confidence(&answer) else {
        tracing::debug!(route = probe.route, "cascade: the backend sent no log-probabilities; answer kept");
        return (false, bytes);
    };
    let calibrator = state.calibrators.entry(probe.route.to_owned()).or_default();
    let (unsure, threshold) =
        calibrator.observe(confidence, probe.cascade.threshold, probe.cascade.target_premium_share);
    state.metrics.cascade_threshold.with_label_values(&[probe.route]).set(threshold);
    if ctx.request.body.get("logprobs").is_none_or(|v| v.as_bool() == Some(false)) {
        crate::cascade::strip_logprobs(&mut answer);
        return (unsure, Bytes::from(answer.to_string()));
    }
    (unsure, bytes)
}

/// The whole answer body, within the deadline and the size bound.
async fn read_whole(body: crate::upstream::UpstreamBody, deadline: Instant, backend: &str) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::UpstreamGarbage),
        Ok(Err(_)) => Err(UpstreamError::Broken { backend: backend.to_owned() }.into()),
        Err(_) => Err(UpstreamError::Timeout { backend: backend.to_owned(), after: deadline.elapsed() }.into()),
    }
}

fn put(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}
