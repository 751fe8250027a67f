//! The application: shared state and the router with its layers.
//!
//! A request's way through, in order:
//! 1. `http::proxy` loads **one** config [`Snapshot`] for the whole request, so a reload never
//!    mixes two configs within one request.
//! 2. `auth` resolves the bearer key against that snapshot (401 otherwise), before the body is
//!    read, so an unauthenticated client cannot make the gateway buffer anything.
//! 3. The body is read up to `max_body_bytes` (413) and parsed into a `ProxyRequest` (400).
//! 4. `dispatch` resolves the model (404), asks `policy::decide`, sends to the first candidate
//!    and falls back on failures before the first byte; the answer's body is wrapped in a
//!    `MeteredBody`, which records usage however the body ends.
//! 5. Every error becomes an `ApiError`, answered in the OpenAI shape by its one
//!    `IntoResponse`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State shared by every request.
pub struct AppState {
    /// The current config snapshot; swapped whole on reload.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: `/readyz` turns 503 so load balancers drain this replica.
    pub draining: AtomicBool,
}

impl AppState {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { snapshot: ArcSwap::from_pointee(snapshot), metrics, draining: AtomicBool::new(false) })
    }
}

/// The router: the seam tests and `serve` share.
pub fn app(state: Arc<AppState>) -> Router {
    crate::http::routes().with_state(state)
}
