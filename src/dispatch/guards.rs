//! Guards that give back what a request took if it ends early: tpm tokens, a queue place, a
//! half-open circuit's probe slot.

use std::sync::atomic::Ordering;

use crate::app::AppState;
use crate::error::ApiError;
use crate::policy::Refusal;
use crate::ratelimit::Allowance;
use crate::upstream::BackendState;

/// The tokens a request took from its user's tpm allowance at admission: given back if it is
/// refused or fails before a backend answers; once metered, the meter corrects them instead.
pub(super) struct TokenHold<'a> {
    pub(super) state: &'a AppState,
    pub(super) allowances: &'a [Allowance],
    pub(super) root: &'a str,
    pub(super) tokens: u64,
    pub(super) armed: bool,
}

impl Drop for TokenHold<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.limiter.settle_tokens(self.allowances, self.root, self.tokens, 0);
        }
    }
}

/// A place in the bounded wait queue, given back when dropped.
pub(super) struct QueuePlace<'a> {
    pub(super) state: &'a AppState,
}

impl<'a> QueuePlace<'a> {
    pub(super) fn take(state: &'a AppState, max_queue: u32) -> Result<Self, ApiError> {
        state
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_queue).then_some(n + 1))
            .map_err(|_| ApiError::from(Refusal::AtCapacity))?;
        state.metrics.queued.inc();
        Ok(Self { state })
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.state.queued.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.queued.dec();
    }
}

/// A half-open circuit's probe: if the request is dropped before a verdict, the next request
/// may probe instead.
pub(super) struct ProbeGuard<'a> {
    pub(super) state: &'a BackendState,
    pub(super) armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.probe_abandoned();
        }
    }
}
