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

use smallvec::SmallVec;

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

/// The report over `records` (those within `window`, in arrival order), with the current
/// period spend `spend`, for the config's users and `api_users` (the API users' effective
/// limits).
pub fn build(
    config: &Config,
    api_users: &[Arc<User>],
    records: &[RequestRecord],
    spend: &[PeriodSpend],
    window: Window,
) -> Report {
    let mut report = Builder::new(config, window);
    for record in records {
        report.add(record);
    }
    report.spend(spend.iter().cloned());
    for user in api_users {
        report.user(user);
    }
    report.finish()
}

/// A report built a piece at a time: the records, then the periods' spend, then the API users.
/// What it keeps grows with users and backends, not with records (a ledger keeps 30 days of
/// them by default, hundreds of millions on a busy gateway), and users are not kept twice, so
/// the CLI streams both from the file.
pub struct Builder<'a> {
    config: &'a Config,
    models: HashMap<String, ModelTarget>,
    window: Window,
    // Keyed by the records' shared names: a record costs no key copy.
    users: BTreeMap<Arc<str>, UserReport>,
    backends: BTreeMap<Arc<str>, BackendReport>,
    busy: BTreeMap<Arc<str>, Busy>,
    /// Per (account, period), summed over its backends' rows: looked up per user, not scanned,
    /// since a million users each scanning every row took hours.
    spend_of: HashMap<String, SmallVec<[(i64, Usd); 2]>>,
}

impl<'a> Builder<'a> {
    pub fn new(config: &'a Config, window: Window) -> Self {
        let (models, _) = crate::snapshot::model_index(config);
        Self {
            config,
            models,
            window,
            users: BTreeMap::new(),
            backends: BTreeMap::new(),
            busy: BTreeMap::new(),
            spend_of: HashMap::new(),
        }
    }

    /// Counts `r` if it is within the window. Records come in arrival order (`at_ms`), as the
    /// ledger reads them: what keeps busy time exact without keeping every interval.
    pub fn add(&mut self, r: &RequestRecord) {
        let (config, window) = (self.config, self.window);
        if r.at_ms < window.start_ms || r.at_ms > window.end_ms {
            return;
        }
        let tokens = r.prompt_tokens + r.completion_tokens;
        let u = self
            .users
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
        match self.models.get(&*r.route) {
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
            return;
        }
        let b = self
            .backends
            .entry(Arc::clone(&r.backend))
            .or_insert_with(|| BackendReport { backend: r.backend.to_string(), ..BackendReport::default() });
        b.requests += 1;
        b.tokens += tokens;
        b.cost = b.cost.saturating_add(r.cost);
        let end = r.at_ms.saturating_add(i64::try_from(r.latency_ms).unwrap_or(i64::MAX));
        self.busy.entry(Arc::clone(&r.backend)).or_default().add(r.at_ms, end, window);
    }

    /// The current periods' spend, for the users' period spend and margin.
    pub fn spend(&mut self, rows: impl IntoIterator<Item = PeriodSpend>) {
        for row in rows {
            let periods = self.spend_of.entry(row.user).or_default();
            match periods.iter_mut().find(|(start, _)| *start == row.period_start) {
                Some((_, sum)) => *sum = sum.saturating_add(row.spent),
                None => periods.push((row.period_start, row.spent)),
            }
        }
    }

    /// A user with its limits (an API user's effective ones), whether or not it has records.
    pub fn user(&mut self, user: &User) {
        let now = self.window.end_ms.div_euclid(1000);
        // Looked up before it is added: a million API users' names are not copied to be found.
        let u = match self.users.get_mut(user.name.as_str()) {
            Some(u) => u,
            None => self
                .users
                .entry(user.name.as_str().into())
                .or_insert_with(|| UserReport { user: user.name.clone(), ..UserReport::default() }),
        };
        u.budget = user.budget_usd;
        u.plan = user.plan.as_deref().map(str::to_owned);
        u.team = user.team.as_deref().map(str::to_owned);
        u.price = user.price_usd;
        let start = period::start(user.budget_period, now);
        let spent = self
            .spend_of
            .get(user.name.as_str())
            .and_then(|periods| periods.iter().find(|(period_start, _)| *period_start == start))
            .map_or(Usd::ZERO, |&(_, sum)| sum);
        u.period_spend = Some(spent);
        u.projected = period::end(user.budget_period, now).and_then(|end| project(spent, start, end, now));
    }

    /// The report: the config's users first, in config order, then everyone else by name.
    pub fn finish(mut self) -> Report {
        let (config, window) = (self.config, self.window);
        for user in &config.users {
            self.user(user);
        }
        let mut users = std::mem::take(&mut self.users);
        let mut backends = std::mem::take(&mut self.backends);
        for backend in &config.backends {
            let b = backends
                .entry(backend.name.as_str().into())
                .or_insert_with(|| BackendReport { backend: backend.name.clone(), ..BackendReport::default() });
            b.tier = Some(backend.tier.clone());
            if let crate::cost::Pricing::PerHour { hourly_usd } = backend.pricing {
                let busy = self.busy.remove(backend.name.as_str()).map_or(0, Busy::total);
                let idle = (window.end_ms - window.start_ms - busy).max(0);
                b.busy_ms = Some(busy);
                b.idle_cost = hourly_usd.mul_div(idle, MS_PER_HOUR);
            }
        }
        let mut ordered: Vec<UserReport> =
            config.users.iter().filter_map(|user| users.remove(user.name.as_str())).collect();
        ordered.extend(users.into_values());
        let mut backend_list: Vec<BackendReport> =
            config.backends.iter().filter_map(|b| backends.remove(b.name.as_str())).collect();
        backend_list.extend(backends.into_values());
        Report { window, users: ordered, backends: backend_list }
    }
}

/// The length of a union of `[start, end]` intervals clipped to a window, taken in order of
/// their starts: the span being extended, and the length of those closed before it.
#[derive(Debug, Default)]
pub struct Busy {
    closed: i64,
    current: Option<(i64, i64)>,
}

impl Busy {
    /// Adds `[start, end]`; `start` is not before any interval added before.
    pub fn add(&mut self, start: i64, end: i64, window: Window) {
        let (start, end) = (start.max(window.start_ms), end.min(window.end_ms));
        if end <= start {
            return;
        }
        self.current = match self.current {
            Some((a, b)) if start <= b => Some((a, b.max(end))),
            Some((a, b)) => {
                self.closed += b - a;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }

    pub fn total(self) -> i64 {
        self.closed + self.current.map_or(0, |(a, b)| b - a)
    }
}

/// Linear projection of a period's spend to its end: `spent × period / elapsed`.
pub fn project(spent: Usd, start: i64, end: i64, now: i64) -> Option<Usd> {
    let elapsed = now - start;
    (elapsed > 0 && end > start).then(|| spent.mul_div(end - start, elapsed)).flatten()
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
