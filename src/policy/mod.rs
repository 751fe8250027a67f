//! The routing decision: which backends, in which order, and why. Pure: plain data in, plain
//! data out, no clock and no I/O. The dispatcher gathers the facts (health, capacity, budget,
//! estimates) and acts on the decision.

pub mod pacing;
pub mod plan;
mod reason;

pub use reason::Reason;

use smallvec::SmallVec;

use crate::config::Policy;
use crate::cost::Usd;

/// A route's candidates. Routes list a handful of backends: up to four live inline, with no
/// allocation per request.
pub type Candidates<'a> = SmallVec<[Candidate<'a>; 4]>;
/// Backend indices in the order to try them.
pub type Order = SmallVec<[usize; 4]>;

/// What is known of one candidate backend when the request arrives.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Index into the config's backends.
    pub index: usize,
    pub name: &'a str,
    pub quality: f64,
    /// Prompt plus the completion estimate fit its context window.
    pub fits_context: bool,
    /// Its circuit is closed, or half-open with the probe slot free.
    pub healthy: bool,
    /// Below `max_concurrency`.
    pub has_capacity: bool,
    /// The request's estimated cost on it.
    pub estimated_cost: Usd,
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The route's backends in config order, or the one pinned backend.
    pub candidates: Candidates<'a>,
    pub pinned: bool,
    pub policy: Policy,
    /// The user's floor, raised by the request's hint when it asks for more.
    pub min_quality: f64,
    /// The user's cap on one request's estimated cost.
    pub max_request: Option<Usd>,
    /// Budget left (budget − spent − reserved); `None` when the user has no budget.
    pub remaining: Option<Usd>,
    /// The user paces its budget and is ahead of the pace line: quality-first then takes the
    /// cheapest candidate that meets its floor.
    pub paced: bool,
}

/// The backends to try, chosen first (later ones are fallbacks for failures before the first
/// byte), and why the first was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub order: Order,
    pub reason: Reason,
}

/// Why no backend may serve the request now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the request needs about {needed} tokens (prompt and completion) but no backend for this model holds more than {largest}")]
    ContextTooLong { needed: u64, largest: u64 },
    #[error("no backend for this model meets the required quality {required} (best: {best})")]
    QualityUnavailable { required: f64, best: f64 },
    #[error(
        "the request's estimated cost (at least ${cheapest}) is over the per-request cap of ${cap}; lower max_tokens"
    )]
    OverRequestCap { cheapest: Usd, cap: Usd },
    #[error("budget exhausted: ${remaining} left, the request needs about ${cheapest}")]
    BudgetExceeded { remaining: Usd, cheapest: Usd },
    #[error("every backend for this model is unavailable (circuit open after failures)")]
    Unavailable,
    /// Every eligible backend is at `max_concurrency`: the dispatcher may wait and decide again.
    #[error("every backend for this model is at capacity")]
    AtCapacity,
}

impl Refusal {
    /// The OpenAI-shaped error `code` this refusal answers with (also the simulator's tally).
    pub fn code(&self) -> &'static str {
        match self {
            Self::ContextTooLong { .. } => "context_length_exceeded",
            Self::QualityUnavailable { .. } => "quality_unavailable",
            Self::OverRequestCap { .. } => "max_request_cost_exceeded",
            Self::BudgetExceeded { .. } => "budget_exceeded",
            Self::Unavailable => "backend_unavailable",
            Self::AtCapacity => "capacity_exceeded",
        }
    }
}

