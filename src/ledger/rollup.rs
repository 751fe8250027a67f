//! Hourly rollups: the request records summed per (hour, user, backend) and per (hour,
//! backend), kept by every store as records settle, so that spend over time is read from a
//! few rows per hour instead of a scan of millions of records.
//!
//! Pure: the stores decide where the sums live (memory, a SQLite table, Redis hashes); this
//! module says what one record adds and how rows are summed.

use std::collections::HashMap;
use std::sync::Arc;

use super::RequestRecord;
use crate::cost::Usd;

pub const HOUR_S: i64 = 3600;

/// How long the per-backend rows are kept whatever the records' retention: they are a few
/// rows per hour, and a year of them shows a year's spend.
pub const BACKEND_ROWS_KEPT_S: i64 = 400 * 86_400;

/// The start (Unix seconds) of the UTC hour `at_ms` (Unix milliseconds) falls in.
pub fn hour_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(1000).div_euclid(HOUR_S) * HOUR_S
}

/// What a set of records adds up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: u64,
    /// Records with a status of 400 or more (what the backend or the gateway failed).
    pub errors: u64,
    pub spent: Usd,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Latencies added up (ms): over `requests`, the mean.
    pub latency_ms: u64,
}

impl Sums {
    pub fn of(record: &RequestRecord) -> Self {
        Self {
            requests: 1,
            errors: u64::from(record.status >= 400),
            spent: record.cost,
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            latency_ms: record.latency_ms,
        }
    }

    pub fn add(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.spent = self.spent.saturating_add(other.spent);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.latency_ms = self.latency_ms.saturating_add(other.latency_ms);
    }
}

/// One hour of one backend's traffic: a user's, or everyone's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRow {
    /// Start of the hour, Unix seconds.
    pub hour: i64,
    pub backend: Arc<str>,
    pub sums: Sums,
}

/// Which rows a reader wants: `user`'s (everyone's when `None`) for the hours starting in
/// `[from, to)` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourQuery {
    pub user: Option<Arc<str>>,
    pub from: i64,
    pub to: i64,
}

/// Sums per (user, hour, backend), as records add them; everyone's rows are their sums over
/// users.
#[derive(Debug, Default)]
pub struct Rollups {
    by_user: HashMap<(Arc<str>, i64, Arc<str>), Sums>,
}

impl Rollups {
    pub fn add(&mut self, record: &RequestRecord) {
        let key = (Arc::clone(&record.user), hour_of(record.at_ms), Arc::clone(&record.backend));
        self.by_user.entry(key).or_default().add(&Sums::of(record));
    }

    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    /// Drops the hours before `hour`.
    pub fn prune_before(&mut self, hour: i64) {
        self.by_user.retain(|(_, h, _), _| *h >= hour);
    }

    /// The rows `query` asks for, by hour then backend.
    pub fn read(&self, query: &HourQuery) -> Vec<HourRow> {
        let mut rows: HashMap<(i64, Arc<str>), Sums> = HashMap::new();
        for ((user, hour, backend), sums) in &self.by_user {
            let wanted = query.user.as_ref().is_none_or(|u| u == user) && (query.from..query.to).contains(hour);
            if wanted {
                rows.entry((*hour, Arc::clone(backend))).or_default().add(sums);
            }
        }
        sorted(rows)
    }
}

/// Rows by hour, then backend.
pub fn sorted(rows: HashMap<(i64, Arc<str>), Sums>) -> Vec<HourRow> {
    let mut out: Vec<HourRow> =
        rows.into_iter().map(|((hour, backend), sums)| HourRow { hour, backend, sums }).collect();
    out.sort_by(|a, b| (a.hour, &a.backend).cmp(&(b.hour, &b.backend)));
    out
}

#[cfg(test)]
pub(in crate::ledger) mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    /// A record of `user` on `backend` (10 prompt and 3 completion tokens).
    pub(in crate::ledger) fn record(
        user: &str,
        backend: &str,
        at_ms: i64,
        cost: i64,
        status: u16,
        latency_ms: u64,
    ) -> RequestRecord {
        RequestRecord {
            at_ms,
            user: user.into(),
            route: "auto".into(),
            backend: backend.into(),
            reason: "cost_first".into(),
            prompt_tokens: 10,
            completion_tokens: 3,
            cost: Usd::from_pico(cost),
            status,
            latency_ms,
            request_id: None,
        }
    }

    #[test]
    fn an_hour_starts_on_the_hour_in_utc_before_and_after_the_epoch() {
        assert_eq!(hour_of(1_764_547_200_000 + 3_599_999), 1_764_547_200);
        assert_eq!(hour_of(1_764_547_200_000 + 3_600_000), 1_764_550_800);
        assert_eq!(hour_of(-1), -3600);
    }

    proptest! {
        /// Whatever the records, the rollups' rows equal a brute-force sum over the records
        /// for every query, per user and for everyone.
        #[test]
        fn rollups_equal_a_brute_force_sum_over_the_records(
            records in proptest::collection::vec(
                (0usize..4, 0usize..3, 0i64..(5 * 3_600_000), 0i64..1_000_000, prop_oneof![Just(200u16), Just(502u16)], 0u64..5_000),
                0..200,
            ),
            from_hour in 0i64..5,
            span in 0i64..6,
            user_pick in proptest::option::of(0usize..4),
        ) {
            let users = ["alice", "bob", "carol", "dave"];
            let backends = ["gpu", "cpu", "api"];
            let base = 1_764_547_200_000;
            let records: Vec<RequestRecord> = records
                .into_iter()
                .map(|(u, b, at, cost, status, latency)| record(users[u], backends[b], base + at, cost, status, latency))
                .collect();
            let mut rollups = Rollups::default();
            for r in &records {
                rollups.add(r);
            }
            let from = base / 1000 + from_hour * HOUR_S;
            let to = from + span * HOUR_S;
            let user: Option<Arc<str>> = user_pick.map(|u| users[u].into());
            let got = rollups.read(&HourQuery { user: user.clone(), from, to });

            let mut expected: std::collections::BTreeMap<(i64, String), Sums> = std::collections::BTreeMap::new();
            for r in &records {
                let hour = (r.at_ms / 1000) / 3600 * 3600;
                if user.as_ref().is_some_and(|u| **u != *r.user) || hour < from || hour >= to {
                    continue;
                }
                let sums = expected.entry((hour, r.backend.to_string())).or_default();
                sums.requests += 1;
                sums.errors += u64::from(r.status >= 400);
                sums.spent = Usd::from_pico(sums.spent.pico() + r.cost.pico());
                sums.prompt_tokens += r.prompt_tokens;
                sums.completion_tokens += r.completion_tokens;
                sums.latency_ms += r.latency_ms;
            }
            let got: Vec<((i64, String), Sums)> = got.into_iter().map(|row| ((row.hour, row.backend.to_string()), row.sums)).collect();
            prop_assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
        }
    }
}
