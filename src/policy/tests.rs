use std::time::Duration;

use super::*;
use crate::config::{BudgetPeriod, Simulate, Target};

fn backend(name: &str, quality: f64, context_window: u32, pricing: Pricing) -> Backend {
    Backend {
        name: name.into(),
        tier: "t".into(),
        target: Target::Simulated(Simulate { ttft: Duration::ZERO, tokens_per_s: 1.0, quality_text: "x".into() }),
        model: name.into(),
        quality,
        context_window,
        max_concurrency: 1,
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        first_byte_timeout: Duration::from_secs(1),
        pricing,
    }
}

fn user(policy: Policy, min_quality: f64) -> User {
    User {
        name: "u".into(),
        key_sha256: [0; 32],
        policy,
        budget_usd: None,
        budget_period: BudgetPeriod::Month,
        max_request_usd: None,
        min_quality,
        rpm: None,
        tpm: None,
    }
}

const PREMIUM: Pricing = Pricing::PerToken { input_per_mtok: 0.6, output_per_mtok: 2.4, cached_input_per_mtok: None };
const CPU: Pricing = Pricing::PerHour { hourly_usd: 0.12 };
const SMALL: Estimate = Estimate { prompt_tokens: 100, completion_tokens: 200 };

fn fleet() -> Vec<Backend> {
    vec![backend("cpu", 0.35, 8192, CPU), backend("gpu", 0.9, 131_072, PREMIUM)]
}

fn run(policy: Policy, floor: f64, estimate: Estimate) -> Result<Decision, Refusal> {
    let backends = fleet();
    let refs: Vec<&Backend> = backends.iter().collect();
    decide(&refs, &[0, 1], false, &user(policy, floor), estimate)
}

#[test]
fn quality_first_takes_the_best_backend_and_keeps_the_other_as_fallback() {
    assert_eq!(run(Policy::QualityFirst, 0.0, SMALL), Ok(Decision { order: vec![1, 0], reason: Reason::QualityFirst }));
}

#[test]
fn cost_first_takes_the_cheapest_backend_that_meets_the_floor() {
    assert_eq!(run(Policy::CostFirst, 0.3, SMALL), Ok(Decision { order: vec![0, 1], reason: Reason::CostFirst }));
}

#[test]
fn cost_first_escalates_when_the_cheap_backend_is_below_the_floor() {
    assert_eq!(
        run(Policy::CostFirst, 0.5, SMALL),
        Ok(Decision { order: vec![1, 0], reason: Reason::EscalatedQuality })
    );
}

#[test]
fn cost_first_escalates_when_the_prompt_does_not_fit_the_cheap_backend() {
    let long = Estimate { prompt_tokens: 10_000, completion_tokens: 200 };
    assert_eq!(run(Policy::CostFirst, 0.3, long), Ok(Decision { order: vec![1], reason: Reason::EscalatedContext }));
}

#[test]
fn a_prompt_no_backend_can_hold_is_refused() {
    let huge = Estimate { prompt_tokens: 200_000, completion_tokens: 1 };
    assert_eq!(
        run(Policy::QualityFirst, 0.0, huge),
        Err(Refusal::ContextTooLong { needed: 200_001, largest: 131_072 })
    );
}

#[test]
fn a_pinned_backend_is_the_only_candidate() {
    let backends = fleet();
    let refs: Vec<&Backend> = backends.iter().collect();
    let d = decide(&refs, &[0], true, &user(Policy::QualityFirst, 0.9), SMALL);
    assert_eq!(d, Ok(Decision { order: vec![0], reason: Reason::Pinned }));
}
