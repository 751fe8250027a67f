//! The SQLite ledger: the live accounts in memory, every settlement persisted to a SQLite file
//! by one writer thread with group commit.
//!
//! Durability window: a settlement is committed at most `GROUP_COMMIT_WINDOW` (20 ms) plus one
//! commit after it happens, well under 100 ms, on a host with CPU to spare (the writer runs at
//! nice 10: on one saturated by other work, commits come later and larger). The database runs
//! in WAL mode with `synchronous = NORMAL`: a commit survives `kill -9` of the gateway (it is in
//! the OS's hands); only a power loss can take the last commits. The `spend` table follows the
//! records by up to a second ([`spend`]); at start, only the records it does not count yet are
//! read (a second's worth after a crash, none after a clean stop): an account's current-period
//! spend is read back on its first use; reservations are not stored, so a crash drops them.

mod spend;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use writer::{Write, WRITER_THREAD};

use super::accounts::Accounts;
use super::rollup::{self, HourQuery, HourRow};
use super::{
    Account, BoxFuture, Budget, Budgets, Ledger, LedgerError, Left, PeriodSpend, RequestRecord, Reserve, Totals,
};
use crate::cost::Usd;
use crate::telemetry::RequestId;

/// The `requests` table's columns, in the order rows are written and read.
const REQUEST_COLUMN_LIST: &str =
    "at_ms, user, route, backend, reason, prompt_tokens, completion_tokens, cost_pico, status, latency_ms";

pub struct SqliteLedger {
    accounts: Arc<Accounts>,
    /// `Sender` is `Sync`: settlements from every worker send without a lock of ours.
    writer: mpsc::Sender<Write>,
    path: String,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger").field("path", &self.path).finish_non_exhaustive()
    }
}

fn storage(context: &str) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |e| LedgerError::Storage(format!("{context}: {e}"))
}

/// A connection for one read on one thread: SQLite's own per-call mutex (its default,
/// serialized mode) cost ~9% of the users table's build in locking around every column read.
pub(crate) fn open_read_only<P: AsRef<Path>>(path: P) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
}

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
    PRAGMA cache_size = -32768;
    CREATE TABLE IF NOT EXISTS spend (
        user TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        backend TEXT NOT NULL,
        spent_pico INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        PRIMARY KEY (user, period_start, backend)
    );
    CREATE TABLE IF NOT EXISTS requests (
        at_ms INTEGER NOT NULL,
        user TEXT NOT NULL,
        route TEXT NOT NULL,
        backend TEXT NOT NULL,
        reason TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_pico INTEGER NOT NULL,
        status INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS requests_at_user ON requests (at_ms, user);
    CREATE INDEX IF NOT EXISTS spend_period ON spend (period_start);
";

impl SqliteLedger {
    /// Opens (or creates) the database at `path` and reads back the current spend.
    pub fn open(path: &Path, retention: Duration) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LedgerError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let display = path.display().to_string();
        let mut conn = Connection::open(path).map_err(storage(&display))?;
        conn.execute_batch(SCHEMA).map_err(storage(&display))?;
        spend::migrate(&mut conn).map_err(storage(&display))?;
        let folded = spend::fold_unfolded(&mut conn).map_err(storage(&display))?;
        if folded > 0 {
            tracing::info!(records = folded, "spend of the records written just before a stop folded in");
        }
        let reader = Mutex::new(Connection::open(path).map_err(storage(&display))?);
        let accounts =
            Arc::new(Accounts::with_loader(Box::new(move |account, start| match load(&reader, account, start) {
                Ok(found) => found,
                Err(e) => {
                    // Refusing would lose nothing but availability; starting the account from
                    // zero could overspend its budget by what it spent. Say so loudly.
                    tracing::error!(error = %e, account, "reading an account's spend back failed; it starts from zero");
                    None
                }
            })));
        let (tx, rx) = mpsc::channel();
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn({
                let accounts = Arc::clone(&accounts);
                move || writer::write_loop(conn, rx, retention_ms, &accounts)
            })
            .map_err(|e| LedgerError::Storage(format!("cannot start the ledger writer: {e}")))?;
        Ok(Self { accounts, writer: tx, path: display })
    }

    fn send(&self, write: Write) -> bool {
        self.writer.send(write).is_ok()
    }
}

