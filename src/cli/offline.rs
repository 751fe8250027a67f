//! The offline commands, `report` and `simulate`: they read the ledger (a SQLite file, or
//! Redis) and write to standard output; nothing is sent to a backend.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use super::DEFAULT_CONFIG;
use crate::config::{Config, ConfigError, EMBEDDED_DEFAULT};

/// Why `report` or `simulate` could not run.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Trace(#[from] crate::simulate::trace::TraceError),
    #[error("{path}: cannot write: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Tenants(#[from] crate::tenancy::store::StoreError),
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), CommandError> {
    std::fs::write(path, bytes).map_err(|source| write_error(path, source))
}

fn write_error(path: &std::path::Path, source: std::io::Error) -> CommandError {
    CommandError::Write { path: path.display().to_string(), source }
}

/// `tollgate report`.
pub(super) fn report(
    config: Option<PathBuf>,
    json: bool,
    since_ms: Option<i64>,
    export_trace: Option<PathBuf>,
) -> ExitCode {
    finish(try_report(config, json, since_ms, export_trace))
}

/// `tollgate simulate`.
pub(super) fn simulate(
    config: &std::path::Path,
    compare: &[PathBuf],
    trace: &std::path::Path,
    plot: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    finish(try_simulate(config, compare, trace, plot, json))
}

fn finish(result: Result<(), CommandError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `report` and `simulate` send nothing to backends: the keys a config names need not be set
/// (an operator can run them where the gateway's keys are not), a placeholder stands in. What
/// is set is read: a Redis ledger's password opens the ledger they read.
fn offline_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty()).or_else(|| Some(String::from("unused-offline")))
}

fn try_report(
    config: Option<PathBuf>,
    json: bool,
    since_ms: Option<i64>,
    export_trace: Option<PathBuf>,
) -> Result<(), CommandError> {
    let config = match config {
        Some(path) => Config::load(&path, &offline_env)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => Config::load(DEFAULT_CONFIG.as_ref(), &offline_env)?,
        None => Config::parse(EMBEDDED_DEFAULT, "<embedded config/tollgate.toml>", &offline_env)?,
    };
    if matches!(config.ledger.store, crate::config::LedgerStore::Memory) {
        println!(
            "the ledger is in memory ([ledger] backend = \"memory\"): nothing is persisted, so there is nothing to \
             report; use backend = \"sqlite\" or \"redis\", or GET /admin/requests on the running gateway"
        );
        return Ok(());
    }
    let mut trace = export_trace.as_deref().map(TraceFile::create).transpose()?;
    let report = match &config.ledger.store {
        crate::config::LedgerStore::Sqlite { path } => sqlite_report(&config, path.as_ref(), since_ms, trace.as_mut())?,
        _ => redis_report(&config, since_ms, trace.as_mut())?,
    };
    trace.map(TraceFile::finish).transpose()?;
    to_stdout(|out| {
        if json {
            crate::report::render::write_json(&report, &mut *out)?;
            writeln!(out)
        } else {
            crate::report::render::write_table(&report, out)
        }
    })
}

/// The report of a SQLite ledger: its records stream from the file (into the trace as they
/// come), then the spend and the API users.
fn sqlite_report(
    config: &Config,
    path: &std::path::Path,
    since_ms: Option<i64>,
    mut trace: Option<&mut TraceFile<'_>>,
) -> Result<crate::report::Report, CommandError> {
    let now_ms = crate::clock::unix_now_ms();
    let from_ms = since_ms.map_or(0, |since| now_ms.saturating_sub(since));
    let start_ms = match since_ms {
        Some(_) => from_ms,
        None => crate::ledger::sqlite::first_record_at(path)?.unwrap_or(now_ms),
    };
    let mut report = crate::report::Builder::new(config, crate::report::Window { start_ms, end_ms: now_ms });
    let spend = crate::ledger::sqlite::read_report(path, from_ms, |record| {
        report.add(&record);
        if let Some(trace) = trace.as_deref_mut() {
            trace.write(&record);
        }
    })?;
    report.spend(spend);
    crate::tenancy::sqlite::each_effective_user(path, config, |user| report.user(&user))?;
    Ok(report.finish())
}

