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

/// One request to `auto` at `at` (Unix seconds): 500 tokens in, 300 out.
fn request(at: i64, user: &str) -> TraceRecord {
    TraceRecord {
        at_ms: at * 1000,
        user: user.into(),
        model: "auto".into(),
        prompt_tokens: 500,
        completion_tokens: 300,
        max_tokens: Some(300),
        min_quality: None,
        prompt_hash: None,
    }
}

/// 40 requests a day for March, twice as many in the first half: front-loaded demand.
fn month(user: &str) -> Vec<TraceRecord> {
    let mut trace = Vec::new();
    for day in 0..31 {
        let n = if day < 15 { 60 } else { 30 };
        for i in 0..n {
            trace.push(request(MARCH + day * DAY + i * (DAY / n), user));
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

/// Ten questions asked over and over: with `[cache]`, repeats within the TTL are hits at $0,
/// their avoided cost counted; a user with a higher floor is not served a cheaper backend's
/// answer under `global`; without `[cache]` the same trace pays for every request.
#[test]
fn repeated_prompt_hashes_are_hits_when_the_cache_is_on() {
    let trace = |user: &str, min_quality: Option<f64>| -> Vec<TraceRecord> {
        (0..100)
            .map(|i| TraceRecord {
                at_ms: (MARCH + i * 60) * 1000,
                user: user.into(),
                model: "auto".into(),
                prompt_tokens: 500,
                completion_tokens: 300,
                max_tokens: Some(300),
                min_quality,
                prompt_hash: Some(format!("q{}", i % 10)),
            })
            .collect()
    };
    let users = format!(
        "{}\n[[users]]\nname = \"a\"\nkey_sha256 = \"{}\"\npolicy = \"cost-first\"\n",
        user("b", "min_quality = 0.8"),
        "cd".repeat(32)
    );
    let cached = config(&format!("{users}\n[cache]\nscope = \"global\"\nttl_s = 86400\n"));
    let plain = config(&users);
    let mut both = trace("a", None);
    both.extend(trace("b", None));
    both.sort_by_key(|r| r.at_ms);

    let without = run(&plain, &both);
    assert!(without.users.iter().all(|u| u.cache_hits == 0 && u.served == 100));
    let with = run(&cached, &both);
    let (b, a) = (&with.users[0], &with.users[1]);
    // a (cost-first, cheap backend) pays for each of the ten questions once, then hits; its
    // cheap answers never reach b (floor 0.8), whose premium answers then serve a too.
    assert_eq!((a.served, b.served), (100, 100));
    assert_eq!(b.cache_hits, 90, "b asks the backend once per question");
    assert_eq!(a.cache_hits, 90, "a's cheap answers were replaced by b's premium ones");
    assert_eq!(a.reasons.get("cache"), Some(&a.cache_hits));
    let paid_a = without.users[1].spent;
    assert!(a.spent < paid_a && a.cache_saved > Usd::ZERO);
    // What was saved plus what was paid is what every request would have cost, for b.
    assert_eq!(b.spent.saturating_add(b.cache_saved), without.users[0].spent);

    // Past the TTL a repeat is a miss again.
    let short = config(&format!("{users}\n[cache]\nscope = \"user\"\nttl_s = 30\n"));
    let expired = run(&short, &trace("b", None));
    assert_eq!(expired.users[0].cache_hits, 0, "each question repeats only every 10 minutes");
}

#[test]
fn a_plot_of_many_users_draws_everyone_together_then_those_who_spent_the_most() {
    use plot::{draw, panel_users, MAX_USER_PANELS, SERIES};
    // 30 users; user i sends i + 1 requests, one every ten minutes from the start of March.
    let users: String = (0..30)
        .map(|i| format!("\n[[users]]\nname = \"u{i:02}\"\nkey_sha256 = \"{i:064x}\"\npolicy = \"quality-first\"\n"))
        .collect();
    let mut trace: Vec<TraceRecord> =
        (0..30).flat_map(|i| (0..=i).map(move |r| request(MARCH + r * 600, &format!("u{i:02}")))).collect();
    trace.sort_by_key(|r| r.at_ms);
    let runs = vec![("a".to_owned(), run(&config(&users), &trace))];

    let (drawn, all) = panel_users(&runs);
    let names: Vec<&str> = drawn.iter().map(|u| u.user.as_str()).collect();
    let expected: Vec<String> = (18..30).rev().map(|i| format!("u{i:02}")).collect();
    assert_eq!((all, names), (30, expected.iter().map(String::as_str).collect::<Vec<_>>()));

    let chart = draw(&runs);
    assert_eq!((chart.users, chart.drawn), (30, MAX_USER_PANELS));
    // The legend (one config: 22 px), everyone's panel, then twelve users' (190 px each).
    assert_eq!(chart.canvas.height, 22 + 13 * 190);
    // Everyone's line ends at the total of every request (the scale's top less its 10% headroom:
    // 127 of the plot's 140 px), drawn in the config's colour.
    let plot_bottom = 22 + 190 - 16;
    assert_eq!(chart.canvas.get(960 - 20 - 1, plot_bottom - 127), Some(SERIES[0]));
    assert_eq!(
        chart.legend(&runs),
        "all 30 users together, then the 12 who spent the most; a blue; budget red dashed, pace grey"
    );

    // A handful of users: a panel each, in the trace's order, as before.
    let few: Vec<TraceRecord> = trace.iter().filter(|r| r.user.as_str() < "u03").cloned().collect();
    let runs = vec![("a".to_owned(), run(&config(&users), &few))];
    let chart = draw(&runs);
    assert_eq!((chart.users, chart.drawn, chart.canvas.height), (3, 3, 22 + 3 * 190));
    assert_eq!(chart.legend(&runs), "a blue; budget red dashed, pace grey");
}
