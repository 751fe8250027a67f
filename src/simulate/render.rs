//! The simulator's output: a side-by-side table (one column per config) or JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;

use serde::{Serialize, Serializer};
use serde_json::{json, Value};

use super::{Run, UserRun};
use crate::cost::Usd;
use crate::ledger::period;

const DAY: i64 = 86_400;

/// `part / whole` as a percentage with one decimal, in integer arithmetic (stable output).
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    let per_mille = (u128::from(part) * 1000 + u128::from(whole) / 2) / u128::from(whole);
    format!("{}.{}%", per_mille / 10, per_mille % 10)
}

/// Dollars with two decimals (rounded half up); the exact amounts are in the JSON.
pub fn dollars(usd: Usd) -> String {
    let cents = usd.mul_div(1, 10_000_000_000).unwrap_or_default().pico();
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}${}.{:02}", cents.abs() / 100, cents.abs() % 100)
}

/// The spend over the whole trace (all periods) by the end of `at` (Unix seconds).
fn total_by(user: &UserRun, at: i64) -> Usd {
    user.spend.iter().take_while(|p| p.at <= at).last().map_or(Usd::ZERO, |p| p.total)
}

fn mix(user: &UserRun, tokens: bool) -> String {
    let whole = if tokens { user.tokens() } else { user.served };
    let parts: Vec<String> = user
        .tiers
        .iter()
        .map(|(tier, m)| format!("{tier} {}", percent(if tokens { m.tokens } else { m.requests }, whole)))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn refusals(user: &UserRun) -> String {
    if user.refusals.is_empty() {
        return "0".into();
    }
    user.refusals.iter().map(|(code, n)| format!("{n} {code}")).collect::<Vec<_>>().join(", ")
}

fn exhausted(user: &UserRun) -> String {
    user.exhausted_at.map_or_else(|| "never".into(), |t| period::rfc3339(t)[..16].replace('T', " "))
}

/// How a table's columns are aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// The first column left-aligned, the rest (figures) right-aligned.
    FirstLeft,
}

