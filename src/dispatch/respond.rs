//! The answer on its way to the client: streamed through a `MeteredBody`, or read whole,
//! metered, judged (cascade) and sent with its exact cost; `x-tollgate-*` headers either way.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::attempt::{Answered, Outcome, Probe};
use super::{
    RequestContext, HEADER_BACKEND, HEADER_BUDGET_REMAINING, HEADER_CACHE, HEADER_COST, HEADER_MAX_TOKENS_CLAMPED,
    HEADER_REASON, HEADER_TIER, MAX_ANSWER_BYTES,
};
use crate::apis::Dialect;
use crate::app::AppState;
use crate::body::{Response, ResponseBody};
use crate::cost::Usd;
use crate::error::ApiError;
use crate::metering::{meter_json, Ending, Meter, MeteredBody};
use crate::policy::Reason;
use crate::upstream::UpstreamError;

pub(super) async fn respond(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    answered: Answered<'_>,
    answer: http::Response<crate::upstream::UpstreamBody>,
    mut meter: Meter,
    probe: Option<&Probe<'_>>,
) -> Result<Outcome, ApiError> {
    if ctx.summarize {
        meter.keep_summary();
    }
    let Answered { upstream, reason, estimate, remaining_after_reserve, before_send } = answered;
    let backend = &upstream.backend;
    let (head, body) = answer.into_parts();
    let is_sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let streamed = ctx.request.stream && head.status.is_success() && is_sse;
    // A backend serving the client's API itself answered in it: read in that shape, never
    // cached (the cache holds chat answers) nor judged by a cascade.
    let dialect = head.extensions.get::<Dialect>().copied().unwrap_or(Dialect::Chat);
    if dialect != Dialect::Chat {
        // Identical requests waiting for this one to be stored go on their own now.
        drop(ctx.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
    }
    // The gateway's own time after the backend answered: from here (for a non-streamed
    // answer, from its last byte) until the response is handed to the server.
    let mut answered_at = streamed.then(Instant::now);
    let deadline = ctx.started + backend.timeout;
    // Room for what follows and the server's own: growing a header map reallocates it.
    let mut headers = HeaderMap::with_capacity(12);
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(value) = head.headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    put(&mut headers, HEADER_BACKEND, upstream.name_header.clone());
    put(&mut headers, HEADER_TIER, upstream.tier_header.clone());
    put(&mut headers, HEADER_REASON, reason_value(reason));
    if let Some(clamped) = ctx.clamped {
        headers.insert(HEADER_MAX_TOKENS_CLAMPED, HeaderValue::from(clamped));
    }
    if let Some(verdict) = ctx.cache_verdict {
        headers.insert(HEADER_CACHE, HeaderValue::from_static(verdict.label()));
    }

    let mut unsure = None;
    let body = if streamed {
        // Streamed: the cost is known only at the end; the headers carry the estimate.
        put(&mut headers, HEADER_COST, usd_value(estimate));
        if let Some(remaining) = remaining_after_reserve {
            put(&mut headers, HEADER_BUDGET_REMAINING, usd_value(remaining));
        }
        if let Some(trail) = ctx.trail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            meter.finish_when_settled(trail);
        }
        let capture = crate::cache::StreamCapture::new(
            state,
            ctx.cache.filter(|_| dialect == Dialect::Chat),
            ctx.request.endpoint,
            backend,
            ctx.clamped.is_some(),
            ctx.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take(),
        );
        let metered = MeteredBody::new(body, meter, !ctx.request.client_wants_usage, backend.timeout)
            .native(dialect)
            .capture(capture);
        ResponseBody::Metered(Box::new(metered))
    } else {
        let bytes = match read_whole(body, deadline, backend.name.as_str()).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let timed_out = matches!(&e, ApiError::Upstream(u) if u.is_timeout());
                meter.end(if timed_out { Ending::Deadline } else { Ending::BackendBroke });
                meter.settle();
                keep_answered(ctx, &meter, None);
                return Err(e);
            }
        };
        let done = Instant::now();
        answered_at = Some(done);
        if head.status.is_success() && !meter_json(dialect, &bytes, &mut meter) {
            meter.end(Ending::BackendBroke);
            meter.settle();
            keep_answered(ctx, &meter, None);
            return Err(ApiError::UpstreamGarbage);
        }
        meter.end(Ending::Complete);
        let cost = meter.settle();
        let bytes = match probe.filter(|_| head.status.is_success() && dialect == Dialect::Chat) {
            Some(probe) => {
                let (is_unsure, bytes) = judge(state, ctx, probe, bytes);
                unsure = is_unsure.then_some((probe.quality, cost));
                bytes
            }
            None => bytes,
        };
        put(&mut headers, HEADER_COST, usd_value(ctx.prior_cost.saturating_add(cost)));
        let remaining = crate::ledger::remaining_after_answer(
            &state.ledger,
            &ctx.principal.budgets,
            ctx.unix_at(done),
            remaining_after_reserve,
            estimate,
            cost,
        );
        if let Some(remaining) = remaining {
            put(&mut headers, HEADER_BUDGET_REMAINING, usd_value(remaining));
        }
        keep_answered(ctx, &meter, remaining);
        if unsure.is_none() && head.status == http::StatusCode::OK && dialect == Dialect::Chat {
            store(state, ctx, backend, &meter, cost, &bytes);
        }
        ResponseBody::whole(bytes)
    };
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    if dialect != Dialect::Chat {
        response.extensions_mut().insert(dialect);
    }
    Ok(match unsure {
        Some((quality, cost)) => Outcome::Unsure { quality, cost, answer: response },
        None => {
            let overhead = before_send + answered_at.map_or(std::time::Duration::ZERO, |at| at.elapsed());
            state.metrics.observe_overhead(ctx.request.endpoint, overhead.as_secs_f64());
            Outcome::Answered(response)
        }
    })
}

