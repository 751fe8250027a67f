//! The SQLite ledger: the live accounts in memory, every settlement persisted to a SQLite file
//! by one writer thread with group commit.
//!
//! Durability window: a settlement is committed at most `GROUP_COMMIT_WINDOW` (20 ms) plus one
//! commit after it happens, well under 100 ms, on a host with CPU to spare (the writer runs at
//! nice 10: on one saturated by other work, commits come later and larger). The database runs
//! in WAL mode with `synchronous = NORMAL`: a commit survives `kill -9` of the gateway (it is in
//! the OS's hands); only a power loss can take the last commits. Nothing is read at start: an
//! account's current-period spend is read back on its first use; reservations are not stored,
//! so a crash drops them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc, Arc, LazyLock, Mutex, PoisonError};

use smallvec::SmallVec;
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use super::accounts::Accounts;
use super::{
    Account, BoxFuture, Budget, Budgets, Ledger, LedgerError, Left, PeriodSpend, RequestRecord, Reserve, Totals,
};
use crate::cost::Usd;

const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(20);
/// How often old request records are pruned and idle accounts dropped from memory.
const SWEEP_EVERY_S: i64 = 60;
/// An account unused this long, with nothing reserved, leaves memory (its spend is in the
/// file, read back on its next use): memory follows the accounts in use, not every account
/// used since the start.
const EVICT_IDLE_S: i64 = 300;
/// Margin between an account's last use and the writer's last commit before eviction: the
/// settlement follows the account's last lock within microseconds, never seconds.
const EVICT_MARGIN_S: i64 = 2;
/// The writer thread's name, as `ps -T` and `/proc/<pid>/task/*/comm` show it.
const WRITER_THREAD: &str = "tollgate-ledger";
/// The writer's niceness (Linux): see [`yield_to_requests`].
const WRITER_NICE: i32 = 10;

enum Write {
    /// A settled request: its record, and the cost booked in each level's account and period.
    Settled {
        accounts: SmallVec<[(Arc<str>, i64); 3]>,
        record: RequestRecord,
    },
    Flush(oneshot::Sender<Result<(), String>>),
}

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
    CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);
";

impl SqliteLedger {
    /// Opens (or creates) the database at `path` and reads back the current spend.
    pub fn open(path: &Path, retention: Duration) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LedgerError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let display = path.display().to_string();
        let conn = Connection::open(path).map_err(storage(&display))?;
        conn.execute_batch(SCHEMA).map_err(storage(&display))?;
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
                move || write_loop(conn, rx, retention_ms, &accounts)
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
        account.by_backend.insert(backend, totals);
    }
    Ok(found)
}

/// Users by spend in their current period: the rows of today, this month and `total`, summed
/// per user (a user's rows are those of its own period).
fn read_ranking(path: &str, now: i64, limit: usize) -> rusqlite::Result<super::Ranking> {
    use crate::config::BudgetPeriod;
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut statement = conn.prepare(
        "SELECT user, SUM(spent_pico) AS spent FROM spend
         WHERE period_start IN (?1, ?2, 0) AND user NOT LIKE '~%'
         GROUP BY user, period_start HAVING spent > 0 ORDER BY spent DESC, user LIMIT ?3",
    )?;
    let day = super::period::start(BudgetPeriod::Day, now);
    let month = super::period::start(BudgetPeriod::Month, now);
    let rows = statement.query_map(params![day, month, i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
        Ok((Arc::from(row.get::<_, String>(0)?.as_str()), Usd::from_pico(row.get(1)?)))
    })?;
    let mut ranked: super::Ranking = rows.collect::<rusqlite::Result<_>>()?;
    // A user on a day period has rows on the 1st's day and month starts alike: keep its first.
    let mut seen = std::collections::HashSet::new();
    ranked.retain(|(name, _)| seen.insert(Arc::clone(name)));
    Ok(ranked)
}