/// Writes `rows` as aligned columns, taking the rows twice from `rows()`: once for the widths,
/// once to write. Tables of a row or more per user have a million rows: kept as strings, they
/// took gigabytes.
pub fn write_columns<R, I>(out: &mut impl Write, align: Align, rows: impl Fn() -> R) -> std::io::Result<()>
where
    R: Iterator<Item = I>,
    I: IntoIterator<Item = String>,
{
    let mut widths: Vec<usize> = Vec::new();
    for row in rows() {
        for (c, cell) in row.into_iter().enumerate() {
            let width = cell.chars().count();
            match widths.get_mut(c) {
                Some(w) => *w = (*w).max(width),
                None => widths.push(width),
            }
        }
    }
    let mut line = String::new();
    for row in rows() {
        line.clear();
        for (i, (cell, w)) in row.into_iter().zip(&widths).enumerate() {
            let _ = match (i, align) {
                (0, _) => write!(line, "{cell:<w$}"),
                (_, Align::Left) => write!(line, "  {cell:<w$}"),
                (_, Align::FirstLeft) => write!(line, "  {cell:>w$}"),
            };
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The comparison table: per user, one row per figure, one column per (config name, run).
pub fn write_table(runs: &[(String, Run)], out: &mut impl Write) -> std::io::Result<()> {
    // Every user of any run, in first-seen order, and each run's users by name: traces from a
    // ledger of API users name hundreds of thousands.
    let mut users: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (_, run) in runs {
        for u in &run.users {
            if seen.insert(u.user.as_str()) {
                users.push(&u.user);
            }
        }
    }
    let by_name: Vec<HashMap<&str, &UserRun>> = runs.iter().map(|(_, r)| r.by_name()).collect();
    let span = runs.iter().find_map(|(_, r)| r.span);
    let thirds = span.map(|(a, b)| [a + (b - a) / 3, a + (b - a) * 2 / 3, b]);
    let header: Vec<String> = std::iter::once(String::new()).chain(runs.iter().map(|(n, _)| n.clone())).collect();
    let user_rows = |name: &str| {
        let found: Vec<Option<&UserRun>> = by_name.iter().map(|users| users.get(name).copied()).collect();
        user_rows(name, &found, thirds)
    };
    write_columns(out, Align::Left, || {
        std::iter::once(header.clone()).chain(users.iter().flat_map(|name| user_rows(name)))
    })?;
    for (name, run) in runs {
        if run.unknown_users > 0 {
            writeln!(out, "{name}: {} requests from users the config does not know", run.unknown_users)?;
        }
    }
    Ok(())
}

/// A user's rows of the table: its name and budget, then a row per figure, a cell per run
/// (`None`: the run has no such user).
fn user_rows(name: &str, found: &[Option<&UserRun>], thirds: Option<[i64; 3]>) -> Vec<Vec<String>> {
    let budget = found.iter().flatten().next().map_or_else(String::new, |u| match u.budget {
        Some(b) => format!(" (budget {} per {})", dollars(b), period::name(u.period)),
        None => " (no budget)".into(),
    });
    let mut rows = vec![vec![format!("{name}{budget}")]];
    let mut row = |label: &str, cell: &dyn Fn(&UserRun) -> String| {
        let cells = found.iter().map(|u| u.map_or_else(|| "-".into(), cell));
        rows.push(std::iter::once(format!("  {label}")).chain(cells).collect());
    };
    row("policy", &|u| u.policy.clone());
    row("served / requests", &|u| format!("{} / {}", u.served, u.requests));
    row("refused", &refusals);
    row("spend", &|u| dollars(u.spent));
    if let Some(at) = thirds {
        row("spend at 1/3, 2/3 of trace", &|u| {
            format!("{} {}", dollars(total_by(u, at[0])), dollars(total_by(u, at[1])))
        });
    }
    row("cost per request", &|u| {
        u.spent.mul_div(1, i64::try_from(u.served).unwrap_or(i64::MAX)).map_or("-".into(), dollars_fine)
    });
    row("savings vs premium", &|u| dollars(u.savings));
    row("premium token share", &|u| percent(u.premium_tokens, u.tokens()));
    row("tier mix (requests)", &|u| mix(u, false));
    row("tier mix (tokens)", &|u| mix(u, true));
    row("clamped max_tokens", &|u| u.clamped.to_string());
    if found.iter().flatten().any(|u| u.cache_hits > 0) {
        row("cache hits (saved)", &|u| {
            format!("{} {} ({})", u.cache_hits, percent(u.cache_hits, u.requests), dollars(u.cache_saved))
        });
    }
    row("budget exhausted", &exhausted);
    rows
}

/// Small amounts (a request's cost) with four significant decimals.
fn dollars_fine(usd: Usd) -> String {
    let tenth_mills = usd.mul_div(1, 100_000_000).unwrap_or_default().pico();
    format!("${}.{:04}", tenth_mills / 10_000, tenth_mills % 10_000)
}

/// The runs as JSON, written user by user: a trace from a ledger of API users names hundreds
/// of thousands, and the whole document as one `Value` took gigabytes.
pub fn write_json(runs: &[(String, Run)], out: impl std::io::Write) -> serde_json::Result<()> {
    /// Fields in the order `serde_json`'s maps keep keys (sorted), as the document had them
    /// when it was one `Value`.
    #[derive(Serialize)]
    struct Document<'a> {
        configs: Vec<ConfigRun<'a>>,
    }
    #[derive(Serialize)]
    struct ConfigRun<'a> {
        config: &'a str,
        unknown_users: u64,
        users: Users<'a>,
    }
    struct Users<'a>(&'a Run);
    impl Serialize for Users<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.users.iter().map(|u| user_json(u, self.0.span)))
        }
    }
    let configs = runs
        .iter()
        .map(|(name, run)| ConfigRun { config: name, unknown_users: run.unknown_users, users: Users(run) })
        .collect();
    serde_json::to_writer_pretty(out, &Document { configs })
}

fn user_json(u: &UserRun, span: Option<(i64, i64)>) -> Value {
    let tiers: serde_json::Map<String, Value> =
        u.tiers.iter().map(|(tier, m)| (tier.clone(), json!({"requests": m.requests, "tokens": m.tokens}))).collect();
    #[expect(clippy::cast_precision_loss, reason = "a share for display")]
    let premium_share = (u.tokens() > 0).then(|| u.premium_tokens as f64 / u.tokens() as f64);
    // Spend over time: the trace-wide total at the end of each day.
    let daily: Vec<Value> = span
        .map(|(a, b)| {
            let first = a.div_euclid(DAY);
            (first..=b.div_euclid(DAY))
                .map(|d| {
                    let end = (d + 1) * DAY - 1;
                    json!({"day": &period::rfc3339(d * DAY)[..10], "spent_usd": total_by(u, end).as_f64()})
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "user": u.user,
        "policy": u.policy,
        "budget_usd": u.budget.map(Usd::as_f64),
        "budget_period": period::name(u.period),
        "requests": u.requests,
        "served": u.served,
        "refusals": u.refusals,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "spent_usd": u.spent.as_f64(),
        "savings_usd": u.savings.as_f64(),
        "premium_token_share": premium_share,
        "tiers": tiers,
        "reasons": u.reasons,
        "clamped": u.clamped,
        "cache_hits": u.cache_hits,
        "cache_saved_usd": u.cache_saved.as_f64(),
        "budget_exhausted_at": u.exhausted_at.map(period::rfc3339),
        "spend_daily": daily,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_and_dollars_round_half_up_in_integers() {
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(2, 3), "66.7%");
        assert_eq!(percent(0, 0), "-");
        assert_eq!(dollars(Usd::from_pico(1_234_999_999_999)), "$1.23");
        assert_eq!(dollars(Usd::from_pico(1_235_000_000_000)), "$1.24");
        assert_eq!(dollars_fine(Usd::from_pico(10_500_000_000)), "$0.0105");
    }
}
