//! The SQLite directory: teams, users and keys in tables of the ledger's own file, beside
//! spend and request records. Opening a ledger file from before tenants adds the tables in
//! place (`CREATE TABLE IF NOT EXISTS`, versioned by `PRAGMA user_version`).
//!
//! One connection of its own, behind a lock: every call is a point query or a small write on
//! an indexed table (tens of microseconds), made on the caller's thread. Writes from the ledger's
//! writer thread go through another connection; WAL lets them proceed side by side, and the
//! busy timeout covers the rare moment both commit.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::model::{ApiKey, Member, Team};
use super::overrides;
use super::store::{Directory, StoreError, StoreResult, TeamDeletion, UserQuery};
use crate::config::BudgetPeriod;
use crate::cost::Usd;
use crate::ledger::{period, BoxFuture};

/// The schema version this code writes (`PRAGMA user_version`); 0 is a ledger from before.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS tenant_teams (
        name TEXT PRIMARY KEY,
        budget_pico INTEGER,
        budget_period TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tenant_users (
        name TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        team TEXT,
        overrides TEXT NOT NULL,
        metrics INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS tenant_users_team ON tenant_users (team, name);
    CREATE INDEX IF NOT EXISTS tenant_users_plan ON tenant_users (plan, name);
    CREATE TABLE IF NOT EXISTS tenant_keys (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        sha256 BLOB NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        label TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        last_used_at INTEGER,
        budget_pico INTEGER,
        budget_period TEXT NOT NULL,
        rpm INTEGER,
        end_users TEXT,
        lineage TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS tenant_keys_user ON tenant_keys (user);
";

const KEY_COLUMNS: &str =
    "id, user, sha256, prefix, label, created_at, expires_at, revoked_at, last_used_at, budget_pico, budget_period, rpm, end_users, lineage";

pub struct SqliteDirectory {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDirectory").finish_non_exhaustive()
    }
}

fn storage(e: rusqlite::Error) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn is_conflict(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

fn period_from(text: &str) -> BudgetPeriod {
    BudgetPeriod::parse(text).unwrap_or(BudgetPeriod::Month)
}

fn team_from(row: &Row<'_>) -> rusqlite::Result<Team> {
    Ok(Team {
        name: row.get(0)?,
        budget_usd: row.get::<_, Option<i64>>(1)?.map(Usd::from_pico),
        budget_period: period_from(&row.get::<_, String>(2)?),
        created_at: row.get(3)?,
    })
}

fn user_from(row: &Row<'_>) -> rusqlite::Result<Member> {
    let text: String = row.get(3)?;
    // Written by this code from validated overrides; a row that no longer reads (edited by
    // hand) keeps the plan's values rather than locking its user out.
    let overrides = serde_json::from_str(&text).ok().and_then(|v| overrides::from_json(&v).ok()).unwrap_or_default();
    Ok(Member {
        name: row.get(0)?,
        plan: row.get(1)?,
        team: row.get(2)?,
        overrides,
        metrics: row.get(4)?,
        created_at: row.get(5)?,
    })
}

fn key_from(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let sha: Vec<u8> = row.get(2)?;
    Ok(ApiKey {
        id: row.get(0)?,
        user: row.get(1)?,
        sha256: sha.try_into().unwrap_or([0; 32]),
        prefix: row.get(3)?,
        label: row.get(4)?,
        created_at: row.get(5)?,
        expires_at: row.get(6)?,
        revoked_at: row.get(7)?,
        last_used_at: row.get(8)?,
        budget_usd: row.get::<_, Option<i64>>(9)?.map(Usd::from_pico),
        budget_period: period_from(&row.get::<_, String>(10)?),
        rpm: row.get(11)?,
        end_users: row.get(12)?,
        lineage: row.get(13)?,
    })
}

impl SqliteDirectory {
    /// Opens the ledger file at `path` (the ledger has created it) and adds the tenant tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(storage)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(storage)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;").map_err(storage)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(storage)?;
        if version < SCHEMA_VERSION {
            conn.execute_batch(SCHEMA).map_err(storage)?;
            conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(storage)?;
        }
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = f(&conn).map_err(storage);
        Box::pin(std::future::ready(result))
    }

    /// An insert: a taken name or id is a conflict.
    fn insert(
        &self,
        name: String,
        f: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
    ) -> BoxFuture<'static, StoreResult<()>> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = match f(&conn) {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Err(StoreError::Conflict(name)),
            Err(e) => Err(storage(e)),
        };
        Box::pin(std::future::ready(result))
    }
}

