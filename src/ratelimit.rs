//! Per-user rate limits: requests per minute and tokens per minute, as token buckets that
//! refill continuously (a full minute's allowance may be used in a burst).
//!
//! Tokens are taken at admission from the request's estimate (prompt + max completion) and
//! corrected when it settles, so a user is limited by what requests really use.
//!
//! [`RateLimiter`] keeps the buckets in this process (with the memory and SQLite ledgers);
//! with the Redis ledger they live in Redis, shared by every replica
//! ([`crate::ledger::redis::RedisLimiter`]). [`Limiter`] is whichever the config chose.

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::User;

/// A bucket of `capacity` units refilling at `capacity` per minute.
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, now: Instant) -> Self {
        Self { capacity, level: capacity, last: now }
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.capacity = capacity;
        self.level = (self.level + elapsed * capacity / 60.0).min(capacity);
        self.last = now;
    }

    /// How long until `amount` is available, if it is not now.
    fn wait_for(&self, amount: f64) -> Option<Duration> {
        (self.level < amount).then(|| Duration::from_secs_f64((amount - self.level) * 60.0 / self.capacity))
    }
}

/// Which limit refused a request, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded: {limit} of {capacity} per minute")]
pub struct RateLimited {
    pub limit: &'static str,
    pub capacity: u64,
    pub retry_after: Duration,
}

/// Why a request was not admitted: a limit, or a shared store that could not say.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(transparent)]
    Limited(#[from] RateLimited),
    #[error(transparent)]
    Unavailable(#[from] crate::ledger::LedgerError),
}

/// The rate limiter that goes with the ledger.
#[derive(Debug)]
pub enum Limiter {
    Local(RateLimiter),
    Redis(crate::ledger::redis::RedisLimiter),
}

impl Limiter {
    /// Admits one request of about `tokens` tokens, or says which limit refuses it.
    pub async fn admit(&self, user: &User, tokens: u64, now: Instant) -> Result<(), LimitError> {
        match self {
            Self::Local(limiter) => Ok(limiter.admit(user, tokens, now)?),
            Self::Redis(limiter) => limiter.admit(user, tokens, now).await,
        }
    }

    /// Corrects the token bucket once the real usage is known; never waits.
    pub fn settle_tokens(&self, user: &User, estimated: u64, actual: u64) {
        match self {
            Self::Local(limiter) => limiter.settle_tokens(user, estimated, actual),
            Self::Redis(limiter) => limiter.settle_tokens(user, estimated, actual),
        }
    }
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    users: DashMap<String, Buckets>,
}

#[expect(clippy::cast_precision_loss, reason = "rate limits are far below 2^53")]
fn units(n: u64) -> f64 {
    n as f64
}

impl RateLimiter {
    /// Admits one request of about `tokens` tokens, or says which limit refuses it.
    pub fn admit(&self, user: &User, tokens: u64, now: Instant) -> Result<(), RateLimited> {
        if user.rpm.is_none() && user.tpm.is_none() {
            return Ok(());
        }
        let mut buckets = self.users.entry(user.name.clone()).or_default();
        let buckets = &mut *buckets;
        let requests = user.rpm.map(|rpm| {
            let bucket = buckets.requests.get_or_insert_with(|| Bucket::new(f64::from(rpm), now));
            bucket.refill(f64::from(rpm), now);
            (bucket, u64::from(rpm), 1.0)
        });
        let tokens = user.tpm.map(|tpm| {
            let bucket = buckets.tokens.get_or_insert_with(|| Bucket::new(units(tpm), now));
            bucket.refill(units(tpm), now);
            // A request bigger than the whole allowance waits for a full bucket, not forever.
            (bucket, tpm, units(tokens).min(units(tpm)))
        });
        for (limit, entry) in [("requests", &requests), ("tokens", &tokens)] {
            if let Some((bucket, capacity, amount)) = entry {
                if let Some(retry_after) = bucket.wait_for(*amount) {
                    return Err(RateLimited { limit, capacity: *capacity, retry_after });
                }
            }
        }
        for (bucket, _, amount) in requests.into_iter().chain(tokens) {
            bucket.level -= amount;
        }
        Ok(())
    }

    /// Corrects the token bucket once the real usage is known.
    pub fn settle_tokens(&self, user: &User, estimated: u64, actual: u64) {
        if user.tpm.is_none() || estimated == actual {
            return;
        }
        if let Some(mut buckets) = self.users.get_mut(&user.name) {
            if let Some(bucket) = &mut buckets.tokens {
                bucket.level = (bucket.level + units(estimated) - units(actual)).min(bucket.capacity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BudgetPeriod, Policy};

    fn user(rpm: Option<u32>, tpm: Option<u64>) -> User {
        User {
            name: "u".into(),
            key_sha256: [0; 32],
            policy: Policy::CostFirst,
            budget_usd: None,
            budget_period: BudgetPeriod::Day,
            max_request_usd: None,
            min_quality: 0.0,
            rpm,
            tpm,
            pacing: None,
            clamp_max_tokens: false,
        }
    }

    #[test]
    fn rpm_allows_a_minute_of_requests_then_refuses_until_refilled() {
        let limiter = RateLimiter::default();
        let u = user(Some(60), None);
        let t0 = Instant::now();
        for _ in 0..60 {
            limiter.admit(&u, 10, t0).unwrap();
        }
        let refused = limiter.admit(&u, 10, t0).unwrap_err();
        assert_eq!(refused.limit, "requests");
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        limiter.admit(&u, 10, t0 + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn tpm_counts_estimates_and_is_corrected_by_actual_usage() {
        let limiter = RateLimiter::default();
        let u = user(None, Some(1000));
        let t0 = Instant::now();
        limiter.admit(&u, 800, t0).unwrap();
        assert_eq!(limiter.admit(&u, 300, t0).unwrap_err().limit, "tokens");
        limiter.settle_tokens(&u, 800, 100);
        limiter.admit(&u, 300, t0).unwrap();
    }

    #[test]
    fn a_refused_request_takes_nothing_from_the_other_limit() {
        let limiter = RateLimiter::default();
        let u = user(Some(100), Some(100));
        let t0 = Instant::now();
        assert!(limiter.admit(&u, 150, t0).is_ok(), "clamped to the whole allowance");
        assert!(limiter.admit(&u, 1, t0).is_err());
        let later = t0 + Duration::from_secs(60);
        limiter.admit(&u, 100, later).unwrap();
    }
}