/// Lowers the calling thread's priority. A commit takes a core for a few hundred µs every
/// window; at normal priority it preempted request handling, and on a 2-core machine that cost
/// ~20 µs of every request's p50 at concurrency 1 (same-run A/B; a thread spinning as long did
/// the same). At nice 10 it runs on a core that requests leave idle, and under saturation it
/// still gets the few percent of a core it needs: a late batch is only a larger one.
fn yield_to_requests() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), WRITER_NICE) {
        tracing::debug!(error = %e, "the ledger writer keeps its priority");
    }
}

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Write>, retention_ms: i64, accounts: &Accounts) {
    yield_to_requests();
    let mut last_sweep = crate::clock::unix_now();
    // Everything settled before this (Unix seconds) is committed: what eviction needs.
    let (mut durable_through, mut last_commit_ok) = (i64::MIN, true);
    // Kept from one window to the next: under load a batch is hundreds of settlements, and
    // growing a new vector to that size every window was ~5% of this thread's time.
    let mut batch = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(SWEEP_EVERY_S.unsigned_abs())) {
            Ok(first) => {
                // Sleep through the window, then take everything that came: while this thread
                // is not blocked in `recv`, a settlement's `send` wakes nobody. Waiting in
                // `recv_timeout` instead cost every request a futex wake and two context
                // switches under load.
                std::thread::sleep(GROUP_COMMIT_WINDOW);
                let drained_at = crate::clock::unix_now();
                batch.push(first);
                batch.extend(rx.try_iter());
                let result = commit(&mut conn, &batch).map_err(|e| e.to_string());
                last_commit_ok = result.is_ok();
                match &result {
                    Ok(()) => durable_through = drained_at,
                    Err(e) => tracing::error!(error = %e, "ledger commit failed"),
                }
                for write in batch.drain(..) {
                    if let Write::Flush(done) = write {
                        let _ = done.send(result.clone());
                    }
                }
            }
            // Nothing came for a while: what came before is committed, if its commit was.
            Err(mpsc::RecvTimeoutError::Timeout) if last_commit_ok => durable_through = crate::clock::unix_now(),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = crate::clock::unix_now();
        if now - last_sweep >= SWEEP_EVERY_S {
            last_sweep = now;
            let oldest = crate::clock::unix_now_ms().saturating_sub(retention_ms);
            if let Err(e) = conn.execute("DELETE FROM requests WHERE at_ms < ?1", params![oldest]) {
                tracing::warn!(error = %e, "pruning old request records failed");
            }
            let idle_before =
                (crate::clock::unix_now() - EVICT_IDLE_S).min(durable_through.saturating_sub(EVICT_MARGIN_S));
            let evicted = accounts.evict_idle(idle_before);
            tracing::debug!(evicted, live = accounts.live_count(), "idle accounts left memory");
        }
    }
}

/// A batch's spend per (user, period, backend): one upsert each instead of one per request.
#[derive(Default)]
struct SpendDelta {
    spent_pico: i64,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

/// Request records inserted by one statement: per-statement work (stepping in and out of the
/// VM, resetting, the statement's own checks) is paid once per this many rows.
const ROWS_PER_INSERT: usize = 32;
/// The `requests` table's columns, in the order rows are written and read.
const REQUEST_COLUMN_LIST: &str =
    "at_ms, user, route, backend, reason, prompt_tokens, completion_tokens, cost_pico, status, latency_ms";
/// How many there are, as bound per row.
const REQUEST_COLUMNS: usize = 10;

static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_requests_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_requests_sql(1));

/// `INSERT INTO requests ... VALUES (...), (...), ...` for `rows` rows.
fn insert_requests_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; REQUEST_COLUMNS].join(","));
    format!("INSERT INTO requests ({REQUEST_COLUMN_LIST}) VALUES {}", vec![row; rows].join(","))
}

