//! Where teams, users and keys live: the [`Directory`] a store implements, and the in-memory
//! one that goes with the `memory` ledger. The SQLite store is in [`super::sqlite`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use super::model::{ApiKey, Member, Team};
use crate::ledger::BoxFuture;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A team, user or key by that name or id already exists.
    #[error("`{0}` already exists")]
    Conflict(String),
    #[error("tenant store failed: {0}")]
    Storage(String),
    /// The shared store (Redis) cannot be reached now: worth a retry, not a bug.
    #[error(transparent)]
    Unavailable(#[from] crate::ledger::LedgerError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What deleting a team did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeamDeletion {
    Deleted,
    Absent,
    /// Refused: it still has this many members.
    HasMembers(u64),
}

/// A page of users: ordered by name, after `after`, at most `limit`, optionally one plan's or
/// one team's.
#[derive(Debug, Clone, Default)]
pub struct UserQuery {
    pub after: Option<String>,
    pub limit: usize,
    pub plan: Option<String>,
    pub team: Option<String>,
}

impl UserQuery {
    fn matches(&self, user: &Member) -> bool {
        self.after.as_deref().is_none_or(|after| user.name.as_str() > after)
            && self.plan.as_deref().is_none_or(|plan| user.plan == plan)
            && self.team.as_deref().is_none_or(|team| user.team.as_deref() == Some(team))
    }
}

/// A key with its user and the user's team: what resolving a key for the first time reads.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChain {
    pub key: ApiKey,
    /// `None`: the user is gone (deleted meanwhile).
    pub user: Option<Member>,
    pub team: Option<Team>,
}

/// Teams, users and keys, kept by a store. Every write is one atomic step in the store;
/// names and ids are unique.
pub trait Directory: Send + Sync + 'static {
    fn insert_team(&self, team: Team) -> BoxFuture<'_, StoreResult<()>>;
    fn team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Team>>>;
    /// Replaces the team of that name; `false` when there is none.
    fn replace_team(&self, team: Team) -> BoxFuture<'_, StoreResult<bool>>;
    /// Deletes a team without members.
    fn delete_team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<TeamDeletion>>;

    fn insert_user(&self, user: Member) -> BoxFuture<'_, StoreResult<()>>;
    fn user<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Member>>>;
    fn replace_user(&self, user: Member) -> BoxFuture<'_, StoreResult<bool>>;
    /// Deletes a user and revokes its keys at `now`; the revoked keys' hashes, or `None` when
    /// there was no such user. Its spend stays in the ledger, under its name.
    fn delete_user<'a>(&'a self, name: &'a str, now: i64) -> BoxFuture<'a, StoreResult<Option<Vec<[u8; 32]>>>>;
    fn users<'a>(&'a self, query: &'a UserQuery) -> BoxFuture<'a, StoreResult<Vec<Member>>>;
    /// Users with per-user metric series.
    fn count_metrics_users(&self) -> BoxFuture<'_, StoreResult<u64>>;

    fn insert_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<()>>;
    fn key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<ApiKey>>>;
    fn key_by_hash<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<ApiKey>>>;
    /// The key whose SHA-256 is `sha256`, with its user and team. A store across the network
    /// answers in one round trip; this default asks three questions.
    fn key_chain<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<KeyChain>>> {
        Box::pin(async move {
            let Some(key) = self.key_by_hash(sha256).await? else { return Ok(None) };
            let user = self.user(&key.user).await?;
            let team = match user.as_ref().and_then(|u| u.team.as_deref()) {
                Some(name) => self.team(name).await?,
                None => None,
            };
            Ok(Some(KeyChain { key, user, team }))
        })
    }
    fn keys_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<ApiKey>>>;
    /// Replaces the key with that id (revocation, expiry); `false` when there is none.
    fn replace_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<bool>>;
    /// Records when keys were last used (batched: never on a request's path).
    fn touch_keys(&self, used: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>>;

    /// Where other replicas' changes are read from; `None` for a store only this process
    /// writes (its changes drop what they touch from the cache directly).
    fn feed(&self) -> Option<&dyn ChangeFeed> {
        None
    }
}

/// A change made by some replica, as the feed tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key (by its SHA-256) was created.
    NewKey([u8; 32]),
    /// A key was revoked or changed.
    Key([u8; 32]),
    User(String),
    Team(String),
}

/// Changes read from a feed, and where the feed was read up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    pub changes: Vec<Change>,
    pub position: String,
}

