//! The `spend` table, kept from the request records: each record names the accounts and periods
//! its cost was booked in (its `levels` column); the writer adds records up per (account,
//! period, backend) in memory and upserts the sums every [`FLUSH_EVERY_MS`], in the same
//! transaction as that window's records, moving a watermark (the last record folded in).
//!
//! Why not upsert every window: with thousands of distinct users, each 20 ms window touched a
//! row (and a page) per user, and the pages written, checkpointed and copied cost the writer
//! ~3 µs of CPU per request at 10k users (benches/scale). What a flush costs grows with the
//! users seen in it, not with the requests: at 10k users and ~25k requests a second, sums once
//! a second cost the writer ~2 µs per request and sums every 5 s still ~1.3 µs (0.08 spend and
//! 0.08 rollup upserts per request); every 30 s they cost a sixth of that, and a crash leaves
//! at most 30 s of records to fold in at the next open (~0.5 s per 500k records).
//! Nothing is lost to a crash: records past the watermark are folded in when the file is
//! opened again, `tollgate report` folds them in as it reads, and the ledger's own reads
//! (usage, hours, standings) flush first.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use smallvec::SmallVec;

use crate::cost::Usd;
use crate::ledger::rollup::{self, Sums};
use crate::ledger::{PeriodSpend, RequestRecord};

/// How often the sums reach the `spend` table (and how old its rows can be, behind the records).
pub const FLUSH_EVERY_MS: i64 = 30_000;
/// Sums kept at most before a flush whatever the time: bounds the writer's memory.
pub const MAX_PENDING: usize = 100_000;

/// Added to a ledger file from before (idempotent): the records' levels and the watermark,
/// their request ids, the hourly rollups and the time index that carries the user. Such a file's spend already counts every record it holds, so the
/// watermark starts at its last record.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS ledger_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")?;
    if !has_column(&tx, "levels")? {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN levels TEXT")?;
    }
    if !has_column(&tx, "request_id")? {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN request_id TEXT")?;
    }
    tx.execute(
        "INSERT OR IGNORE INTO ledger_meta (name, value)
         SELECT 'spend_through', COALESCE(MAX(rowid), 0) FROM requests",
        [],
    )?;
    if !has_table(&tx, "hourly_user")? {
        create_rollups(&tx)?;
    }
    // Replaced by `requests_at_user` (the schema creates it), which serves every read it did.
    tx.execute_batch("DROP INDEX IF EXISTS requests_at")?;
    tx.commit()
}

/// The hourly rollups' tables ([`rollup`]), filled from the records the `spend` table already
/// counts (those past the watermark are folded in at open, like their spend).
fn create_rollups(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE hourly_user (
            user TEXT NOT NULL,
            hour INTEGER NOT NULL,
            backend TEXT NOT NULL,
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            spent_pico INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_ms INTEGER NOT NULL,
            PRIMARY KEY (user, hour, backend)
        ) WITHOUT ROWID;
        CREATE INDEX hourly_user_hour ON hourly_user (hour);
        CREATE TABLE hourly_backend (
            hour INTEGER NOT NULL,
            backend TEXT NOT NULL,
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            spent_pico INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_ms INTEGER NOT NULL,
            PRIMARY KEY (hour, backend)
        ) WITHOUT ROWID;",
    )?;
    let folded = "(SELECT value FROM ledger_meta WHERE name = 'spend_through')";
    let sums =
        "COUNT(*), SUM(status >= 400), SUM(cost_pico), SUM(prompt_tokens), SUM(completion_tokens), SUM(latency_ms)";
    let hour = "(at_ms / 1000 / 3600) * 3600";
    tx.execute_batch(&format!(
        "INSERT INTO hourly_user SELECT user, {hour} AS h, backend, {sums} FROM requests
           WHERE rowid <= {folded} GROUP BY user, h, backend;
         INSERT INTO hourly_backend SELECT {hour} AS h, backend, {sums} FROM requests
           WHERE rowid <= {folded} GROUP BY h, backend;"
    ))
}

fn has_table(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
}