/// An account's spend in one period, read from the file on its first use: one indexed query
/// (the `spend` table's key starts with account and period), under that account's lock only.
fn load(conn: &Mutex<Connection>, account: &str, period_start: i64) -> rusqlite::Result<Option<Account>> {
    let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
    let mut statement = conn.prepare_cached(
        "SELECT backend, spent_pico, requests, prompt_tokens, completion_tokens
         FROM spend WHERE user = ?1 AND period_start = ?2",
    )?;
    let rows = statement.query_map(params![account, period_start], |row| {
        let totals = Totals {
            spent: Usd::from_pico(row.get(1)?),
            requests: row.get::<_, i64>(2)?.try_into().unwrap_or(0),
            prompt_tokens: row.get::<_, i64>(3)?.try_into().unwrap_or(0),
            completion_tokens: row.get::<_, i64>(4)?.try_into().unwrap_or(0),
        };
        Ok((row.get::<_, String>(0)?, totals))
    })?;
    let mut found: Option<Account> = None;
    for row in rows {
        let (backend, totals) = row?;
        let account = found.get_or_insert_with(|| Account::new(period_start));
        account.totals.spent = account.totals.spent.saturating_add(totals.spent);
        account.totals.requests += totals.requests;
        account.totals.prompt_tokens += totals.prompt_tokens;
        account.totals.completion_tokens += totals.completion_tokens;
        account.by_backend.insert(&backend, totals);
    }
    Ok(found)
}

/// Users' accounts in the periods that hold `now`: the `spend` rows of today, this month and
/// `total` (an index on `period_start` finds them), per user and period. Grouped here rather
/// than by `ORDER BY`, which sorted every row in a temporary B-tree first.
fn read_standings(path: &str, now: i64) -> rusqlite::Result<Vec<super::Standing>> {
    use crate::config::BudgetPeriod;
    let conn = open_read_only(path)?;
    let mut statement = conn.prepare(
        "SELECT user, period_start, backend, spent_pico, requests, prompt_tokens, completion_tokens FROM spend
         WHERE period_start IN (?1, ?2, 0) AND user NOT LIKE '~%'",
    )?;
    let day = super::period::start(BudgetPeriod::Day, now);
    let month = super::period::start(BudgetPeriod::Month, now);
    let mut rows = statement.query(params![day, month])?;
    let mut out: Vec<super::Standing> = Vec::new();
    let mut found: HashMap<i64, HashMap<Arc<str>, usize>> = HashMap::new();
    while let Some(row) = rows.next()? {
        let user =
            row.get_ref(0)?.as_str().map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, Type::Text, e.into()))?;
        let period_start: i64 = row.get(1)?;
        let totals = Totals {
            spent: Usd::from_pico(row.get(3)?),
            requests: row.get::<_, i64>(4)?.try_into().unwrap_or(0),
            prompt_tokens: row.get::<_, i64>(5)?.try_into().unwrap_or(0),
            completion_tokens: row.get::<_, i64>(6)?.try_into().unwrap_or(0),
        };
        let of_period = found.entry(period_start).or_default();
        let at = match of_period.get(user) {
            Some(&at) => at,
            None => {
                let user: Arc<str> = user.into();
                out.push(super::Standing { user: Arc::clone(&user), account: Account::new(period_start) });
                of_period.insert(user, out.len() - 1);
                out.len() - 1
            }
        };
        if let Some(standing) = out.get_mut(at) {
            let account = &mut standing.account;
            account.totals.spent = account.totals.spent.saturating_add(totals.spent);
            account.totals.requests += totals.requests;
            account.totals.prompt_tokens += totals.prompt_tokens;
            account.totals.completion_tokens += totals.completion_tokens;
            account.by_backend.insert(&row.get::<_, String>(2)?, totals);
        }
    }
    Ok(out)
}

