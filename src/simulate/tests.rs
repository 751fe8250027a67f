use super::*;

const MARCH: i64 = 1_772_323_200; // 2026-03-01T00:00:00Z
const DAY: i64 = 86_400;

/// A premium and a cheap per-token backend behind `auto`, and `extra_users`.
fn config(users: &str) -> Config {
    let text = format!(
        r#"
[[backends]]
name = "premium"
tier = "quality"
base_url = "http://127.0.0.1:9/v1"
model = "big"
quality = 0.9
pricing = {{ input_per_mtok = 1.0, output_per_mtok = 10.0 }}

[[backends]]
name = "cheap"
tier = "economy"
base_url = "http://127.0.0.1:9/v1"
model = "small"
quality = 0.5
pricing = {{ input_per_mtok = 0.1, output_per_mtok = 0.4 }}

[[routes]]
model = "auto"
backends = ["premium", "cheap"]
{users}"#
    );
    let no_env = |_: &str| None;
    Config::parse(&text, "sim.toml", &no_env).unwrap_or_else(|e| panic!("{e}"))
}

fn user(name: &str, extra: &str) -> String {
    format!(
        "\n[[users]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\npolicy = \"quality-first\"\nbudget_usd = 2.0\n{extra}\n",
        "ab".repeat(32)
    )
}

/// 40 requests a day for March, twice as many in the first half: front-loaded demand.
fn month(user: &str) -> Vec<TraceRecord> {
    let mut trace = Vec::new();
    for day in 0..31 {
        let n = if day < 15 { 60 } else { 30 };
        for i in 0..n {
            trace.push(TraceRecord {
                at_ms: (MARCH + day * DAY + i * (DAY / n)) * 1000,
                user: user.into(),
                model: "auto".into(),
                prompt_tokens: 500,
                completion_tokens: 300,
                max_tokens: Some(300),
                min_quality: None,
            });
        }
    }
    trace
}

#[test]
fn a_paced_user_stays_within_slack_of_the_pace_line_and_is_refused_only_where_unpaced_is() {
    let slack = 0.05;
    let paced_config = config(&user("u", &format!("pacing = true\npacing_slack = {slack}")));
    let unpaced_config = config(&user("u", ""));
    let trace = month("u");
    let paced = &run(&paced_config, &trace).users[0];
    let unpaced = &run(&unpaced_config, &trace).users[0];

    // Unpaced, the front-loaded demand spends the budget on premium by mid-month.
    let exhausted = unpaced.exhausted_at.expect("the unpaced user runs out");
    assert!(exhausted < MARCH + 20 * DAY, "exhausted at {}", period::rfc3339(exhausted));
    assert!(unpaced.refused() > 300, "{:?}", unpaced.refusals);

    // Paced: every point within the slack of the pace line (plus the one request that may
    // cross it: the check is made before each request).
    let budget = 2.0;
    let one_request = Usd::from_pico(3_500_000_000).as_f64() / budget; // 500 × $1/M + 300 × $10/M
    let period = 31.0 * DAY as f64;
    for point in &paced.spend {
        let spent_share = point.period.as_f64() / budget;
        let elapsed_share = (point.at - MARCH) as f64 / period;
        assert!(
            spent_share <= elapsed_share + slack + one_request + 1e-9,
            "at {}: spent {spent_share:.4} of the budget, {elapsed_share:.4} of the month gone",
            period::rfc3339(point.at)
        );
    }
    assert!(paced.reasons.get("paced").copied().unwrap_or(0) > 0, "{:?}", paced.reasons);
    for refused in &paced.refused_requests {
        assert!(unpaced.refused_requests.contains(refused), "request {refused} refused only when paced");
    }
    assert!(paced.refused() * 10 < unpaced.refused(), "{} vs {}", paced.refused(), unpaced.refused());
}

#[test]
fn a_clamping_user_gets_shorter_answers_instead_of_refusals() {
    // Budget $0.002: the premium estimate ($0.0035) never fits; the cheap one ($0.00017) does.
    let cfg = config(&user("u", "clamp_max_tokens = true").replace("budget_usd = 2.0", "budget_usd = 0.002"));
    let trace: Vec<TraceRecord> = month("u").into_iter().take(40).collect();
    let u = &run(&cfg, &trace).users[0];
    assert!(u.clamped > 0, "{u:?}");
    assert!(u.spent <= Usd::from_pico(2_000_000_000), "spent {}", u.spent);
    assert_eq!(u.served + u.refused(), 40);
}

#[test]
fn savings_are_the_premium_price_of_the_same_usage_minus_the_cost() {
    let cfg = config(&user("u", "").replace("policy = \"quality-first\"", "policy = \"cost-first\""));
    let trace: Vec<TraceRecord> = month("u").into_iter().take(10).collect();
    let u = &run(&cfg, &trace).users[0];
    // Each request: premium 500 × 1 + 300 × 10 = 3500 µ$; cheap 500 × 0.1 + 300 × 0.4 = 170 µ$.
    assert_eq!(u.spent, Usd::from_pico(10 * 170_000_000));
    assert_eq!(u.savings, Usd::from_pico(10 * (3_500_000_000 - 170_000_000)));
    assert_eq!((u.premium_tokens, u.tiers["economy"].requests), (0, 10));
}

#[test]
fn unknown_users_and_models_are_counted_not_fatal() {
    let cfg = config(&user("u", ""));
    let mut trace = month("u");
    trace.truncate(2);
    trace[0].model = "nope".into();
    trace[1].user = "stranger".into();
    let result = run(&cfg, &trace);
    assert_eq!(result.unknown_users, 1);
    assert_eq!(result.users[0].refusals.get("model_not_found"), Some(&1));
}
