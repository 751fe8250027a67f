//! A request answered from the response cache: no backend, $0, metered like any answer (a
//! ledger record with reason `cache` and the tokens the answer holds), the cost it avoided
//! counted as saved.

use std::borrow::Cow;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::respond::{put, usd_value};
use super::{
    RequestContext, HEADER_BACKEND, HEADER_BUDGET_REMAINING, HEADER_CACHE, HEADER_COST, HEADER_REASON, HEADER_TIER,
};
use crate::app::AppState;
use crate::body::{Response, ResponseBody};
use crate::cache::{replay, Cached, Flight, Verdict};
use crate::cost::Usd;
use crate::ledger::RequestRecord;
use crate::metering::Settled;

use crate::cache::REASON as REASON_CACHE;

/// A request served from the cache, and the tokens its answer holds (for the tpm allowance).
pub(super) struct Hit {
    pub response: Response,
    pub tokens: u64,
}

/// Looks the request up: its answer if stored (or stored by an identical request in flight,
/// waited for), else `None` with the request's verdict set and, for the first of identical
/// requests, its flight to lead.
pub(super) async fn look_up(
    state: &Arc<AppState>,
    ctx: &mut RequestContext,
    headers: Option<&http::HeaderMap>,
) -> Option<Hit> {
    let cache = state.cache.as_ref()?;
    ctx.cache = cache.lookup(&ctx.principal, &ctx.request, headers);
    let Some(lookup) = ctx.cache.filter(|l| l.read) else {
        let verdict = if ctx.cache.is_some() { Verdict::Miss } else { Verdict::Bypass };
        cache.count(verdict, Usd::ZERO);
        ctx.cache_verdict = Some(verdict);
        return None;
    };
    let floor = crate::policy::plan::min_quality(&ctx.principal.user, ctx.hints);
    let backends = &ctx.snapshot.config.backends;
    let mut hit = cache.get(&lookup.key, floor, backends).await;
    if hit.is_none() && lookup.write {
        match cache.flight(lookup.key) {
            Flight::Leader(guard) => {
                *ctx.flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(guard);
            }
            Flight::Follower(mut leader) => {
                // Bounded by the longest a backend may take; then, or if the leader failed,
                // this request goes on its own.
                let longest = ctx.snapshot.config.longest_request();
                let _ = tokio::time::timeout(longest, leader.changed()).await;
                hit = cache.get(&lookup.key, floor, backends).await;
            }
        }
    }
    if let Some(hit) = hit {
        if let Some(response) = serve(state, ctx, &hit).await {
            ctx.cache_verdict = Some(Verdict::Hit);
            return Some(Hit { response, tokens: hit.prompt_tokens + hit.completion_tokens });
        }
    }
    cache.count(Verdict::Miss, Usd::ZERO);
    ctx.cache_verdict = Some(Verdict::Miss);
    None
}

/// The response serving `hit` to the request, or `None` when the entry cannot be replayed the
/// way the request wants it (then it is a miss).
pub(super) async fn serve(state: &Arc<AppState>, ctx: &RequestContext, hit: &Cached) -> Option<Response> {
    let (body, content_type) = if ctx.request.stream {
        let events = replay::sse(hit.endpoint, &hit.body, ctx.request.client_wants_usage)?;
        (events, "text/event-stream")
    } else {
        (hit.body.clone(), "application/json")
    };
    let now = Instant::now();
    let unix = ctx.unix_at(now);
    let latency = now.saturating_duration_since(ctx.started);
    let principal = &ctx.principal;
    let user: Arc<str> = Arc::from(principal.user.name.as_str());
    let route: Arc<str> = Arc::from(ctx.request.model());
    let record = RequestRecord {
        at_ms: ctx.arrived_ms,
        user: Arc::clone(&user),
        route: Arc::clone(&route),
        backend: Arc::from(hit.backend.name.as_str()),
        reason: Cow::Borrowed(REASON_CACHE),
        prompt_tokens: hit.prompt_tokens,
        completion_tokens: hit.completion_tokens,
        cost: Usd::ZERO,
        status: 200,
        latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        request_id: Some(ctx.request_id.clone()),
    };
    state.ledger.record_free(&principal.budgets, record, unix);
    if let Some(cache) = &state.cache {
        cache.count(Verdict::Hit, hit.cost);
    }
    // The answer is served by now: a ledger that cannot be read only leaves the header out.
    let remaining =
        crate::ledger::remaining(&state.ledger, &principal.budgets, unix).await.ok().flatten().map(|left| left.usd);

    let mut headers = HeaderMap::with_capacity(10);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(HEADER_CACHE, HeaderValue::from_static(Verdict::Hit.label()));
    put(&mut headers, HEADER_BACKEND, HeaderValue::from_str(&hit.backend.name).ok());
    put(&mut headers, HEADER_TIER, HeaderValue::from_str(&hit.backend.tier).ok());
    headers.insert(HEADER_REASON, HeaderValue::from_static(REASON_CACHE));
    put(&mut headers, HEADER_COST, usd_value(Usd::ZERO));
    if let Some(remaining) = remaining {
        put(&mut headers, HEADER_BUDGET_REMAINING, usd_value(remaining));
    }
    if ctx.summarize {
        let settled = Settled {
            user,
            route,
            backend: Arc::clone(&hit.backend),
            reason: Cow::Borrowed(REASON_CACHE),
            prompt_tokens: hit.prompt_tokens,
            completion_tokens: hit.completion_tokens,
            cost: Usd::ZERO,
            status: 200,
            error: None,
            latency,
            ttft: None,
            remaining,
            cache: Some(Verdict::Hit.label()),
        };
        *ctx.answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(settled));
    }
    let mut response = Response::new(ResponseBody::whole(body));
    *response.status_mut() = StatusCode::OK;
    *response.headers_mut() = headers;
    Some(response)
}
