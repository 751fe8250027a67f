//! The routing decision: which backends, in which order, and why. Pure: plain data in, plain
//! data out, no clock and no I/O.

use crate::config::{Backend, Policy, Pricing, User};

/// Why the first backend of a [`Decision`] was chosen; the `x-tollgate-reason` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request named a backend.
    Pinned,
    /// Quality-first user: the best candidate.
    QualityFirst,
    /// Cost-first user: the cheapest candidate that meets the quality floor.
    CostFirst,
    /// Cost-first, but no cheap candidate meets the quality floor.
    EscalatedQuality,
    /// The cheaper candidates cannot hold the prompt and completion.
    EscalatedContext,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::QualityFirst => "quality-first",
            Self::CostFirst => "cost-first",
            Self::EscalatedQuality => "escalated:quality",
            Self::EscalatedContext => "escalated:context",
        }
    }
}

/// The backends to try, best first (later ones are fallbacks), and why the first was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub order: Vec<usize>,
    pub reason: Reason,
}

/// Why nothing can serve the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the request needs {needed} tokens (prompt and completion) but no backend of this model holds more than {largest}")]
    ContextTooLong { needed: u64, largest: u64 },
}

/// The size of the request, as estimated before dispatch.
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Decides among `candidates` (indexes into `backends`) for `user`.
pub fn decide(
    backends: &[&Backend],
    candidates: &[usize],
    pinned: bool,
    user: &User,
    estimate: Estimate,
) -> Result<Decision, Refusal> {
    let needed = estimate.prompt_tokens + estimate.completion_tokens;
    let fits = |i: &usize| u64::from(backends[*i].context_window) >= needed;
    if !candidates.iter().any(fits) {
        let largest = candidates.iter().map(|i| u64::from(backends[*i].context_window)).max().unwrap_or(0);
        return Err(Refusal::ContextTooLong { needed, largest });
    }
    if pinned {
        return Ok(Decision { order: candidates.to_vec(), reason: Reason::Pinned });
    }
    let mut order: Vec<usize> = candidates.iter().copied().filter(fits).collect();
    let reason = match user.policy {
        Policy::QualityFirst => {
            order.sort_by(|a, b| backends[*b].quality.total_cmp(&backends[*a].quality));
            Reason::QualityFirst
        }
        Policy::CostFirst => {
            let cost = |i: &usize| estimated_usd(backends[*i], estimate);
            order.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
            // Meeting the floor comes first; below it, the best quality is the least bad.
            let floor = user.min_quality;
            order.sort_by_key(|i| backends[*i].quality < floor);
            let first = order.first().map(|i| backends[*i]);
            let cheapest_overall = candidates.iter().min_by(|a, b| cost(a).total_cmp(&cost(b)));
            match (first, cheapest_overall) {
                (Some(b), _) if b.quality < floor => {
                    order.sort_by(|a, b| backends[*b].quality.total_cmp(&backends[*a].quality));
                    Reason::EscalatedQuality
                }
                (Some(_), Some(cheapest)) if !fits(cheapest) => Reason::EscalatedContext,
                (Some(_), Some(cheapest)) if backends[*cheapest].quality < floor => Reason::EscalatedQuality,
                _ => Reason::CostFirst,
            }
        }
    };
    Ok(Decision { order, reason })
}

/// Throughput assumed for per-hour backends when ranking by cost: a small model on CPU.
const ASSUMED_TOKENS_PER_S: f64 = 20.0;

/// Rough cost of the request on `backend`, only to rank candidates.
fn estimated_usd(backend: &Backend, estimate: Estimate) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a ranking estimate")]
    let (prompt, completion) = (estimate.prompt_tokens as f64, estimate.completion_tokens as f64);
    match backend.pricing {
        Pricing::PerToken { input_per_mtok, output_per_mtok, .. } => {
            (prompt * input_per_mtok + completion * output_per_mtok) / 1e6
        }
        Pricing::PerHour { hourly_usd } => hourly_usd / 3600.0 * completion / ASSUMED_TOKENS_PER_S,
    }
}

#[cfg(test)]
mod tests;
