//! Per-user rate limits: requests per minute and tokens per minute, as token buckets that
//! refill continuously (a full minute's allowance may be used in a burst).
//!
//! Tokens are taken at admission from the request's estimate (prompt + max completion) and
//! corrected when it settles, so a user is limited by what requests really use.
//!
//! [`RateLimiter`] keeps the buckets in this process (with the memory and SQLite ledgers);
//! with the Redis ledger they live in Redis, shared by every replica
//! ([`crate::ledger::redis::RedisLimiter`]). [`Limiter`] is whichever the config chose.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::User;

/// One level's rate limits (a key's, a user's): the account its buckets are kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    pub account: Arc<str>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
}

/// A user's own allowance, when it has a limit. Built once per principal (it allocates).
pub fn user_allowance(user: &User) -> Option<Allowance> {
    (user.rpm.is_some() || user.tpm.is_some()).then(|| Allowance {
        account: user.name.as_str().into(),
        rpm: user.rpm,
        tpm: user.tpm,
    })
}

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
    /// Admits one request of about `tokens` tokens, or says which limit refuses it. `root` is
    /// the request's chain root (its budgets' [`root`](crate::ledger::Budgets::root)): a
    /// Redis Cluster keeps every level's buckets in its slot.
    pub async fn admit(&self, levels: &[Allowance], root: &str, tokens: u64, now: Instant) -> Result<(), LimitError> {
        if levels.is_empty() {
            return Ok(());
        }
        match self {
            Self::Local(limiter) => Ok(limiter.admit(levels, tokens, now)?),
            Self::Redis(limiter) => limiter.admit(levels, root, tokens, now).await,
        }
    }

    /// The shared store the limiter keeps its buckets in (the ledger's Redis), if any.
    pub fn shared_store(&self) -> Option<&std::sync::Arc<crate::ledger::redis::Store>> {
        match self {
            Self::Local(_) => None,
            Self::Redis(limiter) => Some(limiter.store()),
        }
    }

    /// Corrects the token buckets once the real usage is known; never waits.
    pub fn settle_tokens(&self, levels: &[Allowance], root: &str, estimated: u64, actual: u64) {
        match self {
            Self::Local(limiter) => limiter.settle_tokens(levels, estimated, actual),
            Self::Redis(limiter) => limiter.settle_tokens(levels, root, estimated, actual),
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
    accounts: DashMap<Arc<str>, Buckets>,
}

#[expect(clippy::cast_precision_loss, reason = "rate limits are far below 2^53")]
fn units(n: u64) -> f64 {
    n as f64
}

impl RateLimiter {
    /// Admits one request of about `tokens` tokens at every level, or says which limit
    /// refuses it; a refused request takes nothing from any level.
    pub fn admit(&self, levels: &[Allowance], tokens: u64, now: Instant) -> Result<(), RateLimited> {
        for (i, level) in levels.iter().enumerate() {
            if let Err(refused) = self.admit_one(level, tokens, now) {
                // Give back what the levels before it took.
                for taken in &levels[..i] {
                    self.give_back(taken, tokens);
                }
                return Err(refused);
            }
        }
        Ok(())
    }

    fn admit_one(&self, level: &Allowance, tokens: u64, now: Instant) -> Result<(), RateLimited> {
        let mut buckets = match self.accounts.get_mut(&*level.account) {
            Some(buckets) => buckets,
            None => self.accounts.entry(Arc::clone(&level.account)).or_default(),
        };
        let buckets = &mut *buckets;
        let requests = level.rpm.map(|rpm| {
            let bucket = buckets.requests.get_or_insert_with(|| Bucket::new(f64::from(rpm), now));
            bucket.refill(f64::from(rpm), now);
            (bucket, u64::from(rpm), 1.0)
        });
        let tokens = level.tpm.map(|tpm| {
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

    fn give_back(&self, level: &Allowance, tokens: u64) {
        if let Some(mut buckets) = self.accounts.get_mut(&*level.account) {
            if let Some(bucket) = &mut buckets.requests {
                bucket.level = (bucket.level + 1.0).min(bucket.capacity);
            }
            if let (Some(bucket), Some(tpm)) = (&mut buckets.tokens, level.tpm) {
                bucket.level = (bucket.level + units(tokens).min(units(tpm))).min(bucket.capacity);
            }
        }
    }

    /// Corrects the token buckets once the real usage is known.
    pub fn settle_tokens(&self, levels: &[Allowance], estimated: u64, actual: u64) {
        if estimated == actual {
            return;
        }
        for level in levels.iter().filter(|l| l.tpm.is_some()) {
            if let Some(mut buckets) = self.accounts.get_mut(&*level.account) {
                if let Some(bucket) = &mut buckets.tokens {
                    bucket.level = (bucket.level + units(estimated) - units(actual)).min(bucket.capacity);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(rpm: Option<u32>, tpm: Option<u64>) -> [Allowance; 1] {
        [Allowance { account: "u".into(), rpm, tpm }]
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
    fn a_key_level_refusal_gives_back_nothing_taken_and_a_user_level_one_gives_back_the_keys() {
        let limiter = RateLimiter::default();
        let key = Allowance { account: "~key:k".into(), rpm: Some(2), tpm: None };
        let user = Allowance { account: "u".into(), rpm: Some(1), tpm: None };
        let t0 = Instant::now();
        limiter.admit(&[key.clone(), user.clone()], 1, t0).unwrap();
        // The user's single request per minute is spent: the key keeps its second one.
        assert_eq!(limiter.admit(&[key.clone(), user], 1, t0).unwrap_err().limit, "requests");
        limiter.admit(std::slice::from_ref(&key), 1, t0).unwrap();
        assert!(limiter.admit(&[key], 1, t0).is_err());
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
