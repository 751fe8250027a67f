//! Passive health: a circuit breaker per backend, fed by real requests' outcomes.
//!
//! Closed: requests flow. After `FAILURES_TO_OPEN` consecutive failures (connect errors, 5xx,
//! timeouts) it opens for a back-off that doubles with each trip; when the back-off is over,
//! exactly one probe request is let through (half-open): success closes it, failure re-opens it.

use std::time::Duration;

use tokio::time::Instant;

const FAILURES_TO_OPEN: u32 = 3;
const BASE_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(120);

/// The breaker's state; time is passed in, so it is tested without a clock.
#[derive(Debug, Default)]
pub struct Breaker {
    consecutive_failures: u32,
    /// Set while open: when the next probe may go.
    open_until: Option<Instant>,
    /// Trips since it was last closed by a success: sets the back-off.
    trips: u32,
    probe_in_flight: bool,
}

/// What a request may do on this backend now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Closed,
    /// The one probe of a half-open circuit.
    Probe,
    Refused,
}

impl Breaker {
    /// Whether a request could go now (without taking the probe slot).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) => now >= until && !self.probe_in_flight,
        }
    }

    /// Takes the right to send one request.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.open_until {
            None => Admission::Closed,
            Some(until) if now >= until && !self.probe_in_flight => {
                self.probe_in_flight = true;
                Admission::Probe
            }
            Some(_) => Admission::Refused,
        }
    }

    pub fn success(&mut self) {
        *self = Self::default();
    }

    pub fn failure(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        let was_probe = std::mem::take(&mut self.probe_in_flight);
        if was_probe || self.consecutive_failures >= FAILURES_TO_OPEN {
            let backoff = BASE_BACKOFF.saturating_mul(1 << self.trips.min(8)).min(MAX_BACKOFF);
            self.trips += 1;
            self.open_until = Some(now + backoff);
        }
    }

    /// A probe that ended without a verdict (the client left first): let another one try.
    pub fn probe_abandoned(&mut self) {
        self.probe_in_flight = false;
    }

    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_once_after_the_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.admit(t0), Admission::Closed, "two failures keep it closed");
        b.failure(t0);
        assert_eq!(b.admit(t0), Admission::Refused);
        let later = t0 + BASE_BACKOFF;
        assert!(b.is_available(later));
        assert_eq!(b.admit(later), Admission::Probe);
        assert_eq!(b.admit(later), Admission::Refused, "only one probe at a time");
        b.success();
        assert_eq!(b.admit(later), Admission::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_longer_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        (0..3).for_each(|_| b.failure(t0));
        let t1 = t0 + BASE_BACKOFF;
        assert_eq!(b.admit(t1), Admission::Probe);
        b.failure(t1);
        assert!(!b.is_available(t1 + BASE_BACKOFF));
        assert!(b.is_available(t1 + BASE_BACKOFF * 2));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(t0);
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.admit(t0), Admission::Closed);
    }
}