/// Stores a complete answer in the response cache when the request may be, unless budget
/// clamping cut it short (`finish_reason: "length"` under a clamped `max_tokens`: not the
/// answer the request asked for).
fn store(
    state: &AppState,
    ctx: &RequestContext,
    backend: &Arc<crate::config::Backend>,
    meter: &Meter,
    cost: Usd,
    bytes: &Bytes,
) {
    let (Some(cache), Some(lookup)) = (&state.cache, ctx.cache.filter(|l| l.write)) else { return };
    if ctx.clamped.is_some() && crate::cache::cut_by_length(bytes) {
        return;
    }
    let usage = meter.reported_usage().unwrap_or_default();
    cache.put(
        lookup.key,
        crate::cache::Cached {
            endpoint: ctx.request.endpoint,
            // Copied to its own allocation: the answer's bytes may be a view into a larger
            // read buffer, which a stored entry would otherwise keep alive (2.85x the bound's
            // RSS with 2 KiB answers before this).
            body: Bytes::copy_from_slice(bytes),
            backend: Arc::clone(backend),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost,
        },
        ctx.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take(),
    );
}

/// Keeps what a settled answer used for the request's access log line (when it is on), with
/// the budget left as the ledger says it after the settlement when that was read.
fn keep_answered(ctx: &RequestContext, meter: &Meter, remaining: Option<Usd>) {
    if let Some(summary) = meter.summary() {
        let mut summary = Box::new(summary.clone());
        summary.remaining = remaining.or(summary.remaining);
        *ctx.answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(summary);
    }
}

/// The cascade's verdict on a probed answer (already metered): whether it is unsure, and the
/// answer as a client should see it (without the log-probabilities it did not ask for).
pub(super) fn judge(state: &AppState, ctx: &RequestContext, probe: &Probe<'_>, bytes: Bytes) -> (bool, Bytes) {
    let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return (false, bytes) };
    let Some(confidence) = crate::cascade::confidence(&answer) else {
        tracing::debug!(route = probe.route, "cascade: the backend sent no log-probabilities; answer kept");
        return (false, bytes);
    };
    let calibrator = state.calibrators.entry(probe.route.to_owned()).or_default();
    let (unsure, threshold) =
        calibrator.observe(confidence, probe.cascade.threshold, probe.cascade.target_premium_share);
    state.metrics.cascade_threshold.with_label_values(&[probe.route]).set(threshold);
    if ctx.request.member_value("logprobs").is_none_or(|v| v.as_bool() == Some(false)) {
        crate::cascade::strip_logprobs(&mut answer);
        return (unsure, Bytes::from(answer.to_string()));
    }
    (unsure, bytes)
}

/// The whole answer body, within the deadline and the size bound.
pub(super) async fn read_whole(
    body: crate::upstream::UpstreamBody,
    deadline: Instant,
    backend: &str,
) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::UpstreamGarbage),
        Ok(Err(_)) => Err(UpstreamError::Broken { backend: backend.to_owned() }.into()),
        Err(_) => Err(UpstreamError::Timeout { backend: backend.to_owned(), after: deadline.elapsed() }.into()),
    }
}

pub(super) fn put(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    if let Some(value) = value {
        headers.insert(name, value);
    }
}

fn reason_value(reason: &Reason) -> Option<HeaderValue> {
    match reason.label() {
        Cow::Borrowed(label) => Some(HeaderValue::from_static(label)),
        Cow::Owned(label) => HeaderValue::from_str(&label).ok(),
    }
}

/// A dollar amount as a header value, formatted on the stack: the value's bytes are then
/// the only allocation.
pub(crate) fn usd_value(usd: Usd) -> Option<HeaderValue> {
    let mut text = StackText { bytes: [0; 48], len: 0 };
    write!(text, "{usd}").ok()?;
    HeaderValue::from_bytes(&text.bytes[..text.len]).ok()
}

struct StackText {
    bytes: [u8; 48],
    len: usize,
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
