//! API users' keys as requests present them: resolved from the store once, then served from
//! memory until something about them changes.
//!
//! - Bounded: past `max_principals` resolved keys, a tenth of them is dropped (the next use of
//!   one costs a store lookup again).
//! - Unknown keys are remembered for [`UNKNOWN_TTL`], so a flood of random keys sends each to
//!   the store once a minute at most, never once per request. They share the map of resolved
//!   keys, so a request with either kind costs one look-up.
//! - Every admin change drops what it touched; a resolution that raced with a change (it read
//!   the store before the change and would cache what it read after) is not cached, by the
//!   epoch each change bumps.

use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
// Seeded per process: `unknown` holds whatever digests a client sends, so its hashing must not
// be predictable; SipHash (the default) cost ~20 ns per look-up of a 32-byte digest.
use foldhash::fast::RandomState;
use tokio::time::Instant;

use super::model::ApiKey;
use super::store::{Change, Directory, KeyChain, StoreResult};
use super::Principal;
use crate::auth::AuthError;
use crate::config::Config;
use crate::metrics::Metrics;
use prometheus::IntCounter;

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
    /// Resolved and unknown keys (and end users), by SHA-256.
    keys: DashMap<[u8; 32], Cached, RandomState>,
    /// How many of `keys` are [`Cached::Unknown`]: each kind has its own bound. Signed: an
    /// insertion and a removal of one entry may count in either order.
    unknown_count: AtomicIsize,
    max_principals: usize,
    /// Bumped by every change: a resolution begun before one is not cached.
    epoch: AtomicU64,
    /// `tollgate_principal_cache_total`'s series, found once: every request counts in one.
    counted: Lookups,
}

/// What the cache holds for a key's digest.
enum Cached {
    Known(Arc<Principal>),
    /// Not in the store when last asked; not asked again before this.
    Unknown(Instant),
}

struct Lookups {
    hit: IntCounter,
    miss: IntCounter,
    negative: IntCounter,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants").field("known", &self.known_count()).field("unknown", &self.unknowns()).finish()
    }
}

impl Tenants {
    pub fn new(directory: Arc<dyn Directory>, metrics: Arc<Metrics>, max_principals: usize) -> Self {
        Self {
            directory,
            keys: DashMap::with_hasher(RandomState::default()),
            unknown_count: AtomicIsize::new(0),
            max_principals,
            epoch: AtomicU64::new(0),
            counted: Lookups {
                hit: metrics.principal_cache.with_label_values(&["hit"]),
                miss: metrics.principal_cache.with_label_values(&["miss"]),
                negative: metrics.principal_cache.with_label_values(&["negative"]),
            },
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
        if let Some(cached) = self.keys.get(&sha256) {
            match &*cached {
                Cached::Known(principal) => return self.cached_hit(principal, unix),
                Cached::Unknown(until) if *until > now => {
                    self.counted.negative.inc();
                    return Err(AuthError::Unknown);
                }
                // Remembered long enough: the store is asked again.
                Cached::Unknown(_) => {}
            }
        }
        self.counted.miss.inc();
        let epoch = self.epoch.load(Ordering::Acquire);
        let chain = self.directory.key_chain(&sha256).await.map_err(unavailable)?;
        let Some(KeyChain { key, user: Some(member), team }) = chain.filter(|c| c.key.revoked_at.is_none()) else {
            self.remember_unknown(sha256, now, epoch);
            return Err(AuthError::Unknown);
        };
        let plan = config.plan(&member.plan).ok_or_else(|| AuthError::PlanGone(member.plan.clone()))?;
        let principal = Arc::new(Principal::of_member(&member, plan, team.as_ref(), &key));
        if !principal.admits(unix) {
            return Err(AuthError::Unknown);
        }
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.cache_principal(sha256, Arc::clone(&principal));
        }
        Ok(principal)
    }

    fn known_count(&self) -> usize {
        self.keys.len().saturating_sub(self.unknowns())
    }