/// Decides for one request; see the module doc.
pub fn decide(facts: &Facts<'_>) -> Result<Decision, Refusal> {
    let c = &facts.candidates;
    let meets_quality = |x: &Candidate<'_>| facts.pinned || x.quality >= facts.min_quality;
    let within_cap = |x: &Candidate<'_>| facts.max_request.is_none_or(|cap| x.estimated_cost <= cap);
    let affordable = |x: &Candidate<'_>| facts.remaining.is_none_or(|left| x.estimated_cost <= left);

    // Eligible regardless of money and load: the request can be served there at all.
    let servable = |x: &Candidate<'_>| x.healthy && x.fits_context && meets_quality(x);
    let payable = |x: &Candidate<'_>| servable(x) && within_cap(x) && affordable(x);
    if !c.iter().any(servable) {
        return Err(why_unservable(facts));
    }
    if !c.iter().any(payable) {
        let cheapest = c.iter().filter(|x| servable(x)).map(|x| x.estimated_cost).min().unwrap_or_default();
        return Err(match (facts.max_request, facts.remaining) {
            (Some(cap), _) if cheapest > cap => Refusal::OverRequestCap { cheapest, cap },
            (_, remaining) => Refusal::BudgetExceeded { remaining: remaining.unwrap_or_default(), cheapest },
        });
    }
    let mut ready: SmallVec<[&Candidate<'_>; 4]> = c.iter().filter(|x| payable(x) && x.has_capacity).collect();
    if ready.is_empty() {
        return Err(Refusal::AtCapacity);
    }
    if facts.pinned {
        return Ok(Decision { order: smallvec::smallvec![ready[0].index], reason: Reason::Pinned });
    }

    let by_quality = |a: &&Candidate<'_>, b: &&Candidate<'_>| {
        b.quality.total_cmp(&a.quality).then(a.estimated_cost.cmp(&b.estimated_cost))
    };
    let by_cost = |a: &&Candidate<'_>, b: &&Candidate<'_>| {
        a.estimated_cost.cmp(&b.estimated_cost).then(b.quality.total_cmp(&a.quality))
    };
    let reason = match facts.policy {
        Policy::QualityFirst if facts.paced => {
            let best = ready.iter().copied().min_by(by_quality).map(|x| x.index);
            ready.sort_by(by_cost);
            if best == Some(ready[0].index) {
                Reason::QualityFirst
            } else {
                Reason::Paced
            }
        }
        Policy::QualityFirst => {
            ready.sort_by(by_quality);
            // The ideal: the best backend this request could use if money and load allowed.
            let ideal = c.iter().filter(|x| x.fits_context).min_by(|a, b| by_quality(a, b));
            match ideal {
                Some(ideal) if ideal.index == ready[0].index => Reason::QualityFirst,
                Some(ideal) if !ideal.healthy => Reason::Fallback(ideal.name.to_owned()),
                Some(ideal) if !(within_cap(ideal) && affordable(ideal)) => Reason::BudgetDowngrade,
                Some(ideal) if !ideal.has_capacity => Reason::Spill,
                _ => Reason::QualityFirst,
            }
        }
        Policy::CostFirst => {
            ready.sort_by(by_cost);
            // The ideal: the route's cheapest backend; any other choice is an escalation.
            let ideal = c.iter().min_by(|a, b| by_cost(a, b));
            match ideal {
                Some(ideal) if ideal.index == ready[0].index => Reason::CostFirst,
                Some(ideal) if !ideal.healthy => Reason::Fallback(ideal.name.to_owned()),
                Some(ideal) if !ideal.fits_context => Reason::EscalatedContext,
                Some(ideal) if !meets_quality(ideal) => Reason::EscalatedQuality,
                Some(ideal) if !ideal.has_capacity => Reason::EscalatedCapacity,
                _ => Reason::CostFirst,
            }
        }
    };
    Ok(Decision { order: ready.iter().map(|x| x.index).collect(), reason })
}

/// Below this many completion tokens a clamped answer is of no use: refuse instead.
pub const MIN_CLAMPED_TOKENS: u64 = 16;

/// Budget-clamped `max_tokens`: when a request's `wanted` completion cannot be paid, the
/// length the budget (and the per-request cap) can pay on the candidate the user's policy
/// prefers among those that can pay at least [`MIN_CLAMPED_TOKENS`]. `affordable(index, limit)`
/// says how many completion tokens a candidate could generate for `limit` (and its context
/// holds). `None`: refuse.
pub fn clamp(facts: &Facts<'_>, wanted: u64, affordable: impl Fn(usize, Usd) -> u64) -> Option<u64> {
    if wanted <= MIN_CLAMPED_TOKENS {
        return None;
    }
    let limit = match (facts.remaining, facts.max_request) {
        (Some(left), Some(cap)) => left.min(cap),
        (Some(left), None) => left,
        (None, Some(cap)) => cap,
        (None, None) => return None,
    };
    let mut usable: Vec<(&Candidate<'_>, u64)> = facts
        .candidates
        .iter()
        .filter(|c| c.healthy && (facts.pinned || c.quality >= facts.min_quality))
        .map(|c| (c, affordable(c.index, limit).min(wanted)))
        .filter(|(_, tokens)| *tokens >= MIN_CLAMPED_TOKENS)
        .collect();
    match facts.policy {
        Policy::QualityFirst => usable.sort_by(|a, b| b.0.quality.total_cmp(&a.0.quality)),
        Policy::CostFirst => usable.sort_by_key(|(c, _)| c.estimated_cost),
    }
    usable.first().map(|(_, tokens)| *tokens)
}

/// The most useful explanation when no candidate can serve the request at all.
fn why_unservable(facts: &Facts<'_>) -> Refusal {
    let c = &facts.candidates;
    if !c.iter().any(|x| x.fits_context) {
        // The dispatcher knows the exact numbers; these are placeholders it replaces.
        return Refusal::ContextTooLong { needed: 0, largest: 0 };
    }
    let best = c.iter().filter(|x| x.fits_context).map(|x| x.quality).fold(0.0, f64::max);
    if !facts.pinned && best < facts.min_quality {
        return Refusal::QualityUnavailable { required: facts.min_quality, best };
    }
    Refusal::Unavailable
}

#[cfg(test)]
mod tests;
