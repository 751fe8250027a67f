//! API users' keys as requests present them: resolved from the store once, then served from
//! memory until something about them changes.
//!
//! - Bounded: past `max_principals` resolved keys, a tenth of them is dropped (the next use of
//!   one costs a store lookup again).
//! - Unknown keys are remembered for [`UNKNOWN_TTL`], so a flood of random keys sends each to
//!   the store once a minute at most, never once per request.
//! - Every admin change drops what it touched; a resolution that raced with a change (it read
//!   the store before the change and would cache what it read after) is not cached, by the
//!   epoch each change bumps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::store::{Change, Directory};
use super::{plan_of, Principal};
use crate::auth::AuthError;
use crate::config::Config;
use crate::metrics::Metrics;

/// How long a key the store does not know is refused without asking the store again. A key
/// created on this replica is known at once; one created on another replica is told by the
/// change feed, which drops the entry.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(60);
/// Resolved keys kept at most by default: about 1 KiB each.
pub const DEFAULT_MAX_PRINCIPALS: usize = 200_000;
/// Unknown keys remembered at most (48 bytes each): a minute of a 10k-keys-per-second flood.
const MAX_UNKNOWN: usize = 1_000_000;

pub struct Tenants {
    pub directory: Arc<dyn Directory>,
    known: DashMap<[u8; 32], Arc<Principal>>,
    unknown: DashMap<[u8; 32], Instant>,
    max_principals: usize,
    /// Bumped by every change: a resolution begun before one is not cached.
    epoch: AtomicU64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").field("known", &self.known.len()).field("unknown", &self.unknown.len()).finish()
    }
}

impl Tenants {
    pub fn new(directory: Arc<dyn Directory>, metrics: Arc<Metrics>, max_principals: usize) -> Self {
        Self {
            directory,
            known: DashMap::new(),
            unknown: DashMap::new(),
            max_principals,
            epoch: AtomicU64::new(0),
            metrics,
        }
    }

    /// The principal of the key whose SHA-256 is `sha256`, at `unix` (seconds) and `now`.
    pub async fn resolve(
        &self,
        config: &Config,
        sha256: [u8; 32],
        unix: i64,
        now: Instant,
    ) -> Result<Arc<Principal>, AuthError> {
        if let Some(principal) = self.known.get(&sha256) {
            self.metrics.principal_cache.with_label_values(&["hit"]).inc();
            return if principal.admits(unix) { Ok(Arc::clone(&principal)) } else { Err(AuthError::Unknown) };
        }
        if self.unknown.get(&sha256).is_some_and(|until| *until > now) {
            self.metrics.principal_cache.with_label_values(&["negative"]).inc();
            return Err(AuthError::Unknown);
        }
        self.metrics.principal_cache.with_label_values(&["miss"]).inc();
        let epoch = self.epoch.load(Ordering::Acquire);
        let store = |e: super::store::StoreError| AuthError::Unavailable(e.to_string());
        let key = self.directory.key_by_hash(&sha256).await.map_err(store)?;
        let Some(key) = key.filter(|k| k.revoked_at.is_none()) else {
            self.remember_unknown(sha256, now);
            return Err(AuthError::Unknown);
        };
        let Some(member) = self.directory.user(&key.user).await.map_err(store)? else {
            self.remember_unknown(sha256, now);
            return Err(AuthError::Unknown);
        };
        let plan = plan_of(config, &member).ok_or_else(|| AuthError::PlanGone(member.plan.clone()))?;
        let team = match &member.team {
            Some(name) => self.directory.team(name).await.map_err(store)?,
            None => None,
        };
        let principal = Arc::new(Principal::of_member(&member, plan, team.as_ref(), &key));
        if !principal.admits(unix) {
            return Err(AuthError::Unknown);
        }
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.make_room();
            self.known.insert(sha256, Arc::clone(&principal));
        }
        Ok(principal)
    }

    fn remember_unknown(&self, sha256: [u8; 32], now: Instant) {
        if self.unknown.len() >= MAX_UNKNOWN {
            self.unknown.retain(|_, until| *until > now);
        }
        if self.unknown.len() < MAX_UNKNOWN {
            self.unknown.insert(sha256, now + UNKNOWN_TTL);
        }
    }

    fn make_room(&self) {
        if self.known.len() < self.max_principals {
            return;
        }
        let drop: Vec<[u8; 32]> =
            self.known.iter().take(self.max_principals / 10 + 1).map(|entry| *entry.key()).collect();
        for sha in drop {
            self.known.remove(&sha);
        }
    }

    fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A key was created, revoked or changed.
    pub fn forget_key(&self, sha256: &[u8; 32]) {
        self.changed();
        self.known.remove(sha256);
        self.unknown.remove(sha256);
    }

    /// A user was changed or deleted: every key of it resolves anew.
    pub fn forget_user(&self, name: &str) {
        self.changed();
        self.known.retain(|_, p| p.user.name != name);
    }

    /// A team was changed: its members' keys resolve anew.
    pub fn forget_team(&self, name: &str) {
        self.changed();
        self.known.retain(|_, p| p.user.team.as_deref() != Some(name));
    }

    /// Plans may have changed (a reload): everything resolves anew.
    pub fn forget_all(&self) {
        self.changed();
        self.known.clear();
    }

    /// Keys used since the last call, with when (for `last_used_at`).
    pub fn take_uses(&self) -> Vec<(String, i64)> {
        let mut used = Vec::new();
        for entry in &self.known {
            if let Some(key) = &entry.value().key {
                let last = key.last_used.load(Ordering::Relaxed);
                if last > key.reported.swap(last, Ordering::Relaxed) {
                    used.push((key.id.to_string(), last));
                }
            }
        }
        used
    }

    /// Resolved keys held now.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// Follows a shared store's change feed: what another replica changed is dropped from this
/// replica's cache within [`super::redis::FEED_EVERY`] of the change.
pub async fn follow_feed(tenants: std::sync::Weak<Tenants>) {
    let mut position: Option<String> = None;
    loop {
        tokio::time::sleep(super::redis::FEED_EVERY).await;
        let Some(tenants) = tenants.upgrade() else { return };
        let Some(feed) = tenants.directory.feed() else { return };
        let Some(at) = position.clone() else {
            // Everything cached so far was read before this position was known.
            if let Ok(now) = feed.position().await {
                tenants.forget_all();
                position = Some(now);
            }
            continue;
        };
        match feed.changes_after(&at).await {
            Ok(Some(read)) => {
                for change in read.changes {
                    match change {
                        Change::Key(sha256) => tenants.forget_key(&sha256),
                        Change::User(name) => tenants.forget_user(&name),
                        Change::Team(name) => tenants.forget_team(&name),
                    }
                }
                position = Some(read.position);
            }
            Ok(None) => {
                tenants.forget_all();
                position = None;
            }
            // Unreadable now: whatever changed meanwhile is read once it answers again. Until
            // then this replica serves what it has cached (revocations included) and refuses
            // what it would have to look up.
            Err(_) => {}
        }
    }
}

/// Writes keys' `last_used_at` every `every`, batched, off the request path.
pub async fn record_uses(tenants: std::sync::Weak<Tenants>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(tenants) = tenants.upgrade() else { return };
        tenants.record_uses().await;
    }
}

impl Tenants {
    /// Writes the keys' uses seen since the last call (also at shutdown).
    pub async fn record_uses(&self) {
        let used = self.take_uses();
        if !used.is_empty() {
            if let Err(e) = self.directory.touch_keys(used).await {
                tracing::warn!(error = %e, "recording keys' last use failed");
            }
        }
    }
}