/// A count as SQLite's integer (which is signed), saturated.
fn integer(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Binds `r` as the row starting at parameter `first` (1-based).
fn bind_request(
    statement: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    r: &RequestRecord,
) -> rusqlite::Result<()> {
    statement.raw_bind_parameter(first, r.at_ms)?;
    statement.raw_bind_parameter(first + 1, &*r.user)?;
    statement.raw_bind_parameter(first + 2, &*r.route)?;
    statement.raw_bind_parameter(first + 3, &*r.backend)?;
    statement.raw_bind_parameter(first + 4, r.reason.as_ref())?;
    statement.raw_bind_parameter(first + 5, integer(r.prompt_tokens))?;
    statement.raw_bind_parameter(first + 6, integer(r.completion_tokens))?;
    statement.raw_bind_parameter(first + 7, r.cost.pico())?;
    statement.raw_bind_parameter(first + 8, r.status)?;
    statement.raw_bind_parameter(first + 9, integer(r.latency_ms))?;
    Ok(())
}

fn commit(conn: &mut Connection, batch: &[Write]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut spend: HashMap<(&str, i64, &str), SpendDelta> = HashMap::new();
        let mut records = Vec::with_capacity(batch.len());
        for write in batch {
            let Write::Settled { accounts, record: r } = write else { continue };
            for (account, period_start) in accounts {
                let delta = spend.entry((&**account, *period_start, &*r.backend)).or_default();
                delta.spent_pico = delta.spent_pico.saturating_add(r.cost.pico());
                delta.requests += 1;
                delta.prompt_tokens = delta.prompt_tokens.saturating_add(integer(r.prompt_tokens));
                delta.completion_tokens = delta.completion_tokens.saturating_add(integer(r.completion_tokens));
            }
            records.push(r);
        }
        let mut chunks = records.chunks_exact(ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut many = tx.prepare_cached(&INSERT_MANY)?;
            for chunk in chunks.by_ref() {
                for (row, r) in chunk.iter().enumerate() {
                    bind_request(&mut many, 1 + row * REQUEST_COLUMNS, r)?;
                }
                many.raw_execute()?;
                // A batch under load takes the writer about a millisecond; handing the core
                // back between statements keeps it from holding off a request worker that
                // long (c=64 A/B on 2 cores: the machine's idle share fell from ~10% to ~7%).
                std::thread::yield_now();
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut one = tx.prepare_cached(&INSERT_ONE)?;
            for r in rest {
                bind_request(&mut one, 1, r)?;
                one.raw_execute()?;
            }
        }
        let mut upsert = tx.prepare_cached(
            "INSERT INTO spend (user, period_start, backend, spent_pico, requests, prompt_tokens, completion_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (user, period_start, backend) DO UPDATE SET
               spent_pico = spent_pico + excluded.spent_pico,
               requests = requests + excluded.requests,
               prompt_tokens = prompt_tokens + excluded.prompt_tokens,
               completion_tokens = completion_tokens + excluded.completion_tokens",
        )?;
        for ((user, period_start, backend), d) in spend {
            upsert.execute(params![
                user,
                period_start,
                backend,
                d.spent_pico,
                d.requests,
                d.prompt_tokens,
                d.completion_tokens
            ])?;
        }
    }
    tx.commit()
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

    fn in_process(&self) -> Option<&Accounts> {
        Some(self.accounts.as_ref())
    }

    fn ranking(&self, now: i64, limit: usize) -> BoxFuture<'_, Result<super::Ranking, LedgerError>> {
        let path = self.path.clone();
        Box::pin(async move {
            // What settled so far is in the file first.
            self.flush().await?;
            tokio::task::spawn_blocking(move || read_ranking(&path, now, limit))
                .await
                .map_err(|e| LedgerError::Storage(e.to_string()))?
                .map_err(storage("ranking users by spend"))
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
/// gateway may hold it; WAL lets both work): the request records since `since_ms`, oldest
/// first, and the spend of every user's periods.
pub fn read_report(path: &Path, since_ms: i64) -> Result<(Vec<RequestRecord>, Vec<PeriodSpend>), LedgerError> {
    let display = path.display().to_string();
    if !path.exists() {
        return Err(LedgerError::Storage(format!("{display}: no ledger file (has the gateway run with this config?)")));
    }
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(storage(&display))?;
    let read = || -> rusqlite::Result<_> {
        let mut statement = conn
            .prepare(&format!("SELECT {REQUEST_COLUMN_LIST} FROM requests WHERE at_ms >= ?1 ORDER BY at_ms, rowid"))?;
        let records = statement.query_map(params![since_ms], record_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        let mut statement =
            conn.prepare("SELECT user, period_start, SUM(spent_pico) FROM spend GROUP BY user, period_start")?;
        let spend = statement
            .query_map([], |row| {
                Ok(PeriodSpend { user: row.get(0)?, period_start: row.get(1)?, spent: Usd::from_pico(row.get(2)?) })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((records, spend))
    };
    read().map_err(storage(&display))
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRecord> {
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
    })
}

fn read_records(path: &str, limit: usize) -> rusqlite::Result<Vec<RequestRecord>> {
    let conn = Connection::open(path)?;
    let mut statement =
        conn.prepare(&format!("SELECT {REQUEST_COLUMN_LIST} FROM requests ORDER BY rowid DESC LIMIT ?1"))?;
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
        Budgets::from_levels([Budget {
            scope: Scope::User,
            account: name.into(),
            limit: Some(Usd::from_pico(1_000_000)),
            period: BudgetPeriod::Day,
        }])
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
            if writer_nices().contains(&WRITER_NICE) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(writer_nices().contains(&WRITER_NICE), "writer threads' nice values: {:?}", writer_nices());
    }

    /// A window's records go in by statements of many rows and one statement per leftover:
    /// every record must come back whole and in order, whatever the batch's size.
    #[tokio::test]
    async fn a_window_of_records_larger_than_one_insert_comes_back_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteLedger::open(&dir.path().join("ledger.db"), Duration::from_secs(86_400)).unwrap();
        let now = crate::clock::unix_now();
        let alice = user("alice");
        let count = 2 * ROWS_PER_INSERT + 5;
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
        let record = RequestRecord {
            at_ms: now * 1000,
            user: Arc::clone(&alice.user().account),
            route: "auto".into(),
            backend: "a".into(),
            reason: "quality-first".into(),
            prompt_tokens: 10,
            completion_tokens: 1,
            cost: Usd::from_pico(70),
            status: 200,
            latency_ms: 1,
        };
        ledger.settle(&alice, id, Usd::from_pico(100), record, now);
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
            let record = RequestRecord {
                at_ms: now * 1000,
                user: Arc::clone(&who.user().account),
                route: "auto".into(),
                backend: backend.into(),
                reason: "quality-first".into(),
                prompt_tokens: 10,
                completion_tokens: 1,
                cost: Usd::from_pico(pico),
                status: 200,
                latency_ms: 1,
            };
            ledger.settle(who, id, Usd::from_pico(100), record, now);
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
}