/// The report of a Redis ledger: the request records Redis keeps (the newest
/// [`MAX_RECORDS`](crate::ledger::redis::scripts::MAX_RECORDS); the window starts at the oldest
/// of them when the list is full), every user's spend in its current periods, and the API
/// users of its directory.
fn redis_report(
    config: &Config,
    since_ms: Option<i64>,
    mut trace: Option<&mut TraceFile<'_>>,
) -> Result<crate::report::Report, CommandError> {
    let shared = SharedStore::open(config)?;
    let now_ms = crate::clock::unix_now_ms();
    let kept = crate::ledger::redis::scripts::MAX_RECORDS;
    let mut records = shared.runtime.block_on(shared.ledger.records(kept))?;
    // Kept in the order they settled; the report reads them in the order they arrived.
    records.sort_by_key(|r| r.at_ms);
    let asked_ms = since_ms.map(|since| now_ms.saturating_sub(since));
    let oldest_ms = records.first().map(|r| r.at_ms);
    // A full list has lost what came before its oldest record: the window starts there.
    let clipped = oldest_ms.filter(|&oldest| records.len() >= kept && asked_ms.is_none_or(|asked| oldest > asked));
    let start_ms = clipped.or(asked_ms).or(oldest_ms).unwrap_or(now_ms);
    if clipped.is_some() {
        eprintln!(
            "note: Redis keeps the newest {kept} request records; the window starts at the oldest of them ({})",
            crate::ledger::period::rfc3339(start_ms.div_euclid(1000))
        );
    }
    let mut report = crate::report::Builder::new(config, crate::report::Window { start_ms, end_ms: now_ms });
    for record in records.iter().filter(|r| r.at_ms >= start_ms) {
        report.add(record);
        if let Some(trace) = trace.as_deref_mut() {
            trace.write(record);
        }
    }
    let standings = shared.runtime.block_on(shared.ledger.standings(now_ms.div_euclid(1000)))?;
    report.spend(standings.into_iter().map(|s| crate::ledger::PeriodSpend {
        user: s.user.to_string(),
        period_start: s.account.period_start,
        spent: s.account.totals.spent,
    }));
    shared.runtime.block_on(each_api_user(&*shared.directory, config, |user| report.user(&user)))?;
    Ok(report.finish())
}

/// A Redis ledger and its directory, on a runtime of their own (the commands are not async).
struct SharedStore {
    runtime: tokio::runtime::Runtime,
    ledger: Arc<dyn crate::ledger::Ledger>,
    directory: Arc<dyn crate::tenancy::store::Directory>,
}

impl SharedStore {
    fn open(config: &Config) -> Result<Self, CommandError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::ledger::LedgerError::Storage(format!("cannot start a runtime: {e}")))?;
        // The client's background tasks (reconnection, probes) run on this runtime.
        let _entered = runtime.enter();
        let metrics = crate::metrics::Metrics::new().map_err(|e| crate::ledger::LedgerError::Storage(e.to_string()))?;
        let (ledger, limiter) = crate::ledger::open(&config.ledger, &Arc::new(metrics))?;
        let directory = crate::tenancy::open(&config.ledger, limiter.shared_store())?;
        drop(_entered);
        Ok(Self { runtime, ledger, directory })
    }
}

/// Every API user of `directory`, by name, as reports show them (their effective limits under
/// `config`'s plans), read a page at a time.
async fn each_api_user(
    directory: &dyn crate::tenancy::store::Directory,
    config: &Config,
    mut each: impl FnMut(crate::config::User),
) -> Result<(), CommandError> {
    let mut query = crate::tenancy::store::UserQuery { after: None, limit: 1000, plan: None, team: None };
    loop {
        let page = directory.users(&query).await?;
        let Some(last) = page.last() else { return Ok(()) };
        query.after = Some(last.name.clone());
        for member in &page {
            each(crate::tenancy::reported_user(member, config));
        }
    }
}

