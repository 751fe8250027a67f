//! The report as a table or as JSON.

use std::io::Write;

use serde::{Serialize, Serializer};
use serde_json::{json, Value};

use super::{BackendReport, Report, UserReport};
use crate::cost::Usd;
use crate::ledger::period;
use crate::simulate::render::{percent, write_columns, Align};

fn money(usd: Option<Usd>) -> String {
    usd.map_or_else(|| "-".into(), |u| format!("${u}"))
}

fn premium_share(u: &UserReport) -> String {
    percent(u.premium_tokens, u.routed_tokens)
}

fn utilisation(b: &BackendReport, window_ms: i64) -> Option<String> {
    let busy = u64::try_from(b.busy_ms?).ok()?;
    Some(percent(busy, u64::try_from(window_ms).ok()?))
}

/// Users whose spend this period is above their price, most over first.
fn over_price(report: &Report) -> impl Iterator<Item = &UserReport> {
    let mut over: Vec<&UserReport> =
        report.users.iter().filter(|u| u.margin().is_some_and(|m| m < Usd::ZERO)).collect();
    over.sort_by_key(|u| u.margin());
    over.into_iter()
}

const USER_COLUMNS: [&str; 14] = [
    "user",
    "requests",
    "prompt",
    "completion",
    "cost",
    "cost/request",
    "savings",
    "premium share",
    "period spend",
    "projected",
    "budget",
    "plan",
    "price",
    "margin",
];

fn user_cells(u: &UserReport) -> [String; 14] {
    [
        u.user.clone(),
        u.requests.to_string(),
        u.prompt_tokens.to_string(),
        u.completion_tokens.to_string(),
        money(Some(u.cost)),
        money(u.cost_per_request()),
        money(Some(u.savings)),
        premium_share(u),
        money(u.period_spend),
        money(u.projected),
        money(u.budget),
        u.plan.clone().unwrap_or_else(|| "-".into()),
        money(u.price),
        money(u.margin()),
    ]
}

fn backend_cells(b: &BackendReport, window_ms: i64) -> [String; 7] {
    [
        b.backend.clone(),
        b.tier.clone().unwrap_or_else(|| "(not configured)".into()),
        b.requests.to_string(),
        b.tokens.to_string(),
        money(Some(b.cost)),
        money(b.idle_cost),
        utilisation(b, window_ms).unwrap_or_else(|| "-".into()),
    ]
}

/// The report as text tables, written as they are rendered.
pub fn write_table(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let w = report.window;
    writeln!(
        out,
        "window {} .. {}\n",
        period::rfc3339(w.start_ms.div_euclid(1000)),
        period::rfc3339(w.end_ms.div_euclid(1000))
    )?;
    write_columns(out, Align::FirstLeft, || {
        std::iter::once(USER_COLUMNS.map(String::from)).chain(report.users.iter().map(user_cells))
    })?;
    writeln!(out)?;
    let hits: u64 = report.users.iter().map(|u| u.cache_hits).sum();
    if hits > 0 {
        let saved = report.users.iter().fold(Usd::ZERO, |sum, u| sum.saturating_add(u.cache_saved));
        let by_user: Vec<String> = report
            .users
            .iter()
            .filter(|u| u.cache_hits > 0)
            .map(|u| format!("{} {} ({})", u.user, u.cache_hits, money(Some(u.cache_saved))))
            .collect();
        writeln!(
            out,
            "response cache: {hits} requests answered at $0, {} saved at their backends' prices: {}\n",
            money(Some(saved)),
            by_user.join(", ")
        )?;
    }
    let backend_columns = ["backend", "tier", "requests", "tokens", "attributed cost", "idle cost", "utilisation"];
    write_columns(out, Align::FirstLeft, || {
        std::iter::once(backend_columns.map(String::from))
            .chain(report.backends.iter().map(|b| backend_cells(b, w.end_ms - w.start_ms)))
    })?;
    let over: Vec<&UserReport> = over_price(report).collect();
    if !over.is_empty() {
        writeln!(out, "\n{} users cost more than they pay this period:", over.len())?;
        for u in over {
            writeln!(
                out,
                "  {} ({}): spent {}, pays {}",
                u.user,
                u.plan.as_deref().unwrap_or("-"),
                money(u.period_spend),
                money(u.price)
            )?;
        }
    }
    let unrouted: u64 = report.users.iter().map(|u| u.unrouted).sum();
    if unrouted > 0 {
        writeln!(
            out,
            "\n{unrouted} records pinned a backend or name a route the config no longer has: no savings or premium share for them"
        )?;
    }
    Ok(())
}

/// The report as pretty JSON, each user's object built as it is written: with a million users
/// the whole document as one `Value` took gigabytes.
pub fn write_json(report: &Report, out: impl std::io::Write) -> serde_json::Result<()> {
    /// Fields in the order `serde_json`'s maps keep keys (sorted), as the document had them
    /// when it was one `Value`.
    #[derive(Serialize)]
    struct Document<'a> {
        backends: Vec<Value>,
        over_price: Vec<&'a str>,
        users: Users<'a>,
        window: Value,
    }
    struct Users<'a>(&'a [UserReport]);
    impl Serialize for Users<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(user_json))
        }
    }
    let w = report.window;
    let window_ms = w.end_ms - w.start_ms;
    let document = Document {
        backends: report.backends.iter().map(|b| backend_json(b, window_ms)).collect(),
        over_price: over_price(report).map(|u| u.user.as_str()).collect(),
        users: Users(&report.users),
        window: json!({"start": period::rfc3339(w.start_ms.div_euclid(1000)), "end": period::rfc3339(w.end_ms.div_euclid(1000)),
                       "start_ms": w.start_ms, "end_ms": w.end_ms}),
    };
    serde_json::to_writer_pretty(out, &document)
}

fn user_json(u: &UserReport) -> Value {
    #[expect(clippy::cast_precision_loss, reason = "a share for display")]
    let share = (u.routed_tokens > 0).then(|| u.premium_tokens as f64 / u.routed_tokens as f64);
    json!({
        "user": u.user,
        "requests": u.requests,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cost_usd": u.cost.as_f64(),
        "cost_per_request_usd": u.cost_per_request().map(Usd::as_f64),
        "savings_usd": u.savings.as_f64(),
        "premium_token_share": share,
        "premium_tokens": u.premium_tokens,
        "unrouted_records": u.unrouted,
        "cache_hits": u.cache_hits,
        "cache_saved_usd": u.cache_saved.as_f64(),
        "budget_usd": u.budget.map(Usd::as_f64),
        "period_spend_usd": u.period_spend.map(Usd::as_f64),
        "projected_period_spend_usd": u.projected.map(Usd::as_f64),
        "plan": u.plan,
        "team": u.team,
        "price_usd": u.price.map(Usd::as_f64),
        "margin_usd": u.margin().map(Usd::as_f64),
    })
}

fn backend_json(b: &BackendReport, window_ms: i64) -> Value {
    #[expect(clippy::cast_precision_loss, reason = "a share for display")]
    let utilisation = b.busy_ms.filter(|_| window_ms > 0).map(|busy| busy as f64 / window_ms as f64);
    json!({
        "backend": b.backend,
        "tier": b.tier,
        "requests": b.requests,
        "tokens": b.tokens,
        "attributed_cost_usd": b.cost.as_f64(),
        "idle_cost_usd": b.idle_cost.map(Usd::as_f64),
        "busy_ms": b.busy_ms,
        "utilisation": utilisation,
    })
}
