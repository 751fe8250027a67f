//! The order of every user by a figure of its period, for `/admin/usage?sort=...`: built from
//! the ledger's standings joined to the directory (a second or so with 100,000 users), so it is
//! kept and shared rather than rebuilt for each page. A page is cut from the kept order; its
//! rows' figures are read live, so a page is exact, and the order is at most [`FRESH`] old
//! plus one rebuild: an older one is answered at once and rebuilt in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::{Figures, UserUsage};
use crate::app::AppState;
use crate::error::ApiError;

/// How long an order is used before a request for it starts a rebuild.
pub const FRESH: Duration = Duration::from_secs(5);

/// Every user's figures as of `built_at`, `by_backend` left out.
pub(super) struct Ranked {
    pub(super) built_at: Instant,
    pub(super) rows: Vec<UserUsage>,
}

/// The kept order, and whether a rebuild is under way.
#[derive(Default)]
pub struct RankedUsers {
    current: ArcSwapOption<Ranked>,
    /// One build at a time: a stampede of first pages waits for the same one.
    building: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
}

impl RankedUsers {
    /// The kept order; built now when there is none, rebuilt in the background when stale.
    pub(super) async fn get(&self, state: &Arc<AppState>) -> Result<Arc<Ranked>, ApiError> {
        if let Some(ranked) = self.current.load_full() {
            if ranked.built_at.elapsed() > FRESH {
                Self::refresh_in_background(state);
            }
            return Ok(ranked);
        }
        let _one = self.building.lock().await;
        if let Some(ranked) = self.current.load_full() {
            return Ok(ranked);
        }
        self.rebuild(state).await
    }

    /// Starts a rebuild unless one is under way: at sign-in to the dashboard, so that its
    /// first sorted page finds the order ready.
    pub fn refresh_in_background(state: &Arc<AppState>) {
        if state.ranked_users.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = Arc::clone(state);
        tokio::spawn(async move {
            let ranked_users = &state.ranked_users;
            let _one = ranked_users.building.lock().await;
            if let Err(e) = ranked_users.rebuild(&state).await {
                tracing::warn!(error = %e, "ranking users for the dashboard failed");
            }
            ranked_users.refreshing.store(false, Ordering::Release);
        });
    }

    async fn rebuild(&self, state: &AppState) -> Result<Arc<Ranked>, ApiError> {
        let snapshot = state.snapshot.load_full();
        let figures = Figures::new(&snapshot, crate::clock::unix_now());
        let started = Instant::now();
        let rows = super::users_table(state, &snapshot, &figures).await?;
        tracing::debug!(users = rows.len(), took_ms = started.elapsed().as_millis(), "users ranked");
        let ranked = Arc::new(Ranked { built_at: started, rows });
        self.current.store(Some(Arc::clone(&ranked)));
        Ok(ranked)
    }
}
