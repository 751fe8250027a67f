//! rpm/tpm limits in Redis: one pair of token buckets per user for all replicas, refilled on
//! Redis's clock by one script, so 60 rpm means 60 per minute across the fleet, not per replica.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Op, Store, Write, WriteScript};
use crate::config::OnLedgerError;
use crate::cost::Usd;
use crate::ratelimit::{Allowance, LimitError, RateLimited, RateLimiter};

#[derive(Debug)]
pub struct RedisLimiter {
    store: Arc<Store>,
    /// Fail-open while Redis is away: this replica's own buckets (limits then hold per
    /// replica, not across them).
    fallback: RateLimiter,
}

impl RedisLimiter {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store, fallback: RateLimiter::default() }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub async fn admit(&self, levels: &[Allowance], root: &str, tokens: u64, now: Instant) -> Result<(), LimitError> {
        let keys: Vec<String> = levels.iter().map(|l| self.rate_key(root, l)).collect();
        let mut args = vec![tokens.to_string()];
        for level in levels {
            args.push(level.rpm.map(|r| r.to_string()).unwrap_or_default());
            args.push(level.tpm.map(|t| t.to_string()).unwrap_or_default());
        }
        let answer =
            self.store.script::<(i64, String, u64, usize)>(Op::RateLimit, &self.store.scripts.rate, &keys, &args);
        match answer.await {
            Ok((1, _, _, _)) => Ok(()),
            Ok((_, limit, retry_ms, level)) => {
                let level = levels.get(level.saturating_sub(1));
                let (limit, capacity) = if limit == "tokens" {
                    ("tokens", level.and_then(|l| l.tpm).unwrap_or(0))
                } else {
                    ("requests", level.and_then(|l| l.rpm).map_or(0, u64::from))
                };
                Err(RateLimited { limit, capacity, retry_after: Duration::from_millis(retry_ms) }.into())
            }
            Err(e) if self.store.policy == OnLedgerError::FailOpen => {
                let _ = e;
                Ok(self.fallback.admit(levels, tokens, now)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives back (or takes) the difference between the admission estimate and the real usage.
    /// A level's buckets: under its own account's tag on one Redis, the root's on a Cluster.
    fn rate_key(&self, root: &str, level: &Allowance) -> String {
        let slot = if self.store.is_cluster() { root } else { &level.account };
        self.store.keys.rate(slot, &level.account)
    }

    pub fn settle_tokens(&self, levels: &[Allowance], root: &str, estimated: u64, actual: u64) {
        if estimated == actual {
            return;
        }
        self.fallback.settle_tokens(levels, estimated, actual);
        let delta = i128::from(estimated) - i128::from(actual);
        for level in levels {
            let Some(tpm) = level.tpm else { continue };
            self.store.submit(Write {
                script: WriteScript::RateSettle,
                keys: vec![self.rate_key(root, level)],
                args: vec![tpm.to_string(), delta.to_string()],
                accounts: Vec::new(),
                cost: Usd::ZERO,
                must_land: false,
                replayed: false,
                then: Vec::new(),
            });
        }
    }
}