    fn unknowns(&self) -> usize {
        usize::try_from(self.unknown_count.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// A cached principal's answer to a request at `unix` (its key may have expired since).
    fn cached_hit(&self, principal: &Arc<Principal>, unix: i64) -> Result<Arc<Principal>, AuthError> {
        self.counted.hit.inc();
        if principal.admits(unix) {
            Ok(Arc::clone(principal))
        } else {
            Err(AuthError::Unknown)
        }
    }

    /// Caches `principal` for `sha256` (making room first), in place of what was there: an
    /// unknown entry it replaces leaves the unknown count.
    fn cache_principal(&self, sha256: [u8; 32], principal: Arc<Principal>) {
        self.make_room();
        if let Some(Cached::Unknown(_)) = self.keys.insert(sha256, Cached::Known(principal)) {
            self.unknown_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Keeps the entries `keep` says yes to.
    fn retain(&self, mut keep: impl FnMut(&[u8; 32], &Cached) -> bool) {
        let mut dropped_unknown = 0;
        self.keys.retain(|sha256, entry| {
            let kept = keep(sha256, entry);
            if !kept && matches!(entry, Cached::Unknown(_)) {
                dropped_unknown += 1;
            }
            kept
        });
        self.unknown_count.fetch_sub(dropped_unknown, Ordering::Relaxed);
    }

    /// Remembers a key the store does not know, unless something changed since the lookup
    /// began (the key may have been created meanwhile).
    fn remember_unknown(&self, sha256: [u8; 32], now: Instant, epoch: u64) {
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if self.unknowns() >= MAX_UNKNOWN {
            self.retain(|_, entry| !matches!(entry, Cached::Unknown(until) if *until <= now));
        }
        if self.unknowns() >= MAX_UNKNOWN {
            return;
        }
        let until = Cached::Unknown(now + UNKNOWN_TTL);
        match self.keys.entry(sha256) {
            // A key resolved meanwhile stays resolved.
            Entry::Occupied(entry) if matches!(entry.get(), Cached::Known(_)) => {}
            Entry::Occupied(mut entry) => {
                entry.insert(until);
            }
            Entry::Vacant(entry) => {
                entry.insert(until);
                self.unknown_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn make_room(&self) {
        if self.known_count() < self.max_principals {
            return;
        }
        let drop: Vec<[u8; 32]> = self
            .keys
            .iter()
            .filter(|entry| matches!(entry.value(), Cached::Known(_)))
            .take(self.max_principals / 10 + 1)
            .map(|entry| *entry.key())
            .collect();
        for sha in drop {
            self.keys.remove_if(&sha, |_, entry| matches!(entry, Cached::Known(_)));
        }
    }

    fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A key was created: it is no longer unknown.
    pub fn forget_unknown(&self, sha256: &[u8; 32]) {
        self.changed();
        if self.keys.remove_if(sha256, |_, entry| matches!(entry, Cached::Unknown(_))).is_some() {
            self.unknown_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A key was revoked or changed: it, and its end users, resolve anew.
    pub fn forget_key(&self, sha256: &[u8; 32]) {
        self.changed();
        self.retain(|digest, entry| match entry {
            Cached::Known(p) => p.key.as_ref().is_none_or(|k| k.sha256 != *sha256),
            Cached::Unknown(_) => digest != sha256,
        });
    }

    /// A user was changed or deleted: every key of it, and its end users, resolve anew.
    pub fn forget_user(&self, name: &str) {
        self.changed();
        self.retain_principals(|p| p.user.name != name && p.service.as_deref() != Some(name));
    }

    /// A team was changed: its members' keys resolve anew.
    pub fn forget_team(&self, name: &str) {
        self.changed();
        self.retain_principals(|p| p.user.team.as_deref() != Some(name));
    }

    /// Plans may have changed (a reload): everything resolves anew.
    pub fn forget_all(&self) {
        self.changed();
        self.retain_principals(|_| false);
    }

    /// Keeps the resolved keys `keep` says yes to, and every unknown one.
    fn retain_principals(&self, keep: impl Fn(&Principal) -> bool) {
        self.retain(|_, entry| match entry {
            Cached::Known(principal) => keep(principal),
            Cached::Unknown(_) => true,
        });
    }

    /// Keys whose last use is at least `newer_by` seconds past the one last written (any newer
    /// one for 0), with when (for `last_used_at`).
    pub fn take_uses(&self, newer_by: i64) -> Vec<(String, i64)> {
        let mut used = Vec::new();
        for entry in &self.keys {
            let Cached::Known(principal) = entry.value() else { continue };
            if let Some(key) = &principal.key {
                let last = principal.last_use();
                let reported = key.reported.load(Ordering::Relaxed);
                let due = last > reported && last - reported >= newer_by;
                if due && key.reported.compare_exchange(reported, last, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                    used.push((key.id.to_string(), last));
                }
            }
        }
        used
    }

    /// `user`'s keys as the store has them, each with this replica's last use when newer: the
    /// store's `last_used_at` is written in batches, up to [`USE_WRITTEN_EVERY_S`] behind.
    pub async fn keys_of(&self, user: &str) -> StoreResult<Vec<ApiKey>> {
        let mut keys = self.directory.keys_of(user).await?;
        for key in &mut keys {
            if let Some(seen) = self.last_used(&key.sha256) {
                key.last_used_at = key.last_used_at.max(Some(seen));
            }
        }
        Ok(keys)
    }

    /// When this replica last saw the key whose SHA-256 is `sha256` used, if it has it cached.
    fn last_used(&self, sha256: &[u8; 32]) -> Option<i64> {
        let cached = self.keys.get(sha256)?;
        let Cached::Known(principal) = &*cached else { return None };
        principal.key.is_some().then(|| principal.last_use()).filter(|&at| at > 0)
    }

    /// The principal of end user `id` of `service` (a principal whose key names an end users'
    /// plan), created in the store on first sight.
    pub async fn end_user(
        &self,
        config: &Config,
        service: &Principal,
        id: &str,
        unix: i64,
    ) -> Result<Arc<Principal>, AuthError> {
        let Some(key) = &service.key else { return Err(AuthError::Unknown) };
        let Some(plan_name) = &key.end_users else { return Err(AuthError::Unknown) };
        let cache_key = end_user_cache_key(&key.sha256, id);
        if let Some(cached) = self.keys.get(&cache_key) {
            if let Cached::Known(principal) = &*cached {
                return self.cached_hit(principal, unix);
            }
        }
        self.counted.miss.inc();
        let epoch = self.epoch.load(Ordering::Acquire);
        let store = unavailable;
        let name = super::model::end_user_name(&service.user.name, id);
        let member = match self.directory.user(&name).await.map_err(store)? {
            Some(member) => member,
            None => {
                let member = super::model::Member {
                    name: name.clone(),
                    plan: plan_name.to_string(),
                    team: None,
                    overrides: crate::config::LimitOverrides::default(),
                    metrics: false,
                    created_at: unix,
                };
                match self.directory.insert_user(member.clone()).await {
                    // Another request (or replica) created it first: the same user.
                    Ok(()) | Err(super::store::StoreError::Conflict(_)) => member,
                    Err(e) => return Err(store(e)),
                }
            }
        };
        let plan = config.plan(&member.plan).ok_or_else(|| AuthError::PlanGone(member.plan.clone()))?;
        let principal = Arc::new(Principal::of_end_user(&member, plan, service));
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.cache_principal(cache_key, Arc::clone(&principal));
        }
        Ok(principal)
    }
}

/// A store failure while resolving a key: logged here, answered as a bare 503.
fn unavailable(e: super::store::StoreError) -> AuthError {
    tracing::warn!(error = %e, "the tenant store could not resolve a key");
    AuthError::Unavailable(e.to_string())
}

/// Where an end user's principal is cached: a hash of its service key's hash and its id, in
/// the same map as keys (so one bound covers both).
fn end_user_cache_key(key_sha256: &[u8; 32], id: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"end-user\0");
    hasher.update(key_sha256);
    hasher.update(id.as_bytes());
    hasher.finalize().into()
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
                        Change::NewKey(sha256) => tenants.forget_unknown(&sha256),
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

/// How much newer than the written one a key's last use must be to be written again: a key in
/// constant use costs the store one write a minute, not one per batch (10,000 busy keys were
/// 10,000 updates every 10 s, each dirtying a page of the keys table). `last_used_at` answers
/// add this replica's newer uses; a clean stop writes them all.
pub const USE_WRITTEN_EVERY_S: i64 = 60;

/// Writes keys' `last_used_at` every `every`, batched, off the request path.
pub async fn record_uses(tenants: std::sync::Weak<Tenants>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(tenants) = tenants.upgrade() else { return };
        tenants.record_uses(USE_WRITTEN_EVERY_S).await;
    }
}

impl Tenants {
    /// Writes the keys' uses at least `newer_by` seconds past the ones written (every use not
    /// yet written for 0: at shutdown).
    pub async fn record_uses(&self, newer_by: i64) {
        let used = self.take_uses(newer_by);
        if used.is_empty() {
            return;
        }
        if let Err(e) = self.directory.touch_keys(used).await {
            tracing::warn!(error = %e, "recording keys' last use failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{BudgetPeriod, Limits, Plan};
    use crate::cost::Usd;
    use crate::tenancy::model::Member;
    use crate::tenancy::store::MemoryDirectory;

    fn ann_member() -> Member {
        Member {
            name: "ann".into(),
            plan: "pro".into(),
            team: None,
            overrides: Default::default(),
            metrics: false,
            created_at: 0,
        }
    }

    fn ann_key() -> ApiKey {
        ApiKey {
            id: "key_1".into(),
            user: "ann".into(),
            sha256: [1; 32],
            prefix: "tg-1".into(),
            label: None,
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            budget_usd: None,
            budget_period: BudgetPeriod::Total,
            rpm: None,
            lineage: "key_1".into(),
            end_users: None,
        }
    }

    fn principal_with_key() -> Principal {
        let plan = Plan { name: "pro".into(), price_usd: Usd::ZERO, limits: Limits::default() };
        Principal::of_member(&ann_member(), &plan, None, &ann_key())
    }

    fn lookups(metrics: &Metrics) -> [u64; 3] {
        ["hit", "miss", "negative"].map(|result| metrics.principal_cache.with_label_values(&[result]).get())
    }

    /// Resolved and unknown keys share one map: what each kind of change drops, when the store
    /// is asked again, and the two kinds' counts.
    #[tokio::test]
    async fn unknown_keys_are_asked_once_a_minute_and_every_change_drops_what_it_touched() {
        let env = |_: &str| None;
        let text = format!("{}\n[[plans]]\nname = \"pro\"\nprice_usd = 1.0\n", crate::config::EMBEDDED_DEFAULT);
        let config = Config::parse(&text, "test.toml", &env).unwrap();
        let directory = Arc::new(MemoryDirectory::default());
        let metrics = Arc::new(Metrics::new().unwrap());
        let tenants = Tenants::new(Arc::clone(&directory) as Arc<dyn Directory>, Arc::clone(&metrics), 10);
        let start = Instant::now();
        let resolve = |at: Duration| tenants.resolve(&config, [1; 32], 1_000, start + at);

        assert!(matches!(resolve(Duration::ZERO).await, Err(AuthError::Unknown)));
        assert!(matches!(resolve(Duration::from_secs(59)).await, Err(AuthError::Unknown)));
        assert_eq!(lookups(&metrics), [0, 1, 1], "the second refusal asked no store");
        assert!(matches!(resolve(UNKNOWN_TTL).await, Err(AuthError::Unknown)));
        assert_eq!(lookups(&metrics), [0, 2, 1], "a minute on, the store is asked again");
        assert_eq!((tenants.known_count(), tenants.unknowns()), (0, 1));

        let ann = principal_with_key();
        let key = ApiKey { sha256: [1; 32], ..ann_key() };
        directory.insert_user(ann_member()).await.unwrap();
        directory.insert_key(key).await.unwrap();
        tenants.forget_unknown(&[1; 32]);
        let resolved = resolve(UNKNOWN_TTL).await.unwrap();
        assert_eq!(resolved.user.name, ann.user.name);
        assert!(resolve(UNKNOWN_TTL).await.is_ok());
        assert_eq!(lookups(&metrics), [1, 3, 1], "created: looked up once, then served from memory");
        assert_eq!((tenants.known_count(), tenants.unknowns()), (1, 0));

        tenants.forget_user("bob");
        assert_eq!(tenants.known_count(), 1, "another user's change keeps it");
        assert!(resolve(UNKNOWN_TTL).await.is_ok());
        assert_eq!(lookups(&metrics), [2, 3, 1], "still served from memory");
        tenants.forget_all();
        assert_eq!(tenants.known_count(), 0, "a reload drops every resolved key");
        assert!(resolve(UNKNOWN_TTL).await.is_ok());
        assert_eq!(lookups(&metrics), [2, 4, 1], "looked up again");
        assert!(resolve(UNKNOWN_TTL).await.is_ok());
        assert_eq!(lookups(&metrics), [3, 4, 1], "from memory again");

        let revoked = ApiKey { revoked_at: Some(1_000), ..directory.key("key_1").await.unwrap().unwrap() };
        assert!(directory.replace_key(revoked).await.unwrap());
        tenants.forget_key(&[1; 32]);
        assert_eq!((tenants.known_count(), tenants.unknowns()), (0, 0), "a revocation drops it");
        assert!(matches!(resolve(UNKNOWN_TTL).await, Err(AuthError::Unknown)), "refused at once");
        assert_eq!(lookups(&metrics), [3, 5, 1]);
    }

    #[test]
    fn a_key_in_constant_use_is_written_once_a_minute_and_every_last_use_at_a_clean_stop() {
        let tenants = Tenants::new(Arc::new(MemoryDirectory::default()), Arc::new(Metrics::new().unwrap()), 10);
        let ann = Arc::new(principal_with_key());
        tenants.cache_principal([1; 32], Arc::clone(&ann));
        let written = |newer_by| tenants.take_uses(newer_by);
        assert!(ann.admits(1_000));
        assert_eq!(written(USE_WRITTEN_EVERY_S), [("key_1".to_owned(), 1_000)], "a first use goes at once");
        assert!(ann.admits(1_030));
        assert!(written(USE_WRITTEN_EVERY_S).is_empty(), "30 s after the written one: not yet");
        assert_eq!(tenants.last_used(&[1; 32]), Some(1_030), "what the keys list shows meanwhile");
        assert!(ann.admits(1_061));
        assert_eq!(written(USE_WRITTEN_EVERY_S), [("key_1".to_owned(), 1_061)]);
        assert!(ann.admits(1_070));
        assert_eq!(written(0), [("key_1".to_owned(), 1_070)], "a stop writes the last use");
        assert!(written(0).is_empty());
    }
}