impl Ledger for SqliteLedger {
    fn reserve<'a>(
        &'a self,
        budgets: &'a Budgets,
        amount: Usd,
        now: i64,
    ) -> BoxFuture<'a, Result<Reserve, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.reserve(budgets, amount, now))))
    }

    fn release(&self, budgets: &Budgets, _id: u64, amount: Usd, now: i64) {
        self.accounts.release(budgets, amount, now);
    }

    fn settle(&self, budgets: &Budgets, _id: u64, reserved: Usd, record: RequestRecord, now: i64) {
        let periods = self.accounts.settle(budgets, reserved, &record, now);
        let accounts = budgets.iter().zip(periods).map(|(b, start)| (Arc::clone(&b.account), start)).collect();
        if !self.send(Write::Settled { accounts, record }) {
            tracing::error!(account = %budgets.user().account, "ledger writer is gone: a settlement was not persisted");
        }
    }

    fn remaining<'a>(&'a self, budgets: &'a Budgets, now: i64) -> BoxFuture<'a, Result<Option<Left>, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.remaining(budgets, now))))
    }

    fn usage<'a>(&'a self, budget: &'a Budget, now: i64) -> BoxFuture<'a, Result<Account, LedgerError>> {
        Box::pin(std::future::ready(Ok(self.accounts.snapshot(budget, now))))
    }

    fn records(&self, limit: usize) -> BoxFuture<'_, Result<Vec<RequestRecord>, LedgerError>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_records(&path, limit))
                .await
                .map_err(|e| LedgerError::Storage(e.to_string()))?
                .map_err(storage("reading request records"))
        })
    }

    fn user_records<'a>(
        &'a self,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<RequestRecord>, LedgerError>> {
        let (path, user) = (self.path.clone(), user.to_owned());
        Box::pin(async move {
            // What settled so far, records and rollups, is in the file first.
            self.flush().await?;
            tokio::task::spawn_blocking(move || read_user_records(&path, &user, limit))
                .await
                .map_err(|e| LedgerError::Storage(e.to_string()))?
                .map_err(storage("reading a user's request records"))
        })
    }

    fn in_process(&self) -> Option<&Accounts> {
        Some(self.accounts.as_ref())
    }

    fn hourly(&self, query: HourQuery) -> BoxFuture<'_, Result<Vec<HourRow>, LedgerError>> {
        let path = self.path.clone();
        Box::pin(async move {
            // What settled so far is in the tables first.
            self.flush().await?;
            tokio::task::spawn_blocking(move || {
                let conn = open_read_only(&path)?;
                spend::read_hourly(&conn, &query)
            })
            .await
            .map_err(|e| LedgerError::Storage(e.to_string()))?
            .map_err(storage("reading hourly rollups"))
        })
    }

    fn standings(&self, now: i64) -> BoxFuture<'_, Result<Vec<super::Standing>, LedgerError>> {
        let path = self.path.clone();
        Box::pin(async move {
            // What settled so far is in the file first.
            self.flush().await?;
            tokio::task::spawn_blocking(move || read_standings(&path, now))
                .await
                .map_err(|e| LedgerError::Storage(e.to_string()))?
                .map_err(storage("reading users' spend"))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), LedgerError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(Write::Flush(tx));
        Box::pin(async move {
            if !sent {
                return Err(LedgerError::Storage("ledger writer is gone".into()));
            }
            rx.await.map_err(|_| LedgerError::Storage("ledger writer is gone".into()))?.map_err(LedgerError::Storage)
        })
    }
}

/// What `tollgate report` reads from a ledger file, without opening it for writing (a running
/// gateway may hold it; WAL lets both work): the spend of every user's periods, after handing
/// `each` the request records since `since_ms`, oldest first, one at a time (a busy ledger
/// holds hundreds of millions).
pub fn read_report(
    path: &Path,
    since_ms: i64,
    mut each: impl FnMut(RequestRecord),
) -> Result<Vec<PeriodSpend>, LedgerError> {
    let (conn, display) = open_for_report(path)?;
    let mut read = || -> rusqlite::Result<_> {
        let mut statement = conn
            .prepare(&format!("SELECT {REQUEST_COLUMN_LIST} FROM requests WHERE at_ms >= ?1 ORDER BY at_ms, rowid"))?;
        for record in statement.query_map(params![since_ms], record_from_row)? {
            each(record?);
        }
        spend::read_all(&conn)
    };
    read().map_err(storage(&display))
}

