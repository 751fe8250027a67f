//! `tollgate report`: unit economics from the ledger's request records. Pure: records, the
//! current periods' spend and the config in; figures out. The CLI reads the SQLite file.
//!
//! Savings and the premium share of a record are computed against its route as the config
//! has it *now* (the route's most expensive and highest-quality candidates, priced with the
//! record's actual tokens, through the same [`plan`] helpers as live traffic): a record whose
//! route is gone, or that pinned a backend, has no baseline and is left out of both.

pub mod render;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{Config, User};
use crate::cost::Usd;
pub use crate::ledger::PeriodSpend;
use crate::ledger::{period, RequestRecord};
use crate::openai::Usage;
use crate::policy::plan;
use crate::snapshot::ModelTarget;

const MS_PER_HOUR: i64 = 3_600_000;

/// What the report covers, in Unix milliseconds; `end` is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserReport {
    pub user: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usd,
    pub savings: Usd,
    /// Tokens served by their route's highest-quality backend.
    pub premium_tokens: u64,
    /// Tokens of records whose route is known (the premium share's denominator).
    pub routed_tokens: u64,
    /// Records left out of savings and premium share (route gone, or a pinned backend).
    pub unrouted: u64,
    /// Requests the response cache answered ($0 records, reason `cache`).
    pub cache_hits: u64,
    /// What those answers cost when their backend produced them: what the cache saved.
    pub cache_saved: Usd,
    pub budget: Option<Usd>,
    pub plan: Option<String>,
    pub team: Option<String>,
    /// What the user pays per period (its plan's price).
    pub price: Option<Usd>,
    /// Spend in the current budget period (from the ledger's totals, not the window).
    pub period_spend: Option<Usd>,
    /// `period_spend` extrapolated linearly to the period's end.
    pub projected: Option<Usd>,
}

impl UserReport {
    pub fn cost_per_request(&self) -> Option<Usd> {
        self.cost.mul_div(1, i64::try_from(self.requests).ok()?).filter(|_| self.requests > 0)
    }