/// Adds to `config`'s users the API users of its ledger (a SQLite file or Redis) that `named`
/// names, with their effective limits under `config`'s plans: a trace exported from the
/// ledger is mostly theirs, and a compared config may change their plans.
fn with_api_users(config: &mut Config, named: &std::collections::HashSet<&str>) -> Result<(), CommandError> {
    let mut found = Vec::new();
    let mut keep = |user: crate::config::User| {
        if named.contains(user.name.as_str()) {
            found.push(Arc::new(user));
        }
    };
    match &config.ledger.store {
        crate::config::LedgerStore::Sqlite { path } if std::path::Path::new(path).exists() => {
            crate::tenancy::sqlite::each_effective_user(path.as_ref(), config, keep)?;
        }
        crate::config::LedgerStore::Redis(_) => {
            let shared = SharedStore::open(config)?;
            shared.runtime.block_on(each_api_user(&*shared.directory, config, &mut keep))?;
        }
        _ => {}
    }
    config.users.extend(found);
    Ok(())
}

/// `--export-trace`: the records' trace, written as they are read; the first failure is kept
/// for the end (the report goes on).
struct TraceFile<'a> {
    path: &'a std::path::Path,
    file: std::io::BufWriter<std::fs::File>,
    failed: Option<std::io::Error>,
}

impl<'a> TraceFile<'a> {
    fn create(path: &'a std::path::Path) -> Result<Self, CommandError> {
        let file = std::fs::File::create(path).map_err(|source| write_error(path, source))?;
        Ok(Self { path, file: std::io::BufWriter::new(file), failed: None })
    }

    fn write(&mut self, record: &crate::ledger::RequestRecord) {
        if self.failed.is_none() {
            if let Some(line) = crate::simulate::trace::line(record) {
                self.failed = self.file.write_all(line.as_bytes()).err();
            }
        }
    }

    fn finish(mut self) -> Result<(), CommandError> {
        self.failed.map_or_else(|| self.file.flush(), Err).map_err(|source| write_error(self.path, source))
    }
}

fn try_simulate(
    config: &std::path::Path,
    compare: &[PathBuf],
    trace: &std::path::Path,
    plot: Option<&std::path::Path>,
    json: bool,
) -> Result<(), CommandError> {
    let trace = crate::simulate::trace::load(trace)?;
    let mut runs = Vec::new();
    let named: std::collections::HashSet<&str> = trace.iter().map(|r| r.user.as_str()).collect();
    for path in std::iter::once(config).chain(compare.iter().map(PathBuf::as_path)) {
        let mut config = Config::load(path, &offline_env)?;
        with_api_users(&mut config, &named)?;
        let name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        runs.push((name, crate::simulate::run(&config, &trace)));
    }
    let chart = plot.map(|path| (path, crate::simulate::plot::draw(&runs)));
    if let Some((path, chart)) = &chart {
        write_file(path, &chart.canvas.encode())?;
    }
    to_stdout(|out| {
        if json {
            crate::simulate::render::write_json(&runs, &mut *out)?;
            return writeln!(out);
        }
        crate::simulate::render::write_table(&runs, &mut *out)?;
        if let Some((path, chart)) = &chart {
            writeln!(out, "\nplot: {} ({})", path.display(), chart.legend(&runs))?;
        }
        Ok(())
    })
}

/// Writes a command's output through a buffer (stdout alone is line-buffered: a `write` per
/// line of a million users' JSON); a reader that stops early (`| head`) ends it quietly.
fn to_stdout(
    write: impl FnOnce(&mut std::io::BufWriter<std::io::StdoutLock<'static>>) -> std::io::Result<()>,
) -> Result<(), CommandError> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.map_err(|source| CommandError::Write { path: "standard output".into(), source }),
    }
}