fn has_column(conn: &Connection, column: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT COUNT(*) FROM pragma_table_info('requests') WHERE name = ?1", [column], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
}

/// A record's levels as its `levels` column holds them: `[["alice",1764547200],…]`.
pub fn encode_levels(levels: &[(Arc<str>, i64)]) -> String {
    let pairs: Vec<(&str, i64)> = levels.iter().map(|(account, start)| (&**account, *start)).collect();
    serde_json::to_string(&pairs).unwrap_or_default()
}

/// One (account, period, backend)'s sums.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub spent_pico: i64,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// A count as SQLite's integer (which is signed), saturated.
pub fn integer(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Sums not yet in the `spend` and rollup tables, per account: one lookup finds a user's
/// period sums and its hourly rollup rows, and an account's name is cloned for its first row
/// only. (Three maps keyed by (account, period or hour, backend) cost the writer three cold
/// lookups and four reference-count round trips on names the workers share, per record.)
#[derive(Debug, Default)]
pub struct Pending {
    by_account: HashMap<Arc<str>, AccountSums>,
    rows: usize,
}

#[derive(Debug, Default)]
struct AccountSums {
    /// Per (period start, backend).
    periods: SmallVec<[(i64, Arc<str>, Delta); 1]>,
    /// Per (hour, backend), when the account is a record's user: its rollup rows.
    hours: SmallVec<[(i64, Arc<str>, Sums); 1]>,
}

impl AccountSums {
    /// Adds `add` to the (period, backend) row; whether the row is new.
    fn add_period(&mut self, start: i64, backend: &Arc<str>, add: Delta) -> bool {
        add_to_row(&mut self.periods, start, backend, add, |sum| sum.add(add))
    }

    /// Adds `add` to the (hour, backend) row; whether the row is new.
    fn add_hour(&mut self, hour: i64, backend: &Arc<str>, add: &Sums) -> bool {
        add_to_row(&mut self.hours, hour, backend, *add, |sum| sum.add(add))
    }
}

/// Adds to the row of (`at`, `backend`) in `rows` with `add`, or appends `new` as that row;
/// whether the row is new. An account has a row or two (a period or hour, a backend or two)
/// between flushes: a scan beats a map.
fn add_to_row<T>(
    rows: &mut SmallVec<[(i64, Arc<str>, T); 1]>,
    at: i64,
    backend: &Arc<str>,
    new: T,
    add: impl FnOnce(&mut T),
) -> bool {
    if let Some((_, _, sum)) = rows.iter_mut().find(|(a, b, _)| *a == at && b == backend) {
        add(sum);
        return false;
    }
    rows.push((at, Arc::clone(backend), new));
    true
}

/// A rollup row's sums as its columns after the key: requests, errors, spent (pico-USD),
/// prompt and completion tokens, latency (ms).
fn sum_columns(s: &Sums) -> [i64; 6] {
    [
        integer(s.requests),
        integer(s.errors),
        s.spent.pico(),
        integer(s.prompt_tokens),
        integer(s.completion_tokens),
        integer(s.latency_ms),
    ]
}

impl Delta {
    fn add(&mut self, add: Self) {
        self.spent_pico = self.spent_pico.saturating_add(add.spent_pico);
        self.requests = self.requests.saturating_add(add.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(add.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(add.completion_tokens);
    }
}

impl Pending {
    /// Applies `change` to `account`'s sums (new ones if it has none); `change` says how many
    /// rows it added.
    fn change(&mut self, account: &Arc<str>, change: impl FnOnce(&mut AccountSums) -> usize) {
        if let Some(sums) = self.by_account.get_mut(&**account) {
            self.rows += change(sums);
            return;
        }
        let mut sums = AccountSums::default();
        self.rows += change(&mut sums);
        self.by_account.insert(Arc::clone(account), sums);
    }

    pub fn add_record(&mut self, levels: &[(Arc<str>, i64)], record: &RequestRecord) {
        let delta = Delta {
            spent_pico: record.cost.pico(),
            requests: 1,
            prompt_tokens: integer(record.prompt_tokens),
            completion_tokens: integer(record.completion_tokens),
        };
        let hour = rollup::hour_of(record.at_ms);
        let sums = Sums::of(record);
        let backend = &record.backend;
        let mut user_seen = false;
        for (account, start) in levels {
            let is_user = *account == record.user;
            user_seen |= is_user;
            self.change(account, |row| {
                let hour_added = is_user && row.add_hour(hour, backend, &sums);
                usize::from(row.add_period(*start, backend, delta)) + usize::from(hour_added)
            });
        }
        if !user_seen {
            self.change(&record.user, |row| usize::from(row.add_hour(hour, backend, &sums)));
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds the sums to the `spend` and rollup tables and moves the watermark to the last
    /// record, in `tx`. The sums stay until [`Pending::clear`]: a transaction that fails keeps
    /// them for the next.
    pub fn write(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO spend (user, period_start, backend, spent_pico, requests, prompt_tokens, completion_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (user, period_start, backend) DO UPDATE SET
               spent_pico = spent_pico + excluded.spent_pico,
               requests = requests + excluded.requests,
               prompt_tokens = prompt_tokens + excluded.prompt_tokens,
               completion_tokens = completion_tokens + excluded.completion_tokens",
        )?;
        for (account, sums) in &self.by_account {
            for (start, backend, d) in &sums.periods {
                upsert.execute(params![
                    &**account,
                    start,
                    &**backend,
                    d.spent_pico,
                    d.requests,
                    d.prompt_tokens,
                    d.completion_tokens
                ])?;
            }
        }
        self.write_rollups(tx)?;
        mark_folded(tx)
    }

    /// Adds the hourly sums to the rollup tables: the users' rows, and their sums per backend.
    fn write_rollups(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        const ADD: &str = "requests = requests + excluded.requests, errors = errors + excluded.errors,
        spent_pico = spent_pico + excluded.spent_pico, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens, latency_ms = latency_ms + excluded.latency_ms";
        let mut by_user = tx.prepare_cached(&format!(
            "INSERT INTO hourly_user VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (user, hour, backend) DO UPDATE SET {ADD}"
        ))?;
        let mut by_backend: HashMap<(i64, &str), Sums> = HashMap::new();
        for (user, sums) in &self.by_account {
            for (hour, backend, s) in &sums.hours {
                let [requests, errors, spent, prompt, completion, latency] = sum_columns(s);
                by_user.execute(params![
                    &**user, hour, &**backend, requests, errors, spent, prompt, completion, latency
                ])?;
                by_backend.entry((*hour, &**backend)).or_default().add(s);
            }
        }
        let mut by_backend_upsert = tx.prepare_cached(&format!(
            "INSERT INTO hourly_backend VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (hour, backend) DO UPDATE SET {ADD}"
        ))?;
        for ((hour, backend), s) in by_backend {
            let [requests, errors, spent, prompt, completion, latency] = sum_columns(&s);
            by_backend_upsert.execute(params![hour, backend, requests, errors, spent, prompt, completion, latency])?;
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.by_account.clear();
        self.rows = 0;
    }

    /// The sums per (account, period), backends together.
    fn per_period(&self) -> HashMap<(&str, i64), i64> {
        let mut out: HashMap<(&str, i64), i64> = HashMap::new();
        for (account, sums) in &self.by_account {
            for (start, _, d) in &sums.periods {
                let sum = out.entry((&**account, *start)).or_default();
                *sum = sum.saturating_add(d.spent_pico);
            }
        }
        out
    }
}

/// The rollup rows `query` asks for, from the tables (what the writer has flushed).
pub fn read_hourly(conn: &Connection, query: &rollup::HourQuery) -> rusqlite::Result<Vec<rollup::HourRow>> {
    const SUMS: &str = "hour, backend, requests, errors, spent_pico, prompt_tokens, completion_tokens, latency_ms";
    let row = |r: &rusqlite::Row<'_>| {
        let count = |i| r.get::<_, i64>(i).map(|n| u64::try_from(n).unwrap_or(0));
        Ok(rollup::HourRow {
            hour: r.get(0)?,
            backend: r.get::<_, String>(1)?.into(),
            sums: Sums {
                requests: count(2)?,
                errors: count(3)?,
                spent: Usd::from_pico(r.get(4)?),
                prompt_tokens: count(5)?,
                completion_tokens: count(6)?,
                latency_ms: count(7)?,
            },
        })
    };
    match &query.user {
        Some(user) => {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {SUMS} FROM hourly_user WHERE user = ?1 AND hour >= ?2 AND hour < ?3 ORDER BY hour, backend"
            ))?;
            let rows = statement.query_map(params![&**user, query.from, query.to], row)?;
            rows.collect()
        }
        None => {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {SUMS} FROM hourly_backend WHERE hour >= ?1 AND hour < ?2 ORDER BY hour, backend"
            ))?;
            let rows = statement.query_map(params![query.from, query.to], row)?;
            rows.collect()
        }
    }
}

/// Drops the per-user rows of hours before `user_hours_from` and the per-backend rows before
/// `backend_hours_from`.
pub fn prune_rollups(conn: &Connection, user_hours_from: i64, backend_hours_from: i64) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM hourly_user WHERE hour < ?1", params![user_hours_from])?;
    conn.execute("DELETE FROM hourly_backend WHERE hour < ?1", params![backend_hours_from])?;
    Ok(())
}

