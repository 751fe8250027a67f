//! The command line: `serve`, `check`, `hash-key`, and the offline `report` and `simulate`
//! ([`offline`]).

mod offline;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::AppState;
use crate::config::{Config, ConfigError, ProcessEnv, EMBEDDED_DEFAULT};

const DEFAULT_CONFIG: &str = "config/tollgate.toml";

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "Cost-aware OpenAI-compatible gateway for LLM serving")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file; without it, `config/tollgate.toml`, or the embedded demo defaults when
        /// that file does not exist.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen on this address instead of the config's `server.listen` (port 0: any free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a config file and print every problem with file, line and field.
    Check { path: PathBuf },
    /// Read a key on standard input, print its lowercase hex SHA-256 (for `key_sha256`).
    HashKey,
    /// Unit economics per user and backend from the ledger's request records.
    Report {
        /// The config whose `[ledger]` names the SQLite file (and whose routes and prices the
        /// savings are computed with).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only records this recent: `30m`, `24h`, `7d`.
        #[arg(long, value_parser = crate::report::parse_duration)]
        since: Option<i64>,
        /// Also write the records as a trace (JSONL) for `tollgate simulate`.
        #[arg(long)]
        export_trace: Option<PathBuf>,
    },
    /// Replay a request trace through the routing decision on a virtual clock.
    Simulate {
        /// The policy config to replay the trace against.
        #[arg(long, short)]
        config: PathBuf,
        /// More configs, shown side by side with the first (repeatable).
        #[arg(long)]
        compare: Vec<PathBuf>,
        /// The trace: one JSON request per line.
        #[arg(long)]
        trace: PathBuf,
        /// Draw spend over time per user against its budget line into this PNG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Check { path } => check(&path),
        Command::HashKey => hash_key(),
        Command::Report { config, json, since, export_trace } => offline::report(config, json, since, export_trace),
        Command::Simulate { config, compare, trace, plot, json } => {
            offline::simulate(&config, &compare, &trace, plot.as_deref(), json)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path, &ProcessEnv) {
        Ok(config) => {
            println!(
                "{}: ok ({} backends, {} routes, {} users)",
                path.display(),
                config.backends.len(),
                config.routes.len(),
                config.users.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            if let ConfigError::Invalid(problems) = &e {
                eprintln!("{} problem(s) found", problems.len());
            }
            ExitCode::FAILURE
        }
    }
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read the key from standard input: {e}");
        return ExitCode::FAILURE;
    }
    // `echo key | tollgate hash-key` adds a newline that is not part of the key.
    let key = input.strip_suffix('\n').map_or(input.as_str(), |k| k.strip_suffix('\r').unwrap_or(k));
    if key.is_empty() {
        eprintln!("no key on standard input");
        return ExitCode::FAILURE;
    }
    println!("{}", crate::auth::hash_key_hex(key));
    ExitCode::SUCCESS
}

fn load_for_serve(path: Option<PathBuf>) -> Result<(Config, Option<PathBuf>), ConfigError> {
    match path {
        Some(path) => Ok((Config::load(&path, &ProcessEnv)?, Some(path))),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Ok((Config::load(DEFAULT_CONFIG.as_ref(), &ProcessEnv)?, Some(PathBuf::from(DEFAULT_CONFIG))))
        }
        None => {
            tracing::info!("{DEFAULT_CONFIG} not found: using the embedded demo defaults");
            Ok((Config::parse(EMBEDDED_DEFAULT, "<embedded config/tollgate.toml>", &ProcessEnv)?, None))
        }
    }
}

fn serve(path: Option<PathBuf>, listen: Option<std::net::SocketAddr>) -> ExitCode {
    init_tracing();
    let (mut config, path) = match load_for_serve(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_config(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// How often keys' `last_used_at` is written to the store.
const KEY_USES_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_config(config: Config, path: Option<PathBuf>) -> Result<(), String> {
    let listen = config.server.listen;
    let grace = config.server.shutdown_grace;
    let state = AppState::new(config, path, Arc::new(ProcessEnv)).map_err(|e| e.to_string())?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("cannot read the bound address: {e}"))?;
    crate::reload::spawn_watchers(&state);
    tokio::spawn(crate::tenancy::cache::record_uses(Arc::downgrade(&state.tenants), KEY_USES_EVERY));
    tracing::info!(listen = %bound, "tollgate listening");
    let served = crate::server::serve(listener, Arc::clone(&state), grace, crate::server::shutdown_signal()).await;
    state.tenants.record_uses(0).await;
    // Every request that finished has settled; make the last settlements durable before exit.
    if let Err(e) = state.ledger.flush().await {
        tracing::error!(error = %e, "the ledger could not be flushed at shutdown");
    }
    if let Some(tracer) = state.tracing.clone() {
        // The exporter's HTTP client blocks: its last export runs off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || tracer.shutdown()).await;
    }
    served.map_err(|e| format!("server failed: {e}"))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