fn key_params(k: &ApiKey) -> [Box<dyn rusqlite::ToSql + '_>; 14] {
    [
        Box::new(&k.id),
        Box::new(&k.user),
        Box::new(k.sha256.as_slice()),
        Box::new(&k.prefix),
        Box::new(&k.label),
        Box::new(k.created_at),
        Box::new(k.expires_at),
        Box::new(k.revoked_at),
        Box::new(k.last_used_at),
        Box::new(k.budget_usd.map(Usd::pico)),
        Box::new(period::name(k.budget_period)),
        Box::new(k.rpm),
        Box::new(&k.end_users),
        Box::new(&k.lineage),
    ]
}

/// Every API user of the ledger file at `path` with its effective limits under `config`'s
/// plans, handed to `each` one at a time, by name (`tollgate report`: a million users need not
/// be in memory twice); a ledger from before tenants has none.
pub fn each_effective_user(
    path: &Path,
    config: &crate::config::Config,
    mut each: impl FnMut(crate::config::User),
) -> Result<(), StoreError> {
    let conn = crate::ledger::sqlite::open_read_only(path).map_err(storage)?;
    let exists: bool = conn
        .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'tenant_users')", [], |r| r.get(0))
        .map_err(storage)?;
    if !exists {
        return Ok(());
    }
    let mut statement = conn
        .prepare("SELECT name, plan, team, overrides, metrics, created_at FROM tenant_users ORDER BY name")
        .map_err(storage)?;
    for member in statement.query_map([], user_from).map_err(storage)? {
        each(super::reported_user(&member.map_err(storage)?, config));
    }
    Ok(())
}

