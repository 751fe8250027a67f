//! rpm/tpm limits in Redis: one pair of token buckets per user for all replicas, refilled on
//! Redis's clock by one script, so 60 rpm means 60 per minute across the fleet, not per replica.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::store::{Op, Store, Write, WriteScript};
use crate::config::{OnLedgerError, User};
use crate::cost::Usd;
use crate::ratelimit::{LimitError, RateLimited, RateLimiter};

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

    pub async fn admit(&self, user: &User, tokens: u64, now: Instant) -> Result<(), LimitError> {
        if user.rpm.is_none() && user.tpm.is_none() {
            return Ok(());
        }
        let keys = [self.store.keys.rate(&user.name)];
        let args = [
            user.rpm.map(|r| r.to_string()).unwrap_or_default(),
            user.tpm.map(|t| t.to_string()).unwrap_or_default(),
            tokens.to_string(),
        ];
        let answer = self.store.script::<(i64, String, u64)>(Op::RateLimit, &self.store.scripts.rate, &keys, &args);
        match answer.await {
            Ok((1, _, _)) => Ok(()),
            Ok((_, limit, retry_ms)) => {
                let (limit, capacity) = if limit == "tokens" {
                    ("tokens", user.tpm.unwrap_or(0))
                } else {
                    ("requests", user.rpm.map_or(0, u64::from))
                };
                Err(RateLimited { limit, capacity, retry_after: Duration::from_millis(retry_ms) }.into())
            }
            Err(e) if self.store.policy == OnLedgerError::FailOpen => {
                let _ = e;
                Ok(self.fallback.admit(user, tokens, now)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives back (or takes) the difference between the admission estimate and the real usage.
    pub fn settle_tokens(&self, user: &User, estimated: u64, actual: u64) {
        let Some(tpm) = user.tpm else { return };
        if estimated == actual {
            return;
        }
        self.fallback.settle_tokens(user, estimated, actual);
        let delta = i128::from(estimated) - i128::from(actual);
        self.store.submit(Write {
            script: WriteScript::RateSettle,
            keys: vec![self.store.keys.rate(&user.name)],
            args: vec![tpm.to_string(), delta.to_string()],
            user: user.name.clone(),
            cost: Usd::ZERO,
            must_land: false,
        });
    }
}
