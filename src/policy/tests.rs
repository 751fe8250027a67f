//! The decision table: both policies, every reason, hints, caps, budget and capacity.

use super::*;

const fn usd(micro: i64) -> Usd {
    Usd::from_pico(micro * 1_000_000)
}

/// Two backends as in the example config: a premium one and a cheap CPU one.
fn premium() -> Candidate<'static> {
    Candidate {
        index: 0,
        name: "gpu",
        quality: 0.9,
        fits_context: true,
        healthy: true,
        has_capacity: true,
        estimated_cost: usd(1000),
    }
}

fn cheap() -> Candidate<'static> {
    Candidate { index: 1, name: "cpu", quality: 0.35, estimated_cost: usd(10), ..premium() }
}

fn facts(policy: Policy, candidates: Vec<Candidate<'static>>) -> Facts<'static> {
    Facts {
        candidates: candidates.into(),
        pinned: false,
        policy,
        min_quality: 0.0,
        max_request: None,
        remaining: None,
        paced: false,
    }
}

fn decided(f: &Facts<'_>) -> (Vec<usize>, String) {
    let d = decide(f).unwrap_or_else(|r| panic!("refused: {r}"));
    (d.order.to_vec(), d.reason.label().into_owned())
}

fn both() -> Vec<Candidate<'static>> {
    vec![premium(), cheap()]
}

#[test]
fn quality_first_takes_the_best_backend_with_the_other_as_fallback() {
    assert_eq!(decided(&facts(Policy::QualityFirst, both())), (vec![0, 1], "quality-first".into()));
}

#[test]
fn quality_first_steps_down_when_the_budget_cannot_pay_the_best() {
    let f = Facts { remaining: Some(usd(500)), ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decided(&f), (vec![1], "budget-downgrade".into()));
}

#[test]
fn quality_first_steps_down_when_the_request_cap_is_below_the_best() {
    let f = Facts { max_request: Some(usd(100)), ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decided(&f), (vec![1], "budget-downgrade".into()));
}

#[test]
fn quality_first_spills_when_the_best_is_full() {
    let f = facts(Policy::QualityFirst, vec![Candidate { has_capacity: false, ..premium() }, cheap()]);
    assert_eq!(decided(&f), (vec![1], "spill".into()));
}

#[test]
fn quality_first_names_the_failed_backend_it_falls_back_from() {
    let f = facts(Policy::QualityFirst, vec![Candidate { healthy: false, ..premium() }, cheap()]);
    assert_eq!(decided(&f), (vec![1], "fallback:gpu".into()));
}

#[test]
fn cost_first_takes_the_cheapest_that_meets_the_floor() {
    let f = Facts { min_quality: 0.3, ..facts(Policy::CostFirst, both()) };
    assert_eq!(decided(&f), (vec![1, 0], "cost-first".into()));
}

#[test]
fn cost_first_escalates_for_quality() {
    let f = Facts { min_quality: 0.5, ..facts(Policy::CostFirst, both()) };
    assert_eq!(decided(&f), (vec![0], "escalated:quality".into()));
}

#[test]
fn cost_first_escalates_for_context() {
    let f = facts(Policy::CostFirst, vec![premium(), Candidate { fits_context: false, ..cheap() }]);
    assert_eq!(decided(&f), (vec![0], "escalated:context".into()));
}

#[test]
fn cost_first_escalates_for_capacity() {
    let f = facts(Policy::CostFirst, vec![premium(), Candidate { has_capacity: false, ..cheap() }]);
    assert_eq!(decided(&f), (vec![0], "escalated:capacity".into()));
}

#[test]
fn cost_first_falls_back_from_an_open_circuit() {
    let f = facts(Policy::CostFirst, vec![premium(), Candidate { healthy: false, ..cheap() }]);
    assert_eq!(decided(&f), (vec![0], "fallback:cpu".into()));
}