/// Every record so far is in the `spend` table (or in sums being written with this).
fn mark_folded(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE ledger_meta SET value = (SELECT COALESCE(MAX(rowid), 0) FROM requests) WHERE name = 'spend_through'",
        [],
    )
    .map(drop)
}

/// The sums of the records past the watermark: what a crash kept out of the `spend` table.
pub fn unfolded(conn: &Connection) -> rusqlite::Result<(Pending, usize)> {
    let mut pending = Pending::default();
    let through: Option<i64> = conn
        .query_row("SELECT value FROM ledger_meta WHERE name = 'spend_through'", [], |r| r.get(0))
        .optional()
        .or_else(|e| match e {
            // A file from before the watermark: its spend counts every record.
            rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => Ok(None),
            e => Err(e),
        })?;
    let Some(through) = through else { return Ok((pending, 0)) };
    let mut statement = conn.prepare(&format!(
        "SELECT {}, request_id, levels FROM requests WHERE rowid > ?1 AND levels IS NOT NULL",
        super::REQUEST_COLUMN_LIST
    ))?;
    let mut rows = statement.query(params![through])?;
    let mut records = 0;
    while let Some(row) = rows.next()? {
        let levels: String = row.get(11)?;
        let Ok(levels) = serde_json::from_str::<Vec<(String, i64)>>(&levels) else { continue };
        let record = super::record_from_row(row)?;
        let levels: Vec<(Arc<str>, i64)> = levels.into_iter().map(|(account, start)| (account.into(), start)).collect();
        pending.add_record(&levels, &record);
        records += 1;
    }
    Ok((pending, records))
}

