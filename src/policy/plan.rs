//! From a request to the [`Facts`] the decision reads: what its route offers, the estimate on
//! each candidate, the baseline for savings, pacing and clamping. Pure, and shared: live
//! traffic (`dispatch`) and the replay (`simulate`) build their facts through these same
//! functions, so a simulated decision is the decision the gateway would take.

use std::borrow::Cow;

use smallvec::SmallVec;

use crate::config::{Config, Policy, User};
use crate::cost::{Baseline, Usd};
use crate::ledger::period;
use crate::policy::{self, Candidate, Candidates, Facts, Refusal};
use crate::snapshot::ModelTarget;

/// Completion estimate for a pinned backend when the request sets no `max_tokens`.
pub const PINNED_DEFAULT_MAX_TOKENS: u64 = 512;

/// Per-request routing hints from headers; they may raise quality, never lower it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints {
    pub policy: Option<Policy>,
    pub min_quality: Option<f64>,
}

/// The sizes of one request as the gateway knows them before sending it.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    /// Embeddings generate nothing: no completion estimate.
    pub embeddings: bool,
}

/// What one route (or pinned backend) offers this request, computed once.
#[derive(Debug, Clone)]
pub struct Plan<'c> {
    /// The route alias, or the pinned backend's name.
    pub route: &'c str,
    pub route_index: Option<usize>,
    /// Backend indices: the route's own list, borrowed from the config.
    pub candidates: Cow<'c, [usize]>,
    pub pinned: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Estimated cost per candidate, in `candidates` order.
    pub estimates: Estimates,
    /// The route's most expensive candidate for this request (none when pinned).
    pub baseline: Option<Baseline>,
    /// The route's highest-quality candidate: tokens it serves are premium tokens.
    pub premium: Option<usize>,
}

/// Estimated costs, one per candidate (inline for the usual handful).
pub type Estimates = SmallVec<[Usd; 4]>;

pub fn plan(config: &Config, target: ModelTarget, shape: Shape) -> Plan<'_> {
    let (route, route_index, candidates, default_max, pinned) = match target {
        ModelTarget::Route(i) => {
            let r = &config.routes[i];
            (r.model.as_str(), Some(i), Cow::Borrowed(&r.backends[..]), u64::from(r.default_max_tokens), false)
        }
        ModelTarget::Backend(i) => {
            (config.backends[i].name.as_str(), None, Cow::Owned(vec![i]), PINNED_DEFAULT_MAX_TOKENS, true)
        }
    };
    let completion_tokens = if shape.embeddings { 0 } else { shape.max_tokens.unwrap_or(default_max) };
    let estimates = estimates(config, &candidates, shape.prompt_tokens, completion_tokens);
    let baseline = if pinned { None } else { baseline(config, &candidates, &estimates) };
    let premium = if pinned { None } else { premium(config, &candidates) };
    Plan {
        route,
        route_index,
        candidates,
        pinned,
        prompt_tokens: shape.prompt_tokens,
        completion_tokens,
        estimates,
        baseline,
        premium,
    }
}

/// The estimated cost of `prompt_tokens` + `completion_tokens` on each of `candidates`.
pub fn estimates(config: &Config, candidates: &[usize], prompt_tokens: u64, completion_tokens: u64) -> Estimates {
    candidates
        .iter()
        .map(|&i| {
            let b = &config.backends[i];
            b.pricing.estimate(prompt_tokens, completion_tokens, b.expected_tokens_per_s)
        })
        .collect()
}

/// The "always premium" baseline: the candidate with the highest estimate for these sizes.
pub fn baseline(config: &Config, candidates: &[usize], estimates: &[Usd]) -> Option<Baseline> {
    candidates.iter().zip(estimates).max_by_key(|(_, cost)| **cost).map(|(&i, _)| {
        let b = &config.backends[i];
        Baseline { pricing: b.pricing, tokens_per_s: b.expected_tokens_per_s }
    })
}

