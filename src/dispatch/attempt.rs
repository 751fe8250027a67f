//! One decision carried out: the decided backends tried in order, falling back on failures
//! before the first byte; a cascade's probe call is marked for judging.

use std::sync::Arc;

use http::StatusCode;
use tokio::time::Instant;

use super::guards::{ProbeGuard, TokenHold};
use super::respond::{read_whole, respond};
use super::{Plan, RequestContext};
use crate::app::AppState;
use crate::body::Response;
use crate::config::Cascade;
use crate::cost::Usd;
use crate::error::ApiError;
use crate::ledger;
use crate::metering::{Meter, MeterStart};
use crate::policy::{Decision, Reason};
use crate::telemetry::Propagation;
use crate::upstream::health::Admission;
use crate::upstream::{Upstream, UpstreamError};

/// A cascade's first call: judge the answer's confidence before returning it.
pub(super) struct Probe<'s> {
    pub(super) route: &'s str,
    pub(super) cascade: Cascade,
    /// Quality of the backend probed (escalation goes above it).
    pub(super) quality: f64,
}

/// A decision and the clock reading it was taken with, which serves the first attempt.
pub(super) struct Decided {
    pub(super) decision: Decision,
    pub(super) at: Instant,
}

/// How an attempt over the decided backends ended.
pub(super) enum Outcome {
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
pub(super) async fn attempt(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    plan: &Plan<'_>,
    Decided { decision, at: decided_at }: Decided,
    spare_headers: &mut Option<http::HeaderMap>,
    tokens_held: &mut TokenHold<'_>,
    probe: Option<&Probe<'_>>,
) -> Result<Outcome, ApiError> {
    let snapshot = &ctx.snapshot;
    let mut reason = decision.reason;
    let mut last_error = None;
    let mut before_send = None;
    // The decision's clock reading serves until a backend has been waited on.
    let mut fresh = Some(decided_at);
    for (position, &index) in decision.order.iter().enumerate() {
        let upstream = &snapshot.upstreams[index];
        let backend = &upstream.backend;
        let Some(slot) = upstream.state.try_slot(backend.max_concurrency) else { continue };
        // One clock reading for the admission, the occupancy and the gateway's time so far.
        let now = fresh.take().unwrap_or_else(Instant::now);
        let admission = upstream.state.admit(now);
        if admission == Admission::Refused {
            continue;
        }
        let mut breaker_probe = ProbeGuard { state: &upstream.state, armed: admission == Admission::Probe };
        let estimate = plan.candidates.iter().position(|&c| c == index).map_or(Usd::ZERO, |i| plan.estimates[i]);
        let unix = ctx.unix_at(now);
        let Ok((reservation, remaining)) = ledger::reserve(&state.ledger, &ctx.principal, estimate, unix).await? else {
            continue;
        };
        let ticket = upstream.state.occupancy.enter(now);
        // The gateway's time before the first backend call; the time spent on its answer is
        // added in `respond`, and the sum observed as `tollgate_overhead_seconds`.
        let gateway_before = *before_send.get_or_insert_with(|| now.saturating_duration_since(ctx.started));
        let is_last = position + 1 == decision.order.len();
        let probe = probe.filter(|_| position == 0);
        let client_span = match (&state.tracing, &ctx.trace) {
            (Some(tracing), Some(trace)) => {
                let attempt = u32::try_from(position + 1).unwrap_or(u32::MAX);
                Some(tracing.client_span(trace, backend, ctx.request.endpoint, attempt))
            }
            _ => None,
        };
        let propagation = Propagation { request_id: &ctx.request_id, span: client_span.as_ref() };
        let sent = match upstream.send(&ctx.request, probe.is_some(), now, spare_headers.take(), propagation).await {
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
                // The principal's accounts went cold while the backend worked: their loads
                // start now, together, and are in by the time the answer is settled.
                ctx.principal.warm();
                upstream.state.succeeded();
                breaker_probe.armed = false;
                // The tpm allowance was taken once at admission; a second (cascade) call
                // charges its own tokens on top.
                let tokens_estimate = if tokens_held.armed { tokens_held.tokens } else { 0 };
                tokens_held.armed = false;
                let meters = ctx.principal.pair(&state.metrics, (index, &backend.name), snapshot.upstreams.len());
                let meter = Meter::new(
                    MeterStart {
                        state: Arc::clone(state),
                        principal: Arc::clone(&ctx.principal),
                        backend: Arc::clone(backend),
                        backend_state: Arc::clone(&upstream.state),
                        route: snapshot.record_route(plan.route_index, meters.backend()),
                        meters,
                        reason: reason.label(),
                        started: ctx.started,
                        arrived_ms: ctx.arrived_ms,
                        request_id: ctx.request_id.clone(),
                        left_after_reserve: remaining.map(|l| l.usd),
                        estimate,
                        prior_cost: ctx.prior_cost,
                        client_span,
                        cache: ctx.cache_verdict.map(crate::cache::Verdict::label),
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
                    remaining_after_reserve: remaining.map(|l| l.usd),
                    before_send: gateway_before,
                };
                return respond(state, ctx, answered, answer, meter, probe).await;
            }
            // The request cannot be put in this backend's API: the next candidate may take it.
            Err(e @ UpstreamError::Untranslatable { .. }) => e,
            Err(e) => {
                upstream.state.failed(Instant::now());
                e
            }
        };
        breaker_probe.armed = false;
        if let Some(span) = client_span {
            span.failed(failure.kind(), failure.to_string());
        }
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
pub(super) async fn context_overflow(
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
    Ok(http::Response::from_parts(head, crate::upstream::UpstreamBody::whole(bytes)))
}

/// Where an answer came from and what the headers say of it.
pub(super) struct Answered<'a> {
    pub(super) upstream: &'a Upstream,
    pub(super) reason: &'a Reason,
    pub(super) estimate: Usd,
    pub(super) remaining_after_reserve: Option<Usd>,
    /// The gateway's time before the backend was called.
    pub(super) before_send: std::time::Duration,
}
