//! One request's life after authentication and parsing: rate limits → decide → reserve →
//! send (falling back on failures before the first byte) → meter → `x-tollgate-*` headers.

use std::sync::Arc;

use crate::body::Response;
use http::HeaderName;
use tokio::time::Instant;

mod attempt;
mod cached;
mod guards;
mod respond;

use attempt::{attempt, Decided, Outcome, Probe};
use guards::{QueuePlace, TokenHold};

use crate::app::AppState;
use crate::cache::{FlightGuard, Lookup, Verdict};
use crate::config::Cascade;
use crate::cost::Usd;
use crate::error::ApiError;
use crate::ledger::Left;
use crate::metering::Settled;
use crate::policy::{self, Candidates, Reason, Refusal};
use crate::request::{Endpoint, ProxyRequest};
use crate::snapshot::{ModelTarget, Snapshot};
use crate::telemetry::{RequestId, TraceContext, Trail};
use crate::tenancy::Principal;

pub const HEADER_BACKEND: HeaderName = HeaderName::from_static("x-tollgate-backend");
pub const HEADER_TIER: HeaderName = HeaderName::from_static("x-tollgate-tier");
pub const HEADER_REASON: HeaderName = HeaderName::from_static("x-tollgate-reason");
pub const HEADER_COST: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
pub const HEADER_BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-tollgate-budget-remaining-usd");
pub const HEADER_CACHE: HeaderName = HeaderName::from_static("x-tollgate-cache");
pub const HEADER_MAX_TOKENS_CLAMPED: HeaderName = HeaderName::from_static("x-tollgate-max-tokens-clamped");

/// A whole non-streamed answer is read before it is forwarded (to meter it exactly and put
/// its cost in a header); beyond this size it is refused as a broken backend answer.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Decisions re-taken when concurrent requests spent the budget between decision and
/// reservation: each round sees less budget, so this ends quickly.
const MAX_DECISION_ROUNDS: usize = 8;

pub use crate::policy::plan::Hints;
pub(crate) use respond::usd_value;

/// The request's context as it goes through: who asks, for what.
pub struct RequestContext {
    pub snapshot: Arc<Snapshot>,
    /// Who asks: the user's limits, and every level's budget and rate limits.
    pub principal: Arc<Principal>,
    /// The client's header map, done with: emptied and reused for the first backend request
    /// (one allocation fewer). Never sent as it is.
    pub spare_headers: Option<http::HeaderMap>,
    pub request: ProxyRequest,
    pub hints: Hints,
    /// When the gateway received the request (for durations and deadlines).
    pub started: Instant,
    /// The same moment in Unix milliseconds.
    pub arrived_ms: i64,
    /// `max_tokens` as shortened to what the budget pays (`clamp_max_tokens`).
    pub clamped: Option<u64>,
    /// What earlier calls for this request cost (a cascade's unsure first answer).
    pub prior_cost: Usd,
    pub request_id: RequestId,
    /// The request's access log line and server span, when either is on: a streamed answer
    /// takes it, to finish it when the stream ends.
    pub trail: std::sync::Mutex<Option<Trail>>,
    /// Whether answers keep what they used and cost (the trail is on).
    pub summarize: bool,
    /// What attempts' client spans are children of (traces on).
    pub trace: Option<Arc<TraceContext>>,
    /// The last answer settled for this request (when summarized), whatever happened after:
    /// what the request's line and span report.
    pub answered: std::sync::Mutex<Option<Box<Settled>>>,
    /// What the request does with the response cache (`None`: no cache, or bypassed).
    pub cache: Option<Lookup>,
    /// The cache's verdict on it (`None`: no cache).
    pub cache_verdict: Option<Verdict>,
    /// Leading identical requests to the backend: they wait until this answer is stored.
    pub flight: std::sync::Mutex<Option<FlightGuard>>,
}

/// How a dispatched request ended, what its last answer used (when summarized), and its trail
/// unless a stream took it.
pub struct Dispatched {
    pub result: Result<Response, ApiError>,
    pub settled: Option<Box<Settled>>,
    pub trail: Option<Trail>,
}