#[test]
fn a_quality_hint_above_every_backend_is_refused() {
    let f = Facts { min_quality: 0.95, ..facts(Policy::CostFirst, both()) };
    assert_eq!(decide(&f), Err(Refusal::QualityUnavailable { required: 0.95, best: 0.9 }));
}

#[test]
fn nothing_affordable_is_budget_exceeded() {
    let f = Facts { remaining: Some(usd(5)), ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decide(&f), Err(Refusal::BudgetExceeded { remaining: usd(5), cheapest: usd(10) }));
}

#[test]
fn nothing_under_the_cap_is_over_request_cap() {
    let f = Facts { max_request: Some(usd(5)), ..facts(Policy::CostFirst, both()) };
    assert_eq!(decide(&f), Err(Refusal::OverRequestCap { cheapest: usd(10), cap: usd(5) }));
}

#[test]
fn every_backend_full_means_wait() {
    let full = vec![Candidate { has_capacity: false, ..premium() }, Candidate { has_capacity: false, ..cheap() }];
    assert_eq!(decide(&facts(Policy::CostFirst, full)), Err(Refusal::AtCapacity));
}

#[test]
fn every_backend_down_is_unavailable() {
    let down = vec![Candidate { healthy: false, ..premium() }, Candidate { healthy: false, ..cheap() }];
    assert_eq!(decide(&facts(Policy::QualityFirst, down)), Err(Refusal::Unavailable));
}

#[test]
fn a_prompt_no_backend_can_hold_is_refused() {
    let long = vec![Candidate { fits_context: false, ..premium() }, Candidate { fits_context: false, ..cheap() }];
    assert!(matches!(decide(&facts(Policy::QualityFirst, long)), Err(Refusal::ContextTooLong { .. })));
}

#[test]
fn a_pinned_backend_ignores_the_quality_floor_but_not_the_budget() {
    let pinned = Facts { pinned: true, min_quality: 0.9, ..facts(Policy::CostFirst, vec![cheap()]) };
    assert_eq!(decided(&pinned), (vec![1], "pinned".into()));
    let broke = Facts { remaining: Some(usd(1)), ..pinned };
    assert!(matches!(decide(&broke), Err(Refusal::BudgetExceeded { .. })));
}

#[test]
fn with_no_budget_set_everything_is_affordable() {
    let f = Facts { remaining: None, ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decided(&f).1, "quality-first");
}

#[test]
fn a_paced_quality_first_user_ahead_of_pace_takes_the_cheaper_backend_that_meets_its_floor() {
    let f = Facts { paced: true, min_quality: 0.3, ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decided(&f), (vec![1, 0], "paced".into()));
    // A floor only premium meets keeps premium, paced or not.
    let strict = Facts { paced: true, min_quality: 0.5, ..facts(Policy::QualityFirst, both()) };
    assert_eq!(decided(&strict), (vec![0], "quality-first".into()));
}

#[test]
fn clamping_prefers_what_the_policy_prefers_and_refuses_below_the_minimum() {
    let quality = Facts { remaining: Some(usd(5)), ..facts(Policy::QualityFirst, both()) };
    // premium can pay 40 tokens, cpu 500: quality-first keeps premium with fewer tokens.
    let affordable = |index: usize, _limit: Usd| if index == 0 { 40 } else { 500 };
    assert_eq!(clamp(&quality, 1000, affordable), Some(40));
    let cost = Facts { policy: Policy::CostFirst, ..quality.clone() };
    assert_eq!(clamp(&cost, 1000, affordable), Some(500));
    assert_eq!(clamp(&cost, 100, affordable), Some(100), "never more than asked");
    assert_eq!(clamp(&quality, 1000, |_, _| 10), None, "below the useful minimum");
    let unlimited = Facts { remaining: None, ..quality };
    assert_eq!(clamp(&unlimited, 1000, affordable), None, "nothing to clamp to");
}
