//! The policy simulator: a trace replayed through the live decision code on a virtual clock.
//!
//! Each request builds its facts with [`policy::plan`] (the functions live dispatch calls),
//! is decided by [`policy::decide`], clamped by [`policy::plan::clamp`] and reserved and
//! settled in a [`ledger::Account`] that rolls over with [`ledger::period`]. What differs from
//! live traffic is only what a trace cannot know: every backend is healthy with capacity; the
//! cost of an hourly backend is its exclusive-time estimate at `expected_tokens_per_s` (the
//! occupancy sharing of concurrent requests is unknowable from a trace), and a route's
//! confidence cascade never escalates (the answers' confidence is not in the trace).

pub mod plot;
pub mod png;
pub mod render;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{BudgetPeriod, Config, Pricing};
use crate::cost::Usd;
use crate::ledger::{period, Account};
use crate::openai::Usage;
use crate::policy::{self, plan, Refusal};
pub use trace::TraceRecord;

/// One user's replay.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRun {
    pub user: String,
    /// `quality-first`, `cost-first`, `quality-first+paced`.
    pub policy: String,
    pub budget: Option<Usd>,
    pub period: BudgetPeriod,
    /// Requests in the trace for this user.
    pub requests: u64,
    pub served: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Spend over the whole trace (every period).
    pub spent: Usd,
    /// Against the route's most expensive candidate for the same usage.
    pub savings: Usd,
    /// Tokens served by the route's highest-quality backend.
    pub premium_tokens: u64,
    /// Served requests and tokens by backend tier.
    pub tiers: BTreeMap<String, Mix>,
    /// Served requests by routing reason.
    pub reasons: BTreeMap<String, u64>,
    /// Refused requests by error code.
    pub refusals: BTreeMap<&'static str, u64>,
    /// Which requests were refused (indexes into the trace).
    pub refused_requests: Vec<usize>,
    /// Requests served with a budget-clamped `max_tokens`.
    pub clamped: u64,
    /// The first budget refusal (Unix seconds).
    pub exhausted_at: Option<i64>,
    /// After each served request: the spend so far.
    pub spend: Vec<SpendPoint>,
    /// Requests the response cache served (`[cache]` on, repeated `prompt_hash`).
    pub cache_hits: u64,
    /// What those would have cost.
    pub cache_saved: Usd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendPoint {
    /// Unix seconds.
    pub at: i64,
    /// Spend in the budget period holding `at`.
    pub period: Usd,
    /// Spend over the whole trace until `at`.
    pub total: Usd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mix {
    pub requests: u64,
    pub tokens: u64,
}

impl UserRun {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn refused(&self) -> u64 {
        self.refusals.values().sum()
    }
}

/// The replay of a whole trace under one config.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// One per user with traffic in the trace: the config's, in config order, then the API
    /// users of its SQLite ledger the trace names (`tollgate simulate` adds them), by name.
    pub users: Vec<UserRun>,
    /// Requests from users the config does not know.
    pub unknown_users: u64,
    /// The trace's first and last request (Unix seconds).
    pub span: Option<(i64, i64)>,
}

impl Run {
    /// Its users by name: outputs line runs up user by user, and a trace from a ledger of API
    /// users names hundreds of thousands.
    pub fn by_name(&self) -> HashMap<&str, &UserRun> {
        self.users.iter().map(|u| (u.user.as_str(), u)).collect()
    }
}