/// When the ledger file's oldest request record arrived (Unix ms); `None` when it has none.
pub fn first_record_at(path: &Path) -> Result<Option<i64>, LedgerError> {
    let (conn, display) = open_for_report(path)?;
    conn.query_row("SELECT MIN(at_ms) FROM requests", [], |row| row.get(0)).map_err(storage(&display))
}

fn open_for_report(path: &Path) -> Result<(Connection, String), LedgerError> {
    let display = path.display().to_string();
    if !path.exists() {
        return Err(LedgerError::Storage(format!("{display}: no ledger file (has the gateway run with this config?)")));
    }
    let conn = open_read_only(path).map_err(storage(&display))?;
    Ok((conn, display))
}

/// A row of `{REQUEST_COLUMN_LIST}` (and `request_id` after them, when selected).
pub(super) fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRecord> {
    Ok(RequestRecord {
        at_ms: row.get(0)?,
        user: row.get(1)?,
        route: row.get(2)?,
        backend: row.get(3)?,
        reason: row.get::<_, String>(4)?.into(),
        prompt_tokens: row.get::<_, i64>(5)?.try_into().unwrap_or(0),
        completion_tokens: row.get::<_, i64>(6)?.try_into().unwrap_or(0),
        cost: Usd::from_pico(row.get(7)?),
        status: row.get(8)?,
        latency_ms: row.get::<_, i64>(9)?.try_into().unwrap_or(0),
        request_id: row.get::<_, Option<String>>(10).ok().flatten().as_deref().and_then(RequestId::from_stored),
    })
}

/// Hours of a user's traffic [`read_user_records`] looks through at most.
const USER_HOURS_SEARCHED: i64 = 24 * 31;

