use super::*;

const MARCH_10: i64 = 1_773_100_800; // 2026-03-10T00:00:00Z

fn config() -> Config {
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
name = "cpu"
tier = "economy"
base_url = "http://127.0.0.1:9/v1"
model = "small"
quality = 0.4
pricing = {{ hourly_usd = 0.36 }}

[[routes]]
model = "auto"
backends = ["premium", "cpu"]

[[users]]
name = "u"
key_sha256 = "{}"
budget_usd = 10.0
"#,
        "ab".repeat(32)
    );
    let no_env = |_: &str| None;
    Config::parse(&text, "r.toml", &no_env).unwrap_or_else(|e| panic!("{e}"))
}

fn record(at_ms: i64, route: &str, backend: &str, cost_pico: i64, latency_ms: u64) -> RequestRecord {
    RequestRecord {
        at_ms,
        user: "u".into(),
        route: route.into(),
        backend: backend.into(),
        reason: "x".into(),
        prompt_tokens: 100,
        completion_tokens: 100,
        cost: Usd::from_pico(cost_pico),
        status: 200,
        latency_ms,
        request_id: None,
    }
}

#[test]
fn busy_time_is_the_union_of_request_intervals_within_the_window() {
    let window = Window { start_ms: 0, end_ms: 100 };
    let busy = |intervals: &[(i64, i64)]| {
        let mut busy = Busy::default();
        for &(start, end) in intervals {
            busy.add(start, end, window);
        }
        busy.total()
    };
    assert_eq!(busy(&[(-5, 2), (10, 20), (15, 30), (40, 50), (95, 120)]), 2 + 20 + 10 + 5);
    assert_eq!(busy(&[(10, 20), (10, 12), (12, 25), (25, 26)]), 16, "touching and nested intervals");
    assert_eq!(busy(&[]), 0);
}

#[test]
fn projection_is_linear_in_the_elapsed_share_of_the_period() {
    let usd = Usd::from_pico(3_000_000_000_000);
    assert_eq!(project(usd, 0, 30, 10), Some(Usd::from_pico(9_000_000_000_000)));
    assert_eq!(project(usd, 0, 30, 0), None, "nothing elapsed: no rate");
}

#[test]
fn savings_premium_share_and_idle_cost_come_from_the_route_as_configured() {
    let cfg = config();
    let at = MARCH_10 * 1000;
    let records = [
        // Premium: 100 × $1/M + 100 × $10/M = $0.0011, the route's most expensive: no savings.
        record(at, "auto", "premium", 1_100_000_000, 1_000),
        // CPU for $0.0001 instead of $0.0011 (its own estimate, 5 s at $0.36/h, is $0.0005): saves $0.001.
        record(at + 500, "auto", "cpu", 100_000_000, 1_000),
        // Pinned, and a route the config no longer has: neither savings nor premium share.
        record(at + 10_000, "cpu", "cpu", 100_000_000, 2_000),
        record(at + 20_000, "gone", "premium", 1_100_000_000, 1_000),
    ];
    let spend =
        [PeriodSpend { user: "u".into(), period_start: 1_772_323_200, spent: Usd::from_pico(4_500_000_000_000) }];
    // 2026-03-10T00:01:00Z: the window is the minute since midnight.
    let window = Window { start_ms: at, end_ms: at + 60_000 };
    let report = build(&cfg, &[], &records, &spend, window);
    let u = &report.users[0];
    assert_eq!((u.requests, u.unrouted), (4, 2));
    assert_eq!(u.savings, Usd::from_pico(1_000_000_000));
    assert_eq!((u.premium_tokens, u.routed_tokens), (200, 400));
    assert_eq!(u.cost_per_request(), Some(Usd::from_pico(600_000_000)));
    // $4.50 spent in the first 9 days and 1 minute of March's 31: projected ≈ $15.49.
    let projected = u.projected.unwrap();
    assert!(
        projected > Usd::from_pico(15_480_000_000_000) && projected < Usd::from_pico(15_500_000_000_000),
        "{projected}"
    );
    let cpu = &report.backends[1];
    // Busy 1.5 s ([0.5, 1.5] and [10, 12]) minus overlap: [at+500, at+1500] ∪ [at+10000, at+12000] = 3 s.
    assert_eq!(cpu.busy_ms, Some(3_000));
    // Idle 57 s at $0.36/h = $0.0057.
    assert_eq!(cpu.idle_cost, Some(Usd::from_pico(5_700_000_000)));
    assert_eq!(report.backends[0].busy_ms, None, "per-token backends have no idle cost");
}

