//! Occupancy attribution for hourly-priced backends: over a request's life, each second costs
//! `hourly / 3600 / n(t)`, with n(t) the requests in flight on that backend. Time with nothing
//! in flight is idle cost, reported per backend and never charged to a user.
//!
//! Kept exact with one integer accumulator: `share` is the cost, in atto-USD (1e-18), that one
//! request would have been charged had it been in flight since the backend's start. A request
//! pays `share(end) − share(start)`. Each update divides once (by n), so the rounding error is
//! at most one atto-USD per event: a day of traffic sums to the hourly cost of its busy hours
//! far within 0.1%.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::cost::Usd;

const ATTO_PER_PICO: u128 = 1_000_000;
const NANOS_PER_HOUR: u128 = 3_600 * 1_000_000_000;

#[derive(Debug)]
struct State {
    hourly_pico: u128,
    in_flight: u32,
    last: Instant,
    share_atto: u128,
    idle_atto: u128,
    idle_reported_atto: u128,
}

impl State {
    fn advance(&mut self, now: Instant) {
        let elapsed_ns = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let cost_atto = self.hourly_pico * ATTO_PER_PICO * elapsed_ns / NANOS_PER_HOUR;
        if self.in_flight == 0 {
            self.idle_atto += cost_atto;
        } else {
            self.share_atto += cost_atto / u128::from(self.in_flight);
        }
    }
}

/// One hourly backend's occupancy clock.
#[derive(Debug)]
pub struct Occupancy {
    state: Mutex<State>,
}

/// A request's place on the occupancy clock, from its start.
#[derive(Debug)]
pub struct Ticket {
    start_share_atto: u128,
}

fn to_pico(atto: u128) -> Usd {
    Usd::from_pico(i64::try_from((atto + ATTO_PER_PICO / 2) / ATTO_PER_PICO).unwrap_or(i64::MAX))
}

impl Occupancy {
    pub fn new(hourly: Usd, now: Instant) -> Self {
        let hourly_pico = u128::try_from(hourly.pico()).unwrap_or(0);
        Self {
            state: Mutex::new(State {
                hourly_pico,
                in_flight: 0,
                last: now,
                share_atto: 0,
                idle_atto: 0,
                idle_reported_atto: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (every update is one step).
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new price (config reload) applies from `now` on; time before is charged at the old one.
    pub fn set_hourly(&self, hourly: Usd, now: Instant) {
        let mut s = self.lock();
        s.advance(now);
        s.hourly_pico = u128::try_from(hourly.pico()).unwrap_or(0);
    }

    pub fn enter(&self, now: Instant) -> Ticket {
        let mut s = self.lock();
        s.advance(now);
        s.in_flight += 1;
        Ticket { start_share_atto: s.share_atto }
    }

    /// Ends a request's occupancy; returns what it is charged.
    pub fn leave(&self, ticket: Ticket, now: Instant) -> Usd {
        let mut s = self.lock();
        s.advance(now);
        s.in_flight = s.in_flight.saturating_sub(1);
        to_pico(s.share_atto - ticket.start_share_atto)
    }

    /// Idle cost accrued since the last call (for the `tollgate_idle_cost_usd_total` counter).
    pub fn take_idle(&self, now: Instant) -> Usd {
        let mut s = self.lock();
        s.advance(now);
        let whole_pico = s.idle_atto / ATTO_PER_PICO * ATTO_PER_PICO;
        let delta = whole_pico - s.idle_reported_atto;
        s.idle_reported_atto = whole_pico;
        to_pico(delta)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn hourly(usd: i64) -> Usd {
        Usd::from_pico(usd * 1_000_000_000_000)
    }

    #[test]
    fn two_overlapping_requests_share_the_time_they_overlap() {
        let t0 = Instant::now();
        let occupancy = Occupancy::new(hourly(36), t0); // $0.01 per second
        let a = occupancy.enter(t0);
        let b = occupancy.enter(t0);
        let s = Duration::from_secs(1);
        assert_eq!(occupancy.leave(a, t0 + 10 * s), Usd::from_pico(50_000_000_000)); // 10 s / 2
                                                                                     // b: 10 s shared (0.05) + 10 s alone (0.10)
        assert_eq!(occupancy.leave(b, t0 + 20 * s), Usd::from_pico(150_000_000_000));
    }

    #[test]
    fn time_with_nothing_in_flight_is_idle_cost() {
        let t0 = Instant::now();
        let occupancy = Occupancy::new(hourly(36), t0);
        let s = Duration::from_secs(1);
        let a = occupancy.enter(t0 + 5 * s);
        occupancy.leave(a, t0 + 7 * s);
        assert_eq!(occupancy.take_idle(t0 + 10 * s), Usd::from_pico(80_000_000_000)); // 8 idle seconds
        assert_eq!(occupancy.take_idle(t0 + 10 * s), Usd::ZERO, "reported once");
    }

    proptest! {
        /// A random day of traffic: charges plus idle cost add up to the hourly cost of the
        /// whole span, within 0.1% (in fact within a few pico-USD).
        #[test]
        fn charges_and_idle_sum_to_the_hourly_cost(
            events in proptest::collection::vec((0u64..3_600_000, 1u64..600_000), 1..200),
            price_cents in 1i64..10_000,
        ) {
            let t0 = Instant::now();
            let rate = Usd::from_pico(price_cents * 10_000_000_000);
            let occupancy = Occupancy::new(rate, t0);
            // (start, end) in ms over about a day; process enter/leave in time order.
            let mut points: Vec<(u64, bool, usize)> = Vec::new();
            for (i, (start, len)) in events.iter().enumerate() {
                points.push((start * 24, true, i));
                points.push((start * 24 + len, false, i));
            }
            points.sort();
            let mut tickets: Vec<Option<Ticket>> = (0..events.len()).map(|_| None).collect();
            let mut charged = Usd::ZERO;
            let mut end = 0;
            for (at, is_start, i) in points {
                let now = t0 + Duration::from_millis(at);
                end = end.max(at);
                if is_start {
                    tickets[i] = Some(occupancy.enter(now));
                } else if let Some(ticket) = tickets[i].take() {
                    charged = charged.saturating_add(occupancy.leave(ticket, now));
                }
            }
            let idle = occupancy.take_idle(t0 + Duration::from_millis(end));
            let total = i128::from(charged.saturating_add(idle).pico());
            let expected = i128::from(rate.pico()) * i128::from(end) / 3_600_000;
            let error = (total - expected).abs();
            prop_assert!(error * 1000 <= expected.max(1), "total {total} expected {expected}");
        }
    }
}