/// `user`'s last `limit` records, oldest first. The rollups say which hours the user had
/// traffic in and how many requests in each; each such hour, newest first, is read through the
/// time index, which carries the user (`requests_at_user`), so the other users' records of the
/// hour are skipped in the index and the scan stops at the hour's count. No index led by the
/// user: inserting into it at random places cost the writer ~8x per record (docs/PERFORMANCE.md).
fn read_user_records(path: &str, user: &str, limit: usize) -> rusqlite::Result<Vec<RequestRecord>> {
    let conn = open_read_only(path)?;
    let mut hours = conn.prepare_cached(
        "SELECT hour, SUM(requests) FROM hourly_user WHERE user = ?1 GROUP BY hour ORDER BY hour DESC LIMIT ?2",
    )?;
    let hours: Vec<(i64, i64)> = hours
        .query_map(params![user, USER_HOURS_SEARCHED], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut in_hour = conn.prepare_cached(&format!(
        "SELECT {REQUEST_COLUMN_LIST}, request_id FROM requests
         WHERE at_ms >= ?1 AND at_ms < ?2 AND user = ?3 ORDER BY at_ms DESC, rowid DESC LIMIT ?4"
    ))?;
    let mut newest_first = Vec::new();
    for (hour, requests) in hours {
        let left = i64::try_from(limit.saturating_sub(newest_first.len())).unwrap_or(i64::MAX);
        if left == 0 {
            break;
        }
        let (from_ms, to_ms) = (hour.saturating_mul(1000), hour.saturating_add(rollup::HOUR_S).saturating_mul(1000));
        let rows = in_hour.query_map(params![from_ms, to_ms, user, left.min(requests.max(1))], record_from_row)?;
        for row in rows {
            newest_first.push(row?);
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

fn read_records(path: &str, limit: usize) -> rusqlite::Result<Vec<RequestRecord>> {
    let conn = Connection::open(path)?;
    let mut statement =
        conn.prepare(&format!("SELECT {REQUEST_COLUMN_LIST}, request_id FROM requests ORDER BY rowid DESC LIMIT ?1"))?;
    let rows = statement.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], record_from_row)?;
    let mut records = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    records.reverse();
    Ok(records)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::BudgetPeriod;
    use crate::ledger::Scope;

    fn user(name: &str) -> Budgets {
        Budgets::from_levels([Budget::new(
            Scope::User,
            name.into(),
            Some(Usd::from_pico(1_000_000)),
            BudgetPeriod::Day,
        )])
    }

    /// The writer thread runs at a lower priority than the request workers.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_thread_yields_to_request_handling() {
        let dir = tempfile::tempdir().unwrap();
        let _ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(60)).unwrap();
        // Other tests' ledgers have writer threads too, starting and ending: read what can be.
        let writer_nices = || -> Vec<i32> {
            let tasks = std::fs::read_dir("/proc/self/task").unwrap();
            tasks
                .filter_map(|task| {
                    let task = task.ok()?.path();
                    let comm = std::fs::read_to_string(task.join("comm")).ok()?;
                    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
                    // Fields after the command's closing parenthesis; nice is the 19th field.
                    let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()?;
                    (comm.trim() == WRITER_THREAD).then_some(nice)
                })
                .collect()
        };
        // The thread lowers its own priority as it starts: give it up to 5 s.
        for _ in 0..1000 {
            if writer_nices().contains(&crate::background::NICE) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(writer_nices().contains(&crate::background::NICE), "writer threads' nice values: {:?}", writer_nices());
    }

    /// A window's records go in by statements of many rows and one statement per leftover:
    /// every record must come back whole and in order, whatever the batch's size.
    #[tokio::test]
    async fn a_window_of_records_larger_than_one_insert_comes_back_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(86_400)).unwrap();
        let now = crate::clock::unix_now();
        let alice = user("alice");
        let count = 2 * writer::ROWS_PER_INSERT + 5;
        for i in 0..count {
            let Reserve::Reserved { id, .. } = ledger.reserve(&alice, Usd::from_pico(10), now).await.unwrap() else {
                panic!("within budget")
            };
            let n = u64::try_from(i).unwrap();
            let record = RequestRecord {
                at_ms: now * 1000 + i64::try_from(i).unwrap(),
                user: Arc::clone(&alice.user().account),
                route: format!("route-{i}").into(),
                backend: ["a", "b"][i % 2].into(),
                reason: if i % 3 == 0 { "fallback:a".to_owned().into() } else { "cost-first".into() },
                prompt_tokens: n,
                completion_tokens: 2 * n,
                cost: Usd::from_pico(i64::try_from(i).unwrap()),
                status: if i == count - 1 { 499 } else { 200 },
                latency_ms: 3 * n,
                request_id: RequestId::from_stored(&format!("req-{n}")),
            };
            ledger.settle(&alice, id, Usd::from_pico(10), record, now);
        }
        ledger.flush().await.unwrap();
        let records = ledger.records(1000).await.unwrap();
        assert_eq!(records.len(), count);
        for (i, r) in records.iter().enumerate() {
            let n = u64::try_from(i).unwrap();
            assert_eq!(r.at_ms, now * 1000 + i64::try_from(i).unwrap());
            assert_eq!((&*r.user, &*r.route, &*r.backend), ("alice", &*format!("route-{i}"), ["a", "b"][i % 2]));
            assert_eq!(r.reason, if i % 3 == 0 { "fallback:a" } else { "cost-first" });
            assert_eq!((r.prompt_tokens, r.completion_tokens, r.latency_ms), (n, 2 * n, 3 * n));
            assert_eq!(r.cost, Usd::from_pico(i64::try_from(i).unwrap()));
            assert_eq!(r.status, if i == count - 1 { 499 } else { 200 });
            assert_eq!(r.request_id.as_ref().map(RequestId::as_str), Some(&*format!("req-{n}")));
        }
    }

    /// Idle accounts leave memory and come back from the file with their spend; an account
    /// with a reservation out stays, whatever its idleness.
    #[tokio::test]
    async fn an_evicted_account_comes_back_from_the_file_with_its_spend() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(86_400)).unwrap();
        let now = crate::clock::unix_now();
        let (alice, bob) = (user("alice"), user("bob"));
        let Reserve::Reserved { id, .. } = ledger.reserve(&alice, Usd::from_pico(100), now).await.unwrap() else {
            panic!("within budget")
        };
        ledger.settle(&alice, id, Usd::from_pico(100), record(&alice, "a", 70, now * 1000), now);
        let Reserve::Reserved { .. } = ledger.reserve(&bob, Usd::from_pico(500), now).await.unwrap() else {
            panic!("within budget")
        };
        ledger.flush().await.unwrap();
        assert_eq!(ledger.accounts.live_count(), 2);

        assert_eq!(ledger.accounts.evict_idle(now + 10), 1, "alice is idle and settled; bob holds a reservation");
        assert_eq!(ledger.accounts.live_count(), 1);
        let left = ledger.remaining(&alice, now).await.unwrap().unwrap();
        assert_eq!(left.usd, Usd::from_pico(1_000_000 - 70), "alice's spend read back from the file");
        assert_eq!(ledger.remaining(&bob, now).await.unwrap().unwrap().usd, Usd::from_pico(1_000_000 - 500));
        assert_eq!(ledger.accounts.evict_idle(now - 10), 0, "nothing is idle since before its last use");
    }

    fn record(user: &Budgets, backend: &str, pico: i64, at_ms: i64) -> RequestRecord {
        RequestRecord {
            at_ms,
            user: Arc::clone(&user.user().account),
            route: "auto".into(),
            backend: backend.into(),
            reason: "quality-first".into(),
            prompt_tokens: 10,
            completion_tokens: 1,
            cost: Usd::from_pico(pico),
            status: 200,
            latency_ms: 1,
            request_id: None,
        }
    }

    /// A crash after a window's records were committed and before the second's sums were: the
    /// report counts them as it reads, and the next open folds them into the spend, once.
    #[tokio::test]
    async fn records_committed_before_their_spend_count_in_the_report_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let retention = Duration::from_secs(86_400);
        let now = crate::clock::unix_now();
        let alice = user("alice");
        let start = crate::ledger::period::start(BudgetPeriod::Day, now);
        drop(SqliteLedger::open(&path, retention).unwrap());
        // What the writer commits in a window, without the sums (as if killed before them).
        let mut conn = Connection::open(&path).unwrap();
        let levels: writer::Levels = smallvec::smallvec![("alice".into(), start)];
        let batch: Vec<Write> = [30, 12]
            .into_iter()
            .map(|pico| Write::Settled { accounts: levels.clone(), record: record(&alice, "a", pico, now * 1000) })
            .collect();
        writer::commit(&mut conn, &batch, None).unwrap();
        drop(conn);

        let spend = read_report(&path, 0, drop).unwrap();
        let alice_spend: Vec<_> = spend.iter().filter(|s| s.user == "alice").collect();
        assert_eq!(alice_spend.len(), 1);
        assert_eq!((alice_spend[0].period_start, alice_spend[0].spent), (start, Usd::from_pico(42)));

        let reopened = SqliteLedger::open(&path, retention).unwrap();
        assert_eq!(reopened.remaining(&alice, now).await.unwrap().unwrap().usd, Usd::from_pico(1_000_000 - 42));
        drop(reopened);
        let again = SqliteLedger::open(&path, retention).unwrap();
        assert_eq!(
            again.remaining(&alice, now).await.unwrap().unwrap().usd,
            Usd::from_pico(1_000_000 - 42),
            "folded once, not at every open"
        );
    }

    /// A ledger file from before records carried their levels: its spend already counts its
    /// records, so opening it adds the column and counts nothing twice.
    #[tokio::test]
    async fn a_ledger_file_from_before_opens_without_counting_its_records_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let now = crate::clock::unix_now();
        let start = crate::ledger::period::start(BudgetPeriod::Day, now);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute(
            &format!(
                "INSERT INTO requests ({REQUEST_COLUMN_LIST}) VALUES (?1, 'alice', 'auto', 'a', 'x', 1, 1, 25, 200, 1)"
            ),
            params![now * 1000],
        )
        .unwrap();
        conn.execute("INSERT INTO spend VALUES ('alice', ?1, 'a', 25, 1, 1, 1)", params![start]).unwrap();
        drop(conn);
        let ledger = SqliteLedger::open(&path, Duration::from_secs(86_400)).unwrap();
        assert_eq!(ledger.remaining(&user("alice"), now).await.unwrap().unwrap().usd, Usd::from_pico(1_000_000 - 25));
        assert_eq!(ledger.records(10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn settlements_committed_together_add_up_per_user_and_backend_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let retention = Duration::from_secs(86_400);
        let now = crate::clock::unix_now();
        let (alice, bob) = (user("alice"), user("bob"));
        let ledger = SqliteLedger::open(&path, retention).unwrap();
        // One group-commit window: the batch holds several rows per (user, backend).
        for (who, backend, pico) in
            [(&alice, "a", 1), (&alice, "a", 2), (&alice, "b", 4), (&bob, "a", 8), (&alice, "a", 16)]
        {
            let Reserve::Reserved { id, .. } = ledger.reserve(who, Usd::from_pico(100), now).await.unwrap() else {
                panic!("within budget")
            };
            ledger.settle(who, id, Usd::from_pico(100), record(who, backend, pico, now * 1000), now);
        }
        ledger.flush().await.unwrap();
        drop(ledger);

        let reopened = SqliteLedger::open(&path, retention).unwrap();
        let account = reopened.usage(alice.user(), now).await.unwrap();
        assert_eq!(account.totals.spent, Usd::from_pico(23));
        assert_eq!(
            (account.totals.requests, account.totals.prompt_tokens, account.totals.completion_tokens),
            (4, 40, 4)
        );
        assert_eq!(account.by_backend["a"].spent, Usd::from_pico(19));
        assert_eq!(account.by_backend["a"].requests, 3);
        assert_eq!(account.by_backend["b"].requests, 1);
        let account = reopened.usage(bob.user(), now).await.unwrap();
        assert_eq!((account.totals.spent, account.totals.requests), (Usd::from_pico(8), 1));
        assert_eq!(reopened.records(10).await.unwrap().len(), 5);
    }

    /// The hourly rollups read back what was settled, per user and for everyone, after a
    /// flush and after a crash that left a window's sums out (folded in at the next open, once).
    #[tokio::test]
    async fn hourly_rollups_equal_the_settled_records_across_a_crash() {
        use crate::ledger::rollup::{HourQuery, Rollups};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let retention = Duration::from_secs(86_400);
        let now = crate::clock::unix_now();
        let (alice, bob) = (user("alice"), user("bob"));
        let mut reference = Rollups::default();
        let ledger = SqliteLedger::open(&path, retention).unwrap();
        for (i, (who, backend)) in [(&alice, "a"), (&alice, "b"), (&bob, "a"), (&alice, "a")].into_iter().enumerate() {
            let i = i64::try_from(i).unwrap();
            // Two hours: the first two records an hour before the others.
            let at_ms = (now - if i < 2 { 3600 } else { 0 }) * 1000;
            let mut r = record(who, backend, 1 + i, at_ms);
            r.status = if i == 2 { 502 } else { 200 };
            r.latency_ms = 100 * u64::try_from(i + 1).unwrap();
            reference.add(&r);
            ledger.settle(who, 0, Usd::ZERO, r, now);
        }
        let everyone = HourQuery { user: None, from: now - 7200, to: now + 3600 };
        let just_alice = HourQuery { user: Some("alice".into()), ..everyone.clone() };
        assert_eq!(ledger.hourly(everyone.clone()).await.unwrap(), reference.read(&everyone));
        assert_eq!(ledger.hourly(just_alice.clone()).await.unwrap(), reference.read(&just_alice));
        assert_eq!(reference.read(&everyone).iter().map(|r| r.sums.errors).sum::<u64>(), 1);
        drop(ledger);

        // A window committed without its sums, as a kill -9 between the two leaves it.
        let mut conn = Connection::open(&path).unwrap();
        let start = crate::ledger::period::start(BudgetPeriod::Day, now);
        let levels: writer::Levels = smallvec::smallvec![("bob".into(), start)];
        let late = record(&bob, "b", 64, now * 1000);
        reference.add(&late);
        writer::commit(&mut conn, &[Write::Settled { accounts: levels, record: late }], None).unwrap();
        drop(conn);
        for _ in 0..2 {
            let reopened = SqliteLedger::open(&path, retention).unwrap();
            assert_eq!(reopened.hourly(everyone.clone()).await.unwrap(), reference.read(&everyone));
            let just_bob = HourQuery { user: Some("bob".into()), ..everyone.clone() };
            assert_eq!(reopened.hourly(just_bob.clone()).await.unwrap(), reference.read(&just_bob));
        }
    }

    /// A ledger file from before the rollups gets them from the records it holds, at open.
    #[tokio::test]
    async fn a_ledger_file_from_before_the_rollups_fills_them_from_its_records() {
        use crate::ledger::rollup::{HourQuery, Rollups};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let now = crate::clock::unix_now();
        let ledger = SqliteLedger::open(&path, Duration::from_secs(86_400)).unwrap();
        let alice = user("alice");
        let mut reference = Rollups::default();
        for (backend, pico) in [("a", 5), ("b", 7), ("a", 11)] {
            let r = record(&alice, backend, pico, now * 1000);
            reference.add(&r);
            ledger.settle(&alice, 0, Usd::ZERO, r, now);
        }
        ledger.flush().await.unwrap();
        drop(ledger);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE hourly_user; DROP TABLE hourly_backend;
             DROP INDEX requests_at_user; CREATE INDEX requests_at ON requests (at_ms);",
        )
        .unwrap();
        drop(conn);
        let reopened = SqliteLedger::open(&path, Duration::from_secs(86_400)).unwrap();
        let conn = Connection::open(&path).unwrap();
        let indices: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indices, ["requests_at_user"], "the time index now carries the user");
        let query = HourQuery { user: None, from: now - 3600, to: now + 3600 };
        assert_eq!(reopened.hourly(query.clone()).await.unwrap(), reference.read(&query));
        let alice_only = HourQuery { user: Some("alice".into()), ..query };
        assert_eq!(reopened.hourly(alice_only.clone()).await.unwrap(), reference.read(&alice_only));
    }

    /// A user's recent records are found through its hours in the rollups, newest hours
    /// first, whatever the other users sent since.
    #[tokio::test]
    async fn a_users_recent_records_come_from_its_own_hours_newest_last() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(86_400)).unwrap();
        let now = crate::clock::unix_now();
        let (alice, bob) = (user("alice"), user("bob"));
        // Alice: two records three hours ago, one an hour ago; Bob: many since.
        for (who, at) in [(&alice, now - 3 * 3600), (&alice, now - 3 * 3600 + 1), (&alice, now - 3600)] {
            ledger.settle(who, 0, Usd::ZERO, record(who, "a", 1, at * 1000), now);
        }
        for i in 0..50 {
            ledger.settle(&bob, 0, Usd::ZERO, record(&bob, "a", 1, (now - 3 * 3600 + i * 200) * 1000), now);
        }
        let at = |records: Vec<RequestRecord>| records.iter().map(|r| r.at_ms / 1000 - now).collect::<Vec<_>>();
        assert_eq!(at(ledger.user_records("alice", 10).await.unwrap()), [-3 * 3600, -3 * 3600 + 1, -3600]);
        assert_eq!(at(ledger.user_records("alice", 2).await.unwrap()), [-3 * 3600 + 1, -3600]);
        assert_eq!(ledger.user_records("bob", 7).await.unwrap().len(), 7);
        assert!(ledger.user_records("carol", 7).await.unwrap().is_empty());
    }
}