/// The highest-quality candidate (the first listed among equals).
pub fn premium(config: &Config, candidates: &[usize]) -> Option<usize> {
    candidates.iter().copied().reduce(
        |best, i| {
            if config.backends[i].quality > config.backends[best].quality {
                i
            } else {
                best
            }
        },
    )
}

/// The candidates with their estimates; `state(index)` says whether a backend is healthy and
/// has capacity (live: its circuit and in-flight count; simulated: always).
pub fn candidates<'c>(config: &'c Config, plan: &Plan<'_>, state: impl Fn(usize) -> (bool, bool)) -> Candidates<'c> {
    let needed = plan.prompt_tokens + plan.completion_tokens;
    plan.candidates
        .iter()
        .zip(&plan.estimates)
        .map(|(&index, &estimated_cost)| {
            let backend = &config.backends[index];
            let (healthy, has_capacity) = state(index);
            Candidate {
                index,
                name: &backend.name,
                quality: backend.quality,
                fits_context: u64::from(backend.context_window) >= needed,
                healthy,
                has_capacity,
                estimated_cost,
            }
        })
        .collect()
}

/// The policy a request runs under: the user's, or the request's hint.
pub fn policy(user: &User, hints: Hints) -> Policy {
    hints.policy.unwrap_or(user.policy)
}

/// The user's floor, raised (never lowered) by the request's hint.
pub fn min_quality(user: &User, hints: Hints) -> f64 {
    hints.min_quality.map_or(user.min_quality, |hint| hint.max(user.min_quality))
}

/// The facts for one decision, `remaining` read from the ledger at `now` (Unix seconds).
pub fn facts<'c>(
    user: &User,
    hints: Hints,
    plan: &Plan<'_>,
    candidates: Candidates<'c>,
    remaining: Option<Usd>,
    now: i64,
) -> Facts<'c> {
    let policy = policy(user, hints);
    Facts {
        candidates,
        pinned: plan.pinned,
        policy,
        min_quality: min_quality(user, hints),
        max_request: user.max_request_usd,
        remaining,
        paced: ahead_of_pace(user, policy, remaining, now),
    }
}

/// Whether a pacing quality-first user is ahead of its pace line at `now`.
pub fn ahead_of_pace(user: &User, policy: Policy, remaining: Option<Usd>, now: i64) -> bool {
    let (Some(pacing), Some(budget), Some(left), Policy::QualityFirst) =
        (user.pacing, user.budget_usd, remaining, policy)
    else {
        return false;
    };
    let start = period::start(user.budget_period, now);
    period::end(user.budget_period, now).is_some_and(|end| {
        policy::pacing::ahead_of_pace(budget.saturating_sub(left), budget, start, end, now, pacing.slack)
    })
}

/// Clamping with this request's sizes: what each candidate could generate within a limit.
pub fn clamp(config: &Config, plan: &Plan<'_>, facts: &Facts<'_>) -> Option<u64> {
    policy::clamp(facts, plan.completion_tokens, |index, limit| {
        let b = &config.backends[index];
        let affordable = b.pricing.affordable_completion(plan.prompt_tokens, limit, b.expected_tokens_per_s);
        affordable.min(b.context_window_room(plan.prompt_tokens))
    })
}

/// After a refusal: the `max_tokens` to decide again with when the budget or the per-request
/// cap refused and the user clamps (once per request); `None`: the refusal stands.
pub fn retry_clamped(
    config: &Config,
    user: &User,
    plan: &Plan<'_>,
    facts: &Facts<'_>,
    refusal: &Refusal,
    already_clamped: bool,
) -> Option<u64> {
    let money = matches!(refusal, Refusal::BudgetExceeded { .. } | Refusal::OverRequestCap { .. });
    if !money || !user.clamp_max_tokens || already_clamped {
        return None;
    }
    clamp(config, plan, facts)
}

/// The largest context window among the plan's candidates (for a context refusal's message).
pub fn largest_context(config: &Config, plan: &Plan<'_>) -> u64 {
    plan.candidates.iter().map(|&i| u64::from(config.backends[i].context_window)).max().unwrap_or(0)
}
