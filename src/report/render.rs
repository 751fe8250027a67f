//! The report as a table or as JSON.

use serde_json::{json, Value};

use super::{BackendReport, Report, UserReport};
use crate::cost::Usd;
use crate::ledger::period;
use crate::simulate::render::percent;

fn money(usd: Option<Usd>) -> String {
    usd.map_or_else(|| "-".into(), |u| format!("${u}"))
}

fn columns(rows: &[Vec<String>]) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| if i == 0 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
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

pub fn table(report: &Report) -> String {
    let w = report.window;
    let mut out = format!(
        "window {} .. {}\n\n",
        period::rfc3339(w.start_ms.div_euclid(1000)),
        period::rfc3339(w.end_ms.div_euclid(1000))
    );
    let mut rows = vec![[
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
    ]
    .map(String::from)
    .to_vec()];
    for u in &report.users {
        rows.push(vec![
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
        ]);
    }
    out.push_str(&columns(&rows));
    out.push('\n');
    let hits: u64 = report.users.iter().map(|u| u.cache_hits).sum();
    if hits > 0 {
        let saved = report.users.iter().fold(Usd::ZERO, |sum, u| sum.saturating_add(u.cache_saved));
        let by_user: Vec<String> = report
            .users
            .iter()
            .filter(|u| u.cache_hits > 0)
            .map(|u| format!("{} {} ({})", u.user, u.cache_hits, money(Some(u.cache_saved))))
            .collect();
        out.push_str(&format!(
            "response cache: {hits} requests answered at $0, {} saved at their backends' prices: {}\n\n",
            money(Some(saved)),
            by_user.join(", ")
        ));
    }
    let mut rows = vec![["backend", "tier", "requests", "tokens", "attributed cost", "idle cost", "utilisation"]
        .map(String::from)
        .to_vec()];
    for b in &report.backends {
        rows.push(vec![
            b.backend.clone(),
            b.tier.clone().unwrap_or_else(|| "(not configured)".into()),
            b.requests.to_string(),
            b.tokens.to_string(),
            money(Some(b.cost)),
            money(b.idle_cost),
            utilisation(b, w.end_ms - w.start_ms).unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&columns(&rows));
    let over: Vec<&UserReport> = over_price(report).collect();
    if !over.is_empty() {
        out.push_str(&format!("\n{} users cost more than they pay this period:\n", over.len()));
        for u in over {
            out.push_str(&format!(
                "  {} ({}): spent {}, pays {}\n",
                u.user,
                u.plan.as_deref().unwrap_or("-"),
                money(u.period_spend),
                money(u.price)
            ));
        }
    }
    let unrouted: u64 = report.users.iter().map(|u| u.unrouted).sum();
    if unrouted > 0 {
        out.push_str(&format!(
            "\n{unrouted} records pinned a backend or name a route the config no longer has: no savings or premium share for them\n"
        ));
    }
    out
}

pub fn json(report: &Report) -> Value {
    let w = report.window;
    let users: Vec<Value> = report
        .users
        .iter()
        .map(|u| {
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
        })
        .collect();
    let window_ms = w.end_ms - w.start_ms;
    let backends: Vec<Value> = report
        .backends
        .iter()
        .map(|b| {
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
        })
        .collect();
    json!({
        "window": {"start": period::rfc3339(w.start_ms.div_euclid(1000)), "end": period::rfc3339(w.end_ms.div_euclid(1000)),
                   "start_ms": w.start_ms, "end_ms": w.end_ms},
        "users": users,
        "over_price": over_price(report).map(|u| u.user.as_str()).collect::<Vec<_>>(),
        "backends": backends,
    })
}