/// Replays `trace` (sorted by time) under `config`.
pub fn run(config: &Config, trace: &[TraceRecord]) -> Run {
    let (models, _) = crate::snapshot::model_index(config);
    let mut accounts: HashMap<&str, Account> = HashMap::new();
    let names: Vec<Arc<str>> = config.backends.iter().map(|b| Arc::from(b.name.as_str())).collect();
    let mut runs: Vec<Option<UserRun>> = vec![None; config.users.len()];
    let mut unknown_users = 0;
    let user_at: HashMap<&str, usize> = config.users.iter().enumerate().map(|(i, u)| (u.name.as_str(), i)).collect();
    // (scope, model, prompt hash) -> the answer stored: when, from which backend, its cost.
    let mut cache: HashMap<(String, &str, &str), (i64, usize, Usd)> = HashMap::new();
    let cache_ttl_ms = i64::try_from(config.cache.ttl.as_millis()).unwrap_or(i64::MAX);
    for (position, record) in trace.iter().enumerate() {
        let Some(&u) = user_at.get(record.user.as_str()) else {
            unknown_users += 1;
            continue;
        };
        let user = &config.users[u];
        let out = runs[u].get_or_insert_with(|| UserRun::new(config, u));
        out.requests += 1;
        let now = record.at_ms.div_euclid(1000);
        let account =
            accounts.entry(&user.name).or_insert_with(|| Account::new(period::start(user.budget_period, now)));
        account.roll(period::start(user.budget_period, now));
        let Some(&target) = models.get(&record.model) else {
            *out.refusals.entry("model_not_found").or_default() += 1;
            out.refused_requests.push(position);
            continue;
        };
        let hints = plan::Hints { policy: None, min_quality: record.min_quality };
        // As live: after the rate limits, before the budget; a hit needs a backend at least as
        // good as the request's floor.
        let cache_key = record
            .prompt_hash
            .as_deref()
            .filter(|_| config.cache.enabled)
            .map(|hash| (cache_scope(config, user), record.model.as_str(), hash));
        if let Some(&(stored_at, index, cost)) = cache_key.as_ref().and_then(|k| cache.get(k)) {
            let backend = &config.backends[index];
            let fresh = record.at_ms.saturating_sub(stored_at) < cache_ttl_ms;
            if fresh && backend.quality >= plan::min_quality(user, hints) {
                let completion =
                    record.max_tokens.map_or(record.completion_tokens, |m| record.completion_tokens.min(m));
                out.served += 1;
                out.cache_hits += 1;
                out.cache_saved = out.cache_saved.saturating_add(cost);
                out.prompt_tokens += record.prompt_tokens;
                out.completion_tokens += completion;
                let mix = out.tiers.entry(backend.tier.clone()).or_default();
                mix.requests += 1;
                mix.tokens += record.prompt_tokens + completion;
                *out.reasons.entry("cache".into()).or_default() += 1;
                out.spend.push(SpendPoint { at: now, period: account.totals.spent, total: out.spent });
                continue;
            }
        }
        let mut shape =
            plan::Shape { prompt_tokens: record.prompt_tokens, max_tokens: record.max_tokens, embeddings: false };
        let mut clamped = false;
        let served = loop {
            let plan = plan::plan(config, target, shape);
            let candidates = plan::candidates(config, &plan, |_| (true, true));
            let remaining = user.budget_usd.map(|b| account.remaining(b));
            let facts = plan::facts(user, hints, &plan, candidates, remaining, now);
            match policy::decide(&facts) {
                Ok(decision) => break Ok((plan, decision)),
                Err(refusal) => match plan::retry_clamped(config, user, &plan, &facts, &refusal, clamped) {
                    Some(tokens) => {
                        shape.max_tokens = Some(tokens);
                        clamped = true;
                    }
                    None => break Err(refusal),
                },
            }
        };
        let (plan, decision) = match served {
            Ok(served) => served,
            Err(refusal) => {
                if matches!(refusal, Refusal::BudgetExceeded { .. }) {
                    out.exhausted_at.get_or_insert(now);
                }
                *out.refusals.entry(refusal.code()).or_default() += 1;
                out.refused_requests.push(position);
                continue;
            }
        };
        // As live: the first backend in the decided order whose reservation fits.
        let reserved = decision.order.iter().find_map(|&index| {
            let at = plan.candidates.iter().position(|&c| c == index)?;
            let estimate = plan.estimates[at];
            account.reserve(estimate, user.budget_usd).ok().map(|()| (index, estimate))
        });
        let Some((index, estimate)) = reserved else {
            out.exhausted_at.get_or_insert(now);
            *out.refusals.entry("budget_exceeded").or_default() += 1;
            out.refused_requests.push(position);
            continue;
        };
        let backend = &config.backends[index];
        // The backend stops at max_tokens (the request's, or the clamped one).
        let completion = shape.max_tokens.map_or(record.completion_tokens, |m| record.completion_tokens.min(m));
        let usage = Usage::new(record.prompt_tokens, completion);
        let cost = actual_cost(backend.pricing, &usage, backend.expected_tokens_per_s);
        account.settle(estimate, &names[index], cost, usage.prompt_tokens, usage.completion_tokens);

        let tokens = usage.prompt_tokens + usage.completion_tokens;
        out.served += 1;
        out.clamped += u64::from(clamped);
        out.prompt_tokens += usage.prompt_tokens;
        out.completion_tokens += usage.completion_tokens;
        out.spent = out.spent.saturating_add(cost);
        if let Some(baseline) = plan.baseline {
            out.savings = out.savings.saturating_add(baseline.savings(&usage, cost));
        }
        if plan.premium == Some(index) {
            out.premium_tokens += tokens;
        }
        let mix = out.tiers.entry(backend.tier.clone()).or_default();
        mix.requests += 1;
        mix.tokens += tokens;
        *out.reasons.entry(decision.reason.label().into_owned()).or_default() += 1;
        out.spend.push(SpendPoint { at: now, period: account.totals.spent, total: out.spent });
        if let Some(key) = cache_key {
            // An answer cut by a clamped max_tokens is not stored, as live.
            if !clamped {
                let better_kept = cache.get(&key).is_some_and(|&(at, kept, _)| {
                    record.at_ms.saturating_sub(at) < cache_ttl_ms && config.backends[kept].quality > backend.quality
                });
                if !better_kept {
                    cache.insert(key, (record.at_ms, index, cost));
                }
            }
        }
    }
    let span = trace.first().zip(trace.last()).map(|(a, b)| (a.at_ms.div_euclid(1000), b.at_ms.div_euclid(1000)));
    Run { users: runs.into_iter().flatten().collect(), unknown_users, span }
}