/// Folds in what a crash left out of the `spend` table; run at open, before anything reads it.
pub fn fold_unfolded(conn: &mut Connection) -> rusqlite::Result<usize> {
    let (pending, records) = unfolded(conn)?;
    if records > 0 {
        let tx = conn.transaction()?;
        pending.write(&tx)?;
        tx.commit()?;
    }
    Ok(records)
}

/// The `spend` table's rows per (user, period), with what is past the watermark added.
pub fn read_all(conn: &Connection) -> rusqlite::Result<Vec<PeriodSpend>> {
    let mut statement =
        conn.prepare("SELECT user, period_start, SUM(spent_pico) FROM spend GROUP BY user, period_start")?;
    let mut spend: HashMap<(String, i64), i64> = HashMap::new();
    let rows = statement
        .query_map([], |row| Ok(((row.get::<_, String>(0)?, row.get::<_, i64>(1)?), row.get::<_, i64>(2)?)))?;
    for row in rows {
        let (key, pico) = row?;
        spend.insert(key, pico);
    }
    let (pending, _) = unfolded(conn)?;
    for ((account, start), pico) in pending.per_period() {
        let sum = spend.entry((account.to_owned(), start)).or_default();
        *sum = sum.saturating_add(pico);
    }
    let mut out: Vec<PeriodSpend> = spend
        .into_iter()
        .map(|((user, period_start), pico)| PeriodSpend { user, period_start, spent: Usd::from_pico(pico) })
        .collect();
    out.sort_by(|a, b| (&a.user, a.period_start).cmp(&(&b.user, b.period_start)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    /// A record whose cost is `pico`, failed when that is a multiple of 5.
    fn record(user: &str, backend: &str, at_ms: i64, pico: i64) -> RequestRecord {
        let status = if pico % 5 == 0 { 502 } else { 200 };
        rollup::tests::record(user, backend, at_ms, pico, status, 40)
    }

    fn rows<T: rusqlite::types::FromSql>(conn: &Connection, sql: &str) -> Vec<(String, i64, String, T)> {
        let mut statement = conn.prepare(sql).unwrap();
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    /// Records of users with key, user and team levels, with their user alone, and with a key
    /// level only (their user's rollups still count them), over two hours, two periods and two
    /// backends: the tables get what brute-force sums over the records say.
    #[test]
    fn pending_sums_write_what_the_records_add_up_to_per_account_and_hour() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        migrate(&mut conn).unwrap();
        let (day1, day2) = (1_764_547_200, 1_764_633_600);
        let hour_ms = 3_600_000;
        let alice: Vec<(Arc<str>, i64)> =
            vec![("~key:a".into(), day1), ("alice".into(), day1), ("~team:t".into(), day2)];
        let bob: Vec<(Arc<str>, i64)> = vec![("bob".into(), day1)];
        let carol: Vec<(Arc<str>, i64)> = vec![("~key:c".into(), day1)];
        let mut pending = Pending::default();
        let mut spend: BTreeMap<(String, i64, String), i64> = BTreeMap::new();
        let mut hourly: BTreeMap<(String, i64, String), (i64, i64)> = BTreeMap::new();
        let mut everyone: BTreeMap<(i64, String), i64> = BTreeMap::new();
        for i in 0..60_i64 {
            let (user, levels) = [("alice", &alice), ("bob", &bob), ("carol", &carol)][usize::try_from(i % 3).unwrap()];
            let backend = if i % 4 == 0 { "gpu" } else { "cpu" };
            let at_ms = day1 * 1000 + (i % 2) * hour_ms;
            let r = record(user, backend, at_ms, 1 + i);
            pending.add_record(levels, &r);
            for (account, start) in levels {
                *spend.entry((account.to_string(), *start, backend.into())).or_default() += 1 + i;
            }
            let hour = rollup::hour_of(at_ms);
            let row = hourly.entry((user.into(), hour, backend.into())).or_default();
            row.0 += 1 + i;
            row.1 += i64::from((1 + i) % 5 == 0);
            *everyone.entry((hour, backend.into())).or_default() += 1 + i;
        }
        assert_eq!(pending.len(), spend.len() + hourly.len());
        let tx = conn.transaction().unwrap();
        pending.write(&tx).unwrap();
        tx.commit().unwrap();

        let written: Vec<(String, i64, String, i64)> =
            rows(&conn, "SELECT user, period_start, backend, spent_pico FROM spend ORDER BY 1, 2, 3");
        let expected: Vec<_> = spend.into_iter().map(|((a, s, b), p)| (a, s, b, p)).collect();
        assert_eq!(written, expected);
        let written: Vec<(String, i64, String, i64)> =
            rows(&conn, "SELECT user, hour, backend, spent_pico * 1000 + errors FROM hourly_user ORDER BY 1, 2, 3");
        let expected: Vec<_> = hourly.into_iter().map(|((u, h, b), (p, e))| (u, h, b, p * 1000 + e)).collect();
        assert_eq!(written, expected);
        let written: Vec<(String, i64, String, i64)> =
            rows(&conn, "SELECT '', hour, backend, spent_pico FROM hourly_backend ORDER BY 2, 3");
        let expected: Vec<_> = everyone.into_iter().map(|((h, b), p)| (String::new(), h, b, p)).collect();
        assert_eq!(written, expected);

        pending.clear();
        assert!(pending.is_empty());
    }
}
