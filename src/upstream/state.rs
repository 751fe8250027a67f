//! What the gateway knows of a backend at run time: requests in flight (capacity), health and
//! the occupancy clock. It outlives config reloads: a backend keeps its state under its name.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::health::{Admission, Breaker};
use crate::cost::{Pricing, Usd};
use crate::metering::occupancy::Occupancy;

#[derive(Debug)]
pub struct BackendState {
    in_flight: AtomicU32,
    breaker: Mutex<Breaker>,
    pub occupancy: Occupancy,
    /// Shared by every backend: a slot was freed somewhere, queued requests may decide again.
    freed: Arc<Notify>,
}

/// A request's slot on a backend; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    state: Arc<BackendState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.state.freed.notify_waiters();
    }
}

fn hourly_of(pricing: &Pricing) -> Usd {
    match pricing {
        Pricing::PerHour { hourly_usd } => *hourly_usd,
        Pricing::PerToken { .. } => Usd::ZERO,
    }
}

impl BackendState {
    pub fn new(pricing: &Pricing, freed: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU32::new(0),
            breaker: Mutex::new(Breaker::default()),
            occupancy: Occupancy::new(hourly_of(pricing), Instant::now()),
            freed,
        })
    }

    /// A reloaded config may change the price: it applies from now on.
    pub fn reprice(&self, pricing: &Pricing) {
        self.occupancy.set_hourly(hourly_of(pricing), Instant::now());
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// A slot if fewer than `max` requests are in flight.
    pub fn try_slot(self: &Arc<Self>, max: u32) -> Option<Slot> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot { state: Arc::clone(self) })
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_available(&self, now: Instant) -> bool {
        self.breaker().is_available(now)
    }

    pub fn admit(&self, now: Instant) -> Admission {
        self.breaker().admit(now)
    }

    pub fn succeeded(&self) {
        self.breaker().success();
    }

    pub fn failed(&self, now: Instant) {
        self.breaker().failure(now);
    }

    pub fn probe_abandoned(&self) {
        self.breaker().probe_abandoned();
    }

    pub fn is_up(&self) -> bool {
        !self.breaker().is_open()
    }
}