impl Directory for SqliteDirectory {
    fn insert_team(&self, team: Team) -> BoxFuture<'_, StoreResult<()>> {
        self.insert(team.name.clone(), |c| {
            c.execute(
                "INSERT INTO tenant_teams (name, budget_pico, budget_period, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![team.name, team.budget_usd.map(Usd::pico), period::name(team.budget_period), team.created_at],
            )
        })
    }

    fn team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Team>>> {
        self.run(|c| {
            c.query_row(
                "SELECT name, budget_pico, budget_period, created_at FROM tenant_teams WHERE name = ?1",
                params![name],
                team_from,
            )
            .optional()
        })
    }

    fn replace_team(&self, team: Team) -> BoxFuture<'_, StoreResult<bool>> {
        self.run(move |c| {
            c.execute(
                "UPDATE tenant_teams SET budget_pico = ?2, budget_period = ?3 WHERE name = ?1",
                params![team.name, team.budget_usd.map(Usd::pico), period::name(team.budget_period)],
            )
            .map(|n| n > 0)
        })
    }

    fn delete_team<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<TeamDeletion>> {
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let exists: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM tenant_teams WHERE name = ?1)", params![name], |r| {
                    r.get(0)
                })?;
            if !exists {
                return Ok(TeamDeletion::Absent);
            }
            let members: i64 =
                tx.query_row("SELECT COUNT(*) FROM tenant_users WHERE team = ?1", params![name], |r| r.get(0))?;
            if members > 0 {
                return Ok(TeamDeletion::HasMembers(u64::try_from(members).unwrap_or(0)));
            }
            tx.execute("DELETE FROM tenant_teams WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(TeamDeletion::Deleted)
        })
    }

    fn insert_user(&self, user: Member) -> BoxFuture<'_, StoreResult<()>> {
        let overrides = overrides::to_json(&user.overrides).to_string();
        self.insert(user.name.clone(), |c| {
            c.execute(
                "INSERT INTO tenant_users (name, plan, team, overrides, metrics, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![user.name, user.plan, user.team, overrides, user.metrics, user.created_at],
            )
        })
    }

    fn user<'a>(&'a self, name: &'a str) -> BoxFuture<'a, StoreResult<Option<Member>>> {
        self.run(|c| {
            c.query_row(
                "SELECT name, plan, team, overrides, metrics, created_at FROM tenant_users WHERE name = ?1",
                params![name],
                user_from,
            )
            .optional()
        })
    }

    fn replace_user(&self, user: Member) -> BoxFuture<'_, StoreResult<bool>> {
        let overrides = overrides::to_json(&user.overrides).to_string();
        self.run(move |c| {
            c.execute(
                "UPDATE tenant_users SET plan = ?2, team = ?3, overrides = ?4, metrics = ?5 WHERE name = ?1",
                params![user.name, user.plan, user.team, overrides, user.metrics],
            )
            .map(|n| n > 0)
        })
    }

    fn delete_user<'a>(&'a self, name: &'a str, now: i64) -> BoxFuture<'a, StoreResult<Option<Vec<[u8; 32]>>>> {
        self.run(move |c| {
            let tx = c.unchecked_transaction()?;
            if tx.execute("DELETE FROM tenant_users WHERE name = ?1", params![name])? == 0 {
                return Ok(None);
            }
            let revoked = {
                let mut statement =
                    tx.prepare("SELECT sha256 FROM tenant_keys WHERE user = ?1 AND revoked_at IS NULL")?;
                let rows = statement.query_map(params![name], |r| r.get::<_, Vec<u8>>(0))?;
                rows.filter_map(|r| r.ok().and_then(|v| <[u8; 32]>::try_from(v).ok())).collect()
            };
            tx.execute(
                "UPDATE tenant_keys SET revoked_at = ?2 WHERE user = ?1 AND revoked_at IS NULL",
                params![name, now],
            )?;
            tx.commit()?;
            Ok(Some(revoked))
        })
    }

    fn users<'a>(&'a self, query: &'a UserQuery) -> BoxFuture<'a, StoreResult<Vec<Member>>> {
        self.run(|c| {
            let mut statement = c.prepare_cached(
                "SELECT name, plan, team, overrides, metrics, created_at FROM tenant_users
                 WHERE name > ?1 AND (?2 IS NULL OR plan = ?2) AND (?3 IS NULL OR team = ?3)
                 ORDER BY name LIMIT ?4",
            )?;
            let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
            let rows = statement
                .query_map(params![query.after.as_deref().unwrap_or(""), query.plan, query.team, limit], user_from)?;
            rows.collect()
        })
    }

    fn count_metrics_users(&self) -> BoxFuture<'_, StoreResult<u64>> {
        self.run(|c| {
            c.query_row("SELECT COUNT(*) FROM tenant_users WHERE metrics = 1", [], |r| r.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
        })
    }

    fn insert_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<()>> {
        self.insert(key.id.clone(), |c| {
            let sql = format!(
                "INSERT INTO tenant_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            );
            let values = key_params(&key);
            c.execute(&sql, rusqlite::params_from_iter(values.iter()))
        })
    }

    fn key<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        self.run(|c| {
            c.query_row(&format!("SELECT {KEY_COLUMNS} FROM tenant_keys WHERE id = ?1"), params![id], key_from)
                .optional()
        })
    }

    fn key_by_hash<'a>(&'a self, sha256: &'a [u8; 32]) -> BoxFuture<'a, StoreResult<Option<ApiKey>>> {
        self.run(|c| {
            let mut statement =
                c.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM tenant_keys WHERE sha256 = ?1"))?;
            statement.query_row(params![sha256.as_slice()], key_from).optional()
        })
    }

    fn keys_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, StoreResult<Vec<ApiKey>>> {
        self.run(|c| {
            let mut statement =
                c.prepare(&format!("SELECT {KEY_COLUMNS} FROM tenant_keys WHERE user = ?1 ORDER BY created_at, id"))?;
            let rows = statement.query_map(params![user], key_from)?;
            rows.collect()
        })
    }

    fn replace_key(&self, key: ApiKey) -> BoxFuture<'_, StoreResult<bool>> {
        self.run(move |c| {
            c.execute(
                "UPDATE tenant_keys SET label = ?2, expires_at = ?3, revoked_at = ?4, budget_pico = ?5,
                 budget_period = ?6, rpm = ?7 WHERE id = ?1",
                params![
                    key.id,
                    key.label,
                    key.expires_at,
                    key.revoked_at,
                    key.budget_usd.map(Usd::pico),
                    period::name(key.budget_period),
                    key.rpm
                ],
            )
            .map(|n| n > 0)
        })
    }

    /// On a blocking thread, unlike the point queries: a batch is up to every busy key (10,000
    /// updates a minute), and must not hold up the requests of the worker that awaits it.
    fn touch_keys(&self, used: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>> {
        let conn = Arc::clone(&self.conn);
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let c = conn.lock().unwrap_or_else(PoisonError::into_inner);
                let tx = c.unchecked_transaction()?;
                {
                    let mut statement = tx.prepare_cached(
                        "UPDATE tenant_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE id = ?1",
                    )?;
                    for (id, at) in &used {
                        statement.execute(params![id, at])?;
                    }
                }
                tx.commit()
            })
            .await;
            written.map_err(|e| StoreError::Storage(e.to_string()))?.map_err(storage)
        })
    }
}