/// Whose answers a user may be served, as the live cache keys them.
fn cache_scope(config: &Config, user: &crate::config::User) -> String {
    match (config.cache.scope, &user.team) {
        (crate::config::CacheScope::Global, _) => String::new(),
        (crate::config::CacheScope::Team, Some(team)) => format!("team:{team}"),
        _ => format!("user:{}", user.name),
    }
}

/// What a simulated request costs: per token, its exact price; per hour, the backend's
/// hourly cost for the time the completion takes alone on it.
pub fn actual_cost(pricing: Pricing, usage: &Usage, tokens_per_s: u32) -> Usd {
    match pricing {
        Pricing::PerToken { .. } => pricing.price_tokens(usage),
        Pricing::PerHour { .. } => pricing.estimate(usage.prompt_tokens, usage.completion_tokens, tokens_per_s),
    }
}

impl UserRun {
    fn new(config: &Config, index: usize) -> Self {
        let user = &config.users[index];
        let mut policy = user.policy.as_str().to_owned();
        if user.pacing.is_some() && user.policy == crate::config::Policy::QualityFirst {
            policy.push_str("+paced");
        }
        Self {
            user: user.name.clone(),
            policy,
            budget: user.budget_usd,
            period: user.budget_period,
            requests: 0,
            served: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            spent: Usd::ZERO,
            savings: Usd::ZERO,
            premium_tokens: 0,
            tiers: BTreeMap::new(),
            reasons: BTreeMap::new(),
            refusals: BTreeMap::new(),
            refused_requests: Vec::new(),
            clamped: 0,
            exhausted_at: None,
            spend: Vec::new(),
            cache_hits: 0,
            cache_saved: Usd::ZERO,
        }
    }
}

#[cfg(test)]
mod tests;