/// A cache hit is a $0 request for its user, what its backend would have charged counted as
/// saved, and no work for that backend: it neither counts there nor keeps it busy.
#[test]
fn cache_hits_save_their_producers_price_and_leave_the_backend_idle() {
    let cfg = config();
    let at = MARCH_10 * 1000;
    let hit = |offset: i64| RequestRecord {
        reason: crate::cache::REASON.into(),
        ..record(at + offset, "auto", "cpu", 0, 1_000)
    };
    let records = [record(at, "auto", "cpu", 100_000_000, 1_000), hit(5_000), hit(6_000)];
    let window = Window { start_ms: at, end_ms: at + 60_000 };
    let report = build(&cfg, &[], &records, &[], window);
    let u = &report.users[0];
    assert_eq!((u.requests, u.cache_hits), (3, 2));
    assert_eq!(u.cost, Usd::from_pico(100_000_000));
    // Each hit: the hourly CPU backend's own estimate for the tokens (5 s at $0.36/h).
    assert_eq!(u.cache_saved, Usd::from_pico(2 * 500_000_000));
    let cpu = report.backends.iter().find(|b| b.backend == "cpu").unwrap();
    assert_eq!((cpu.requests, cpu.busy_ms), (1, Some(1_000)), "only the request it answered kept it busy");
    let mut text = Vec::new();
    super::render::write_table(&report, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("response cache: 2 requests answered at $0"), "{text}");
}

#[test]
fn each_users_period_spend_adds_its_own_backend_rows_of_the_current_period_only() {
    let cfg = config();
    let api_users: Vec<Arc<User>> =
        ["a", "b"].iter().map(|name| Arc::new(User::new(*name, &crate::config::Limits::default()))).collect();
    let now = MARCH_10 + 3_600;
    let month = period::start(crate::config::BudgetPeriod::Month, now);
    let spend =
        |user: &str, period_start, pico| PeriodSpend { user: user.into(), period_start, spent: Usd::from_pico(pico) };
    let rows = [
        spend("a", month, 1),
        spend("b", month, 10),
        spend("a", month, 100),            // a second backend's row
        spend("a", month - 86_400, 1_000), // a past period
        spend("~key:k1", month, 10_000),   // a key's account, not a user's
    ];
    let window = Window { start_ms: MARCH_10 * 1000, end_ms: now * 1000 };
    let report = build(&cfg, &api_users, &[], &rows, window);
    let spent = |name: &str| report.users.iter().find(|u| u.user == name).and_then(|u| u.period_spend);
    assert_eq!(spent("a"), Some(Usd::from_pico(101)));
    assert_eq!(spent("b"), Some(Usd::from_pico(10)));
    assert_eq!(spent("u"), Some(Usd::ZERO), "a config user without rows spent nothing");
}

/// User `u`'s one request on the premium backend, in a minute from March 10th's midnight.
fn one_request_report() -> Report {
    let at = MARCH_10 * 1000;
    let window = Window { start_ms: at, end_ms: at + 60_000 };
    build(&config(), &[], &[record(at, "auto", "premium", 2_000_000, 10)], &[], window)
}

#[test]
fn the_table_aligns_every_column_to_its_widest_cell() {
    let report = one_request_report();
    let mut text = Vec::new();
    super::render::write_table(&report, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("window 2026-03-10T00:00:00Z .. "), "{text}");
    let (header, row) = (lines[2], lines[3]);
    assert!(header.starts_with("user  requests"), "{text}");
    assert!(row.starts_with("u            1"), "{text}");
    // Right-aligned: every column of the row ends where its header does.
    assert_eq!(header.find("requests").map(|at| at + "requests".len()), row.find(" 1 ").map(|at| at + 2), "{text}");
    assert_eq!(header.len(), row.len(), "the last column ends at the same place:\n{text}");
}

#[test]
fn the_json_document_has_every_user_and_backend() {
    let report = one_request_report();
    let mut out = Vec::new();
    super::render::write_json(&report, &mut out).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["users"][0]["user"], "u");
    assert_eq!(doc["users"][0]["requests"], 1);
    assert_eq!(doc["backends"].as_array().map(Vec::len), Some(2));
    assert_eq!(doc["window"]["start_ms"], MARCH_10 * 1000);
    assert!(doc["over_price"].as_array().is_some_and(Vec::is_empty));
}