/// The changes every replica of a shared store makes, in order.
pub trait ChangeFeed: Send + Sync {
    /// Where the feed ends now.
    fn position(&self) -> BoxFuture<'_, StoreResult<String>>;
    /// The changes after `position` and the position after them; `None` when the feed no
    /// longer reaches back to `position` (anything may have changed).
    fn changes_after<'a>(&'a self, position: &'a str) -> BoxFuture<'a, StoreResult<Option<Changes>>>;
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

/// The `memory` ledger's directory: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryDirectory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    teams: BTreeMap<String, Team>,
    users: BTreeMap<String, Member>,
    keys: HashMap<String, ApiKey>,
    by_hash: HashMap<[u8; 32], String>,
}

impl MemoryDirectory {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Directory for MemoryDirectory {
    fn insert_team(&self, team: Team) -> BoxFuture<'_, StoreResult<()>> {
        ready(self.with(|i| {
            if i.teams.contains_key(&team.name) {
                return Err(StoreError::Conflict(team.name));
            }
            i.teams.insert(team.name.clone(), team);
            Ok(())
        }))
    }

    fn team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Team>>> {
        ready(Ok(self.with(|i| i.teams.get(name).cloned())))
    }

    fn replace_team(&self, team: Team) -> BoxFuture<'_, StoreResult<bool>> {
        ready(Ok(self.with(|i| i.teams.get_mut(&team.name).map(|t| *t = team).is_some())))
    }

    fn delete_team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<TeamDeletion>> {
        ready(Ok(self.with(|i| {
            if !i.teams.contains_key(name) {
                return TeamDeletion::Absent;
            }
            let members = i.users.values().filter(|u| u.team.as_deref() == Some(name)).count() as u64;
            if members > 0 {
                return TeamDeletion::HasMembers(members);
            }
            i.teams.remove(name);
            TeamDeletion::Deleted
        })))
    }

    fn insert_user(&self, user: Member) -> BoxFuture<'_, StoreResult<()>> {
        ready(self.with(|i| {
            if i.users.contains_key(&user.name) {
                return Err(StoreError::Conflict(user.name));
            }
            i.users.insert(user.name.clone(), user);
            Ok(())
        }))
    }

    fn user<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Member>>> {
        ready(Ok(self.with(|i| i.users.get(name).cloned())))
    }

    fn replace_user(&self, user: Member) -> BoxFuture<'_, StoreResult<bool>> {
        ready(Ok(self.with(|i| i.users.get_mut(&user.name).map(|u| *u = user).is_some())))
    }

    fn delete_user<'a>(&'a self, name: &'a str, now: i64) -> BoxFuture<'a, StoreResult<Option<Vec<[u8; 32]>>>> {
        ready(Ok(self.with(|i| {
            i.users.remove(name)?;
            let mut revoked = Vec::new();
            for key in i.keys.values_mut().filter(|k| k.user == name && k.revoked_at.is_none()) {
                key.revoked_at = Some(now);
                revoked.push(key.sha256);
            }
            Some(revoked)
        })))
    }

    fn users<'a>(&'a self, query: &'a UserQuery) -> BoxFuture<'a, StoreResult<Vec<Member>>> {
        ready(Ok(self.with(|i| {
            let from = query.after.clone().map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
            i.users
                .range((from, std::ops::Bound::Unbounded))
                .map(|(_, u)| u)
                .filter(|u| query.matches(u))
                .take(query.limit)
                .cloned()
                .collect()
        })))
    }

    fn count_metrics_users(&self) -> BoxFuture<'_, StoreResult<u64>> {
        ready(Ok(self.with(|i| i.users.values().filter(|u| u.metrics).count() as u64)))
    }

    fn insert_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<()>> {
        ready(self.with(|i| {
            if i.keys.contains_key(&key.id) || i.by_hash.contains_key(&key.sha256) {
                return Err(StoreError::Conflict(key.id));
            }
            i.by_hash.insert(key.sha256, key.id.clone());
            i.keys.insert(key.id.clone(), key);
            Ok(())
        }))
    }

    fn key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        ready(Ok(self.with(|i| i.keys.get(id).cloned())))
    }

    fn key_by_hash<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        ready(Ok(self.with(|i| i.by_hash.get(sha256).and_then(|id| i.keys.get(id)).cloned())))
    }

    fn keys_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<ApiKey>>> {
        ready(Ok(self.with(|i| {
            let mut keys: Vec<ApiKey> = i.keys.values().filter(|k| k.user == user).cloned().collect();
            keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            keys
        })))
    }

    fn replace_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<bool>> {
        ready(Ok(self.with(|i| i.keys.get_mut(&key.id).map(|k| *k = key).is_some())))
    }

    fn touch_keys(&self, used: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>> {
        self.with(|i| {
            for (id, at) in used {
                if let Some(key) = i.keys.get_mut(&id) {
                    key.last_used_at = Some(key.last_used_at.map_or(at, |last| last.max(at)));
                }
            }
        });
        ready(Ok(()))
    }
}