impl RequestContext {
    /// Unix seconds at `at`, from the request's arrival on both clocks.
    pub fn unix_at(&self, at: Instant) -> i64 {
        crate::clock::unix_at(self.arrived_ms, self.started, at)
    }
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
    let target = snapshot.resolve(request.model()).ok_or_else(|| ApiError::UnknownModel(request.model().to_owned()))?;
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

pub async fn run(state: &Arc<AppState>, mut ctx: RequestContext) -> Dispatched {
    let mut unsure_answer = None;
    let result = match decide_and_send(state, &mut ctx, &mut unsure_answer).await {
        // A cascade's escalation that cannot happen (budget spent by the first call, every
        // better backend down, the ledger gone) still leaves a paid-for answer: serve it.
        Err(e) if unsure_answer.is_some() => {
            tracing::info!(error = %e, "cascade escalation not possible; serving the first answer");
            unsure_answer.ok_or(e)
        }
        result => result,
    };
    let settled = ctx.answered.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let trail = ctx.trail.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    Dispatched { result, settled, trail }
}

async fn decide_and_send(
    state: &Arc<AppState>,
    ctx: &mut RequestContext,
    unsure_answer: &mut Option<Response>,
) -> Result<Response, ApiError> {
    let snapshot = Arc::clone(&ctx.snapshot);
    let mut plan = plan(&snapshot, &ctx.request)?;
    let mut spare_headers = ctx.spare_headers.take();
    let principal = Arc::clone(&ctx.principal);
    let user = &principal.user;
    let tokens_estimate = plan.prompt_tokens + plan.completion_tokens;
    // Rate limits count the request at its arrival.
    let root = principal.budgets.root();
    state.limiter.admit(&principal.allowances, root, tokens_estimate, ctx.started).await?;
    let mut tokens_held =
        TokenHold { state, allowances: &principal.allowances, root, tokens: tokens_estimate, armed: true };
    // The zero-cost tier first: after the rate limits (a hit counts against them), before the
    // budget (a hit costs nothing, so an exhausted budget still gets it).
    if let Some(hit) = cached::look_up(state, ctx, spare_headers.as_ref()).await {
        tokens_held.armed = false;
        state.limiter.settle_tokens(&principal.allowances, root, tokens_estimate, hit.tokens);
        return Ok(hit.response);
    }

    let queue_deadline = ctx.started + snapshot.config.server.queue_timeout;
    let mut queue_place: Option<QueuePlace<'_>> = None;
    let mut rounds = 0;
    // After an unsure cascade answer: only backends better than the one that gave it.
    let mut escalated_from: Option<f64> = None;
    loop {
        let now = Instant::now();
        let unix = ctx.unix_at(now);
        let left = crate::ledger::remaining(&state.ledger, &principal.budgets, unix).await?;
        let remaining = left.map(|l| l.usd);
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
                let decided = Decided { decision, at: now };
                match attempt(state, ctx, &plan, decided, &mut spare_headers, &mut tokens_held, probe.as_ref()).await? {
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
            Refusal::BudgetExceeded { .. } => return Err(refused(left, refusal, unix)),
            Refusal::ContextTooLong { .. } => {
                let largest = policy::plan::largest_context(&snapshot.config, &plan);
                return Err(Refusal::ContextTooLong { needed: tokens_estimate, largest }.into());
            }
            other => return Err(other.into()),
        }
    }
}

/// A budget refusal, naming the level that is short, with `Retry-After` until its period
/// resets.
fn refused(left: Option<Left>, refusal: Refusal, now: i64) -> ApiError {
    let remaining = match &refusal {
        Refusal::BudgetExceeded { remaining, .. } => Some(*remaining),
        _ => None,
    };
    let retry_after = left.and_then(|l| l.resets_in(now));
    ApiError::Refused { refusal, retry_after, remaining, scope: left.map(|l| l.scope) }
}

/// The candidates as the backends' live state (circuit, in-flight count) has them now.
fn candidates<'s>(snapshot: &'s Snapshot, plan: &Plan<'_>, now: Instant) -> Candidates<'s> {
    policy::plan::candidates(&snapshot.config, plan, |index| {
        let upstream = &snapshot.upstreams[index];
        (upstream.state.is_available(now), upstream.state.in_flight() < upstream.backend.max_concurrency)
    })
}
