//! The SQLite ledger's writer thread: group commit of request records every window, the
//! `spend` table's sums every second ([`super::spend`]), pruning of old records, and eviction
//! of idle accounts once what they settled is in the file.

use std::sync::mpsc;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rusqlite::{params, Connection};
use smallvec::SmallVec;
use tokio::sync::oneshot;

use super::spend::{self, integer, Pending};
use super::REQUEST_COLUMN_LIST;
use crate::ledger::accounts::Accounts;
use crate::ledger::rollup;
use crate::ledger::RequestRecord;

const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(20);
/// How often old request records are pruned and idle accounts dropped from memory.
const SWEEP_EVERY_S: i64 = 60;
/// An account unused this long, with nothing reserved, leaves memory (its spend is in the
/// file, read back on its next use): memory follows the accounts in use, not every account
/// used since the start.
const EVICT_IDLE_S: i64 = 300;
/// Margin between an account's last use and the `spend` table's last write before eviction:
/// the settlement follows the account's last lock within microseconds, never seconds.
const EVICT_MARGIN_S: i64 = 2;
/// The writer thread's name, as `ps -T` and `/proc/<pid>/task/*/comm` show it.
pub const WRITER_THREAD: &str = "tollgate-ledger";

/// The accounts and periods a settlement was booked in.
pub type Levels = SmallVec<[(Arc<str>, i64); 3]>;

// A settlement is every message but the rare flush: boxing it would cost each request an
// allocation to save the flush a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub enum Write {
    /// A settled request: its record, and the cost booked in each level's account and period.
    Settled { accounts: Levels, record: RequestRecord },
    /// Everything sent before, records and sums, in the file; then answer.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// The writer's state between windows.
struct Writer<'a> {
    conn: Connection,
    accounts: &'a Accounts,
    retention_ms: i64,
    pending: Pending,
    last_spend_write_ms: i64,
    /// Everything settled before this (Unix seconds) is in the `spend` table: what eviction
    /// needs, since an evicted account's spend is read back from there.
    spend_through: i64,
    last_sweep: i64,
}

pub fn write_loop(conn: Connection, rx: mpsc::Receiver<Write>, retention_ms: i64, accounts: &Accounts) {
    crate::background::yield_to_requests(WRITER_THREAD);
    let now = crate::clock::unix_now();
    let mut writer = Writer {
        conn,
        accounts,
        retention_ms,
        pending: Pending::default(),
        last_spend_write_ms: crate::clock::unix_now_ms(),
        spend_through: i64::MIN,
        last_sweep: now,
    };
    // Kept from one window to the next: under load a batch is hundreds of settlements, and
    // growing a new vector to that size every window was ~5% of this thread's time.
    let mut batch = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(SWEEP_EVERY_S.unsigned_abs())) {
            Ok(first) => {
                // Sleep through the window, then take everything that came: while this thread
                // is not blocked in `recv`, a settlement's `send` wakes nobody. Waiting in
                // `recv_timeout` instead cost every request a futex wake and two context
                // switches under load. A flush that finds the writer idle (a dashboard read on a
                // quiet gateway) has nothing to group with: it goes at once.
                if !matches!(first, Write::Flush(_)) {
                    std::thread::sleep(GROUP_COMMIT_WINDOW);
                }
                let drained_at = crate::clock::unix_now();
                batch.push(first);
                batch.extend(rx.try_iter());
                let asked = batch.iter().any(|w| matches!(w, Write::Flush(_)));
                let result = writer.commit(&batch, asked, drained_at);
                for write in batch.drain(..) {
                    if let Write::Flush(done) = write {
                        let _ = done.send(result.clone());
                    }
                }
            }
            // Nothing came for a while: the sums go in now.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = writer.commit(&[], true, crate::clock::unix_now());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Shutting down: the last sums go in.
                let _ = writer.commit(&[], true, crate::clock::unix_now());
                return;
            }
        }
        writer.sweep();
    }
}

