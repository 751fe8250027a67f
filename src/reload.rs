//! Config reload: on file change, on SIGHUP and on `POST /admin/reload`. Prepare (load,
//! validate, build clients), then swap with one atomic store: requests in flight finish on the
//! snapshot they started with; budgets and spend live in the ledger and carry over. A bad file
//! is refused with the same messages as `tollgate check`, and the old config keeps serving.

use std::sync::Arc;
use std::time::Duration;

use crate::app::AppState;
use crate::config::{Config, ConfigError};
use crate::snapshot::Snapshot;
use crate::tenancy::store::UserQuery;

/// How often the config file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway runs on its embedded config: there is no file to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} changed: restart the gateway to apply it (nothing was reloaded)")]
    NeedsRestart(&'static str),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("plan `{0}` is gone from the file but API users are on it (e.g. `{1}`): move them first (PATCH /admin/users/{{name}}), nothing was reloaded")]
    PlanInUse(String, String),
    #[error("could not check which plans API users are on: {0}")]
    Tenants(#[from] crate::tenancy::store::StoreError),
}

/// What a successful reload applied.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Applied {
    pub backends: usize,
    pub routes: usize,
    pub users: usize,
}

pub async fn reload(state: &Arc<AppState>, trigger: &'static str) -> Result<Applied, ReloadError> {
    let _one_at_a_time = state.reload_lock.lock().await;
    let result = prepare_and_swap(state).await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    state.metrics.config_reloads.with_label_values(&[outcome]).inc();
    match &result {
        Ok(applied) => tracing::info!(trigger, ?applied, "config reloaded"),
        Err(e) => tracing::error!(trigger, "config reload refused, the running config stays:\n{e}"),
    }
    result
}

async fn prepare_and_swap(state: &Arc<AppState>) -> Result<Applied, ReloadError> {
    let path = state.config_path.as_ref().ok_or(ReloadError::NoFile)?;
    let mut config = Config::load(path, state.env.as_ref())?;
    let current = state.snapshot.load_full();
    for gone in current.config.plans.iter().filter(|p| config.plan(&p.name).is_none()) {
        let query = UserQuery { plan: Some(gone.name.clone()), limit: 1, ..UserQuery::default() };
        if let Some(user) = state.tenants.directory.users(&query).await?.into_iter().next() {
            return Err(ReloadError::PlanInUse(gone.name.clone(), user.name));
        }
    }
    if config.ledger != current.config.ledger {
        return Err(ReloadError::NeedsRestart("[ledger]"));
    }
    let traces = |t: &crate::config::Telemetry| (t.otlp_endpoint.clone(), t.service_name.clone(), t.sample_ratio);
    if traces(&config.telemetry) != traces(&current.config.telemetry) {
        return Err(ReloadError::NeedsRestart("[telemetry] otlp_endpoint, service_name or sample_ratio"));
    }
    if config.cache != current.config.cache {
        return Err(ReloadError::NeedsRestart("[cache]"));
    }
    // The socket is bound once; a `--listen` override must survive reloads too.
    config.server.listen = current.config.server.listen;
    let applied = Applied { backends: config.backends.len(), routes: config.routes.len(), users: config.users.len() };
    let longest = config.longest_request();
    let access_log = config.telemetry.access_log;
    let snapshot = Snapshot::new(config, Some(&current), &state.freed)?;
    // Reservations made from now on must outlive the new longest timeout.
    state.ledger.requests_last_at_most(longest);
    state.snapshot.store(Arc::new(snapshot));
    state.access_log.set_format(access_log);
    // API users' limits come from plans, which the new config may have changed.
    state.tenants.forget_all();
    Ok(applied)
}

/// Starts the SIGHUP listener and the file watcher (when the config came from a file).
pub fn spawn_watchers(state: &Arc<AppState>) {
    let Some(path) = state.config_path.clone() else { return };
    #[cfg(unix)]
    {
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP: reload by file change or the admin API");
                return;
            };
            while hangup.recv().await.is_some() {
                let _ = reload(&state, "sighup").await;
            }
        });
    }
    let state = Arc::clone(state);
    tokio::spawn(async move {
        // Polling the content is portable and cheap for one small file, and it sees editors
        // that replace the file as well as those that write it in place.
        let mut last = std::fs::read(&path).ok();
        let mut ticker = tokio::time::interval(WATCH_INTERVAL);
        loop {
            ticker.tick().await;
            let now = std::fs::read(&path).ok();
            if now.is_some() && now != last {
                last = now;
                let _ = reload(&state, "file-change").await;
            }
        }
    });
}