    /// Price minus this period's spend: negative when the user costs more than it pays.
    pub fn margin(&self) -> Option<Usd> {
        Some(self.price?.saturating_sub(self.period_spend.unwrap_or(Usd::ZERO)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendReport {
    pub backend: String,
    pub tier: Option<String>,
    pub requests: u64,
    pub tokens: u64,
    /// What its requests were charged.
    pub cost: Usd,
    /// Hourly backends: milliseconds with at least one request in flight within the window.
    pub busy_ms: Option<i64>,
    /// Hourly backends: the hourly cost of the window's time with nothing in flight.
    pub idle_cost: Option<Usd>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub window: Window,
    pub users: Vec<UserReport>,
    pub backends: Vec<BackendReport>,
}

/// The report over `records` (those within `window`), with the current period spend `spend`,
/// for the config's users and `api_users` (the API users' effective limits).
pub fn build(
    config: &Config,
    api_users: &[Arc<User>],
    records: &[RequestRecord],
    spend: &[PeriodSpend],
    window: Window,
) -> Report {
    let (models, _) = crate::snapshot::model_index(config);
    // Keyed by the records' shared names: a record costs no key copy.
    let mut users: BTreeMap<Arc<str>, UserReport> = BTreeMap::new();
    let mut backends: BTreeMap<Arc<str>, BackendReport> = BTreeMap::new();
    let mut intervals: BTreeMap<Arc<str>, Vec<(i64, i64)>> = BTreeMap::new();
    let in_window = records.iter().filter(|r| r.at_ms >= window.start_ms && r.at_ms <= window.end_ms);
    for r in in_window {
        let tokens = r.prompt_tokens + r.completion_tokens;
        let u = users
            .entry(Arc::clone(&r.user))
            .or_insert_with(|| UserReport { user: r.user.to_string(), ..UserReport::default() });
        u.requests += 1;
        u.prompt_tokens += r.prompt_tokens;
        u.completion_tokens += r.completion_tokens;
        u.cost = u.cost.saturating_add(r.cost);
        // A hit was answered by no backend: it saved its producer's price, and neither occupies
        // nor counts for that backend.
        let hit = r.reason == crate::cache::REASON;
        if hit {
            u.cache_hits += 1;
            if let Some(b) = config.backends.iter().find(|b| *b.name == *r.backend) {
                let usage = Usage::new(r.prompt_tokens, r.completion_tokens);
                let saved = crate::simulate::actual_cost(b.pricing, &usage, b.expected_tokens_per_s);
                u.cache_saved = u.cache_saved.saturating_add(saved);
            }
        }
        match models.get(&*r.route) {
            Some(&ModelTarget::Route(i)) => {
                let candidates = &config.routes[i].backends;
                let estimates = plan::estimates(config, candidates, r.prompt_tokens, r.completion_tokens);
                if let Some(baseline) = plan::baseline(config, candidates, &estimates) {
                    let usage = Usage::new(r.prompt_tokens, r.completion_tokens);
                    u.savings = u.savings.saturating_add(baseline.savings(&usage, r.cost));
                }
                u.routed_tokens += tokens;
                let premium = plan::premium(config, candidates).map(|p| config.backends[p].name.as_str());
                if premium == Some(&*r.backend) {
                    u.premium_tokens += tokens;
                }
            }
            _ => u.unrouted += 1,
        }
        if hit {
            continue;
        }
        let b = backends
            .entry(Arc::clone(&r.backend))
            .or_insert_with(|| BackendReport { backend: r.backend.to_string(), ..BackendReport::default() });
        b.requests += 1;
        b.tokens += tokens;
        b.cost = b.cost.saturating_add(r.cost);
        let latency = i64::try_from(r.latency_ms).unwrap_or(i64::MAX);
        intervals.entry(Arc::clone(&r.backend)).or_default().push((r.at_ms, r.at_ms.saturating_add(latency)));
    }
    let now = window.end_ms.div_euclid(1000);
    // Summed once per (account, period) over its backends' rows: looked up per user, not
    // scanned, since a million users each scanning every row took hours.
    let mut spend_of: HashMap<(&str, i64), Usd> = HashMap::with_capacity(spend.len());
    for s in spend {
        let sum = spend_of.entry((s.user.as_str(), s.period_start)).or_insert(Usd::ZERO);
        *sum = sum.saturating_add(s.spent);
    }
    for user in config.users.iter().chain(api_users) {
        let u = users
            .entry(user.name.as_str().into())
            .or_insert_with(|| UserReport { user: user.name.clone(), ..UserReport::default() });
        u.budget = user.budget_usd;
        u.plan = user.plan.as_deref().map(str::to_owned);
        u.team = user.team.as_deref().map(str::to_owned);
        u.price = user.price_usd;
        let start = period::start(user.budget_period, now);
        let spent = spend_of.get(&(user.name.as_str(), start)).copied().unwrap_or(Usd::ZERO);
        u.period_spend = Some(spent);
        u.projected = period::end(user.budget_period, now).and_then(|end| project(spent, start, end, now));
    }
    for backend in &config.backends {
        let b = backends
            .entry(backend.name.as_str().into())
            .or_insert_with(|| BackendReport { backend: backend.name.clone(), ..BackendReport::default() });
        b.tier = Some(backend.tier.clone());
        if let crate::cost::Pricing::PerHour { hourly_usd } = backend.pricing {
            let busy = busy_ms(intervals.remove(backend.name.as_str()).unwrap_or_default(), window);
            let idle = (window.end_ms - window.start_ms - busy).max(0);
            b.busy_ms = Some(busy);
            b.idle_cost = hourly_usd.mul_div(idle, MS_PER_HOUR);
        }
    }
    // Configured users first, in config order; users the config no longer has after them.
    let mut ordered: Vec<UserReport> =
        config.users.iter().filter_map(|user| users.remove(user.name.as_str())).collect();
    ordered.extend(users.into_values());
    let mut backend_list: Vec<BackendReport> =
        config.backends.iter().filter_map(|b| backends.remove(b.name.as_str())).collect();
    backend_list.extend(backends.into_values());
    Report { window, users: ordered, backends: backend_list }
}

/// Linear projection of a period's spend to its end: `spent × period / elapsed`.
pub fn project(spent: Usd, start: i64, end: i64, now: i64) -> Option<Usd> {
    let elapsed = now - start;
    (elapsed > 0 && end > start).then(|| spent.mul_div(end - start, elapsed)).flatten()
}

/// Length of the union of `[start, end]` intervals, clipped to the window.
pub fn busy_ms(mut intervals: Vec<(i64, i64)>, window: Window) -> i64 {
    intervals.sort_unstable();
    let mut busy = 0;
    let mut current: Option<(i64, i64)> = None;
    for (start, end) in intervals {
        let (start, end) = (start.max(window.start_ms), end.min(window.end_ms));
        if end <= start {
            continue;
        }
        current = match current {
            Some((a, b)) if start <= b => Some((a, b.max(end))),
            Some((a, b)) => {
                busy += b - a;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    busy + current.map_or(0, |(a, b)| b - a)
}

/// `30s`, `15m`, `24h`, `7d` as milliseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits.parse().map_err(|_| format!("`{text}`: expected a number and a unit, e.g. 7d or 24h"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => MS_PER_HOUR,
        "d" => 24 * MS_PER_HOUR,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    n.checked_mul(unit_ms).ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests;