impl Writer<'_> {
    /// Commits the batch's records and, when due (or `write_spend`), the sums, in one
    /// transaction; `drained_at` is when the batch was taken from the channel.
    fn commit(&mut self, batch: &[Write], write_spend: bool, drained_at: i64) -> Result<(), String> {
        for write in batch {
            if let Write::Settled { accounts, record } = write {
                self.pending.add_record(accounts, record);
            }
        }
        let now_ms = crate::clock::unix_now_ms();
        let spend_due = write_spend
            || now_ms - self.last_spend_write_ms >= spend::FLUSH_EVERY_MS
            || self.pending.len() >= spend::MAX_PENDING;
        if batch.is_empty() && (self.pending.is_empty() || !spend_due) {
            if self.pending.is_empty() {
                self.spend_through = drained_at;
            }
            return Ok(());
        }
        let result = commit(&mut self.conn, batch, spend_due.then_some(&self.pending));
        match &result {
            Ok(()) if spend_due => {
                self.pending.clear();
                self.last_spend_write_ms = now_ms;
                self.spend_through = drained_at;
            }
            Ok(()) => {}
            // The records are lost; the sums stay for the next commit, so budgets are not.
            Err(e) => tracing::error!(error = %e, "ledger commit failed"),
        }
        result.map_err(|e| e.to_string())
    }

    /// Every [`SWEEP_EVERY_S`]: old records pruned, idle accounts out of memory.
    fn sweep(&mut self) {
        let now = crate::clock::unix_now();
        if now - self.last_sweep < SWEEP_EVERY_S {
            return;
        }
        self.last_sweep = now;
        let oldest = crate::clock::unix_now_ms().saturating_sub(self.retention_ms);
        if let Err(e) = self.conn.execute("DELETE FROM requests WHERE at_ms < ?1", params![oldest]) {
            tracing::warn!(error = %e, "pruning old request records failed");
        }
        // Per-user hours are kept as long as the records they sum (never more rows than
        // those records); per-backend hours, a few rows each, for a year and more.
        let backends_from = now.saturating_sub(rollup::BACKEND_ROWS_KEPT_S);
        if let Err(e) = spend::prune_rollups(&self.conn, rollup::hour_of(oldest), backends_from) {
            tracing::warn!(error = %e, "pruning old hourly rollups failed");
        }
        // A table emptied by pruning numbers its next records from 1 again: so does the mark.
        let reset =
            "UPDATE ledger_meta SET value = 0 WHERE name = 'spend_through' AND NOT EXISTS (SELECT 1 FROM requests)";
        if let Err(e) = self.conn.execute(reset, []) {
            tracing::warn!(error = %e, "resetting the spend watermark failed");
        }
        let idle_before = (now - EVICT_IDLE_S).min(self.spend_through.saturating_sub(EVICT_MARGIN_S));
        let evicted = self.accounts.evict_idle(idle_before);
        tracing::debug!(evicted, live = self.accounts.live_count(), "idle accounts left memory");
    }
}

/// Request records inserted by one statement: per-statement work (stepping in and out of the
/// VM, resetting, the statement's own checks) is paid once per this many rows.
pub const ROWS_PER_INSERT: usize = 32;
/// Bound per row: the columns read back, then `levels` and `request_id`.
const INSERT_COLUMNS: usize = 12;

static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_requests_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_requests_sql(1));

/// `INSERT INTO requests ... VALUES (...), (...), ...` for `rows` rows.
fn insert_requests_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; INSERT_COLUMNS].join(","));
    format!("INSERT INTO requests ({REQUEST_COLUMN_LIST}, levels, request_id) VALUES {}", vec![row; rows].join(","))
}

/// Binds a record and its levels as the row starting at parameter `first` (1-based).
fn bind_request(
    statement: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    levels: &[(Arc<str>, i64)],
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
    statement.raw_bind_parameter(first + 10, spend::encode_levels(levels))?;
    statement.raw_bind_parameter(first + 11, r.request_id.as_ref().map(crate::telemetry::RequestId::as_str))?;
    Ok(())
}

pub(super) fn commit(conn: &mut Connection, batch: &[Write], sums: Option<&Pending>) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let records: Vec<(&Levels, &RequestRecord)> = batch
            .iter()
            .filter_map(|w| match w {
                Write::Settled { accounts, record } => Some((accounts, record)),
                Write::Flush(_) => None,
            })
            .collect();
        let mut chunks = records.chunks_exact(ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut many = tx.prepare_cached(&INSERT_MANY)?;
            for chunk in chunks.by_ref() {
                for (row, (levels, r)) in chunk.iter().enumerate() {
                    bind_request(&mut many, 1 + row * INSERT_COLUMNS, levels, r)?;
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
            for (levels, r) in rest {
                bind_request(&mut one, 1, levels, r)?;
                one.raw_execute()?;
            }
        }
        if let Some(sums) = sums {
            sums.write(&tx)?;
        }
    }
    tx.commit()
}
