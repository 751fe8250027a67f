//! The metric series a request updates when it settles, looked up once per (user, backend)
//! and config snapshot instead of once per request: each lookup in a labelled family hashes the
//! label values and takes the family's lock, and a settlement updated seven series.

use std::sync::{Arc, OnceLock};

use prometheus::{Counter, Histogram, IntCounter};

use crate::metrics::Metrics;

/// The series of one (user, backend) pair. The conditional ones are created on first use, so
/// that a pair shows only what it has done (no zero `savings` for a route without a baseline).
pub struct PairMeters {
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub cost: Counter,
    pub request_duration: Histogram,
    user: Arc<str>,
    backend: Arc<str>,
    savings: OnceLock<Counter>,
    premium_tokens: OnceLock<IntCounter>,
    usage_estimated: OnceLock<IntCounter>,
    /// `requests_total` with status 200 and the first routing reason seen: a user's requests
    /// to one backend mostly share their reason.
    answered: OnceLock<(String, IntCounter)>,
}

impl PairMeters {
    fn new(metrics: &Metrics, user: &str, backend: &str) -> Self {
        Self {
            prompt_tokens: metrics.tokens.with_label_values(&[user, backend, "prompt"]),
            completion_tokens: metrics.tokens.with_label_values(&[user, backend, "completion"]),
            cost: metrics.cost.with_label_values(&[user, backend]),
            request_duration: metrics.request_duration.with_label_values(&[backend]),
            user: user.into(),
            backend: backend.into(),
            savings: OnceLock::new(),
            premium_tokens: OnceLock::new(),
            usage_estimated: OnceLock::new(),
            answered: OnceLock::new(),
        }
    }

    /// The user's name, as request records carry it.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// The backend's name, as request records carry it.
    pub fn backend(&self) -> &Arc<str> {
        &self.backend
    }

    /// Counts a settled request in `requests_total{backend,tier,reason,status}`.
    pub fn count_request(&self, metrics: &Metrics, tier: &str, reason: &str, status: &str) {
        if status == "200" {
            let (first_reason, counter) = self.answered.get_or_init(|| {
                (reason.to_owned(), metrics.requests.with_label_values(&[&self.backend, tier, reason, status]))
            });
            if first_reason == reason {
                counter.inc();
                return;
            }
        }
        metrics.requests.with_label_values(&[&self.backend, tier, reason, status]).inc();
    }

    pub fn savings(&self, metrics: &Metrics) -> &Counter {
        self.savings.get_or_init(|| metrics.savings.with_label_values(&[&self.user]))
    }

    pub fn premium_tokens(&self, metrics: &Metrics) -> &IntCounter {
        self.premium_tokens.get_or_init(|| metrics.premium_tokens.with_label_values(&[&self.user]))
    }

    pub fn usage_estimated(&self, metrics: &Metrics) -> &IntCounter {
        self.usage_estimated.get_or_init(|| metrics.usage_estimated.with_label_values(&[&self.backend]))
    }
}

/// Every pair's series for one snapshot, by user and backend index; a user's row is allocated
/// on its first request, so a config with many users costs a pointer each until they come.
pub struct MeterTable {
    backends: usize,
    rows: Box<[OnceLock<Row>]>,
}

/// One user's pairs, by backend index.
type Row = Box<[OnceLock<Arc<PairMeters>>]>;

impl MeterTable {
    pub fn new(users: usize, backends: usize) -> Self {
        Self { backends, rows: (0..users).map(|_| OnceLock::new()).collect() }
    }

    /// The series of `user` (its index in the snapshot's users, named `user_name`) on backend
    /// `backend`, named `backend_name`.
    pub fn pair(
        &self,
        metrics: &Metrics,
        (user, user_name): (usize, &str),
        (backend, backend_name): (usize, &str),
    ) -> Arc<PairMeters> {
        let cell = self
            .rows
            .get(user)
            .and_then(|row| row.get_or_init(|| (0..self.backends).map(|_| OnceLock::new()).collect()).get(backend));
        match cell {
            Some(cell) => Arc::clone(cell.get_or_init(|| Arc::new(PairMeters::new(metrics, user_name, backend_name)))),
            // Not this snapshot's user or backend: correct, only not cached.
            None => Arc::new(PairMeters::new(metrics, user_name, backend_name)),
        }
    }
}

impl std::fmt::Debug for MeterTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeterTable").field("users", &self.rows.len()).field("backends", &self.backends).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_looked_up_once_and_updates_the_labelled_series() {
        let metrics = Metrics::new().unwrap();
        let table = MeterTable::new(2, 2);
        let first = table.pair(&metrics, (1, "ann"), (0, "gpu"));
        let again = table.pair(&metrics, (1, "ann"), (0, "gpu"));
        assert!(Arc::ptr_eq(&first, &again));
        first.prompt_tokens.inc_by(3);
        again.completion_tokens.inc_by(4);
        first.savings(&metrics).inc_by(0.5);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "gpu", "prompt"]).get(), 3);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "gpu", "completion"]).get(), 4);
        assert_eq!(metrics.savings.with_label_values(&["ann"]).get(), 0.5);
        // Other pairs have series of their own; unknown indices still count, uncached.
        let other = table.pair(&metrics, (0, "bob"), (1, "cpu"));
        assert!(!Arc::ptr_eq(&first, &other));
        table.pair(&metrics, (9, "eve"), (0, "gpu")).prompt_tokens.inc();
        assert_eq!(metrics.tokens.with_label_values(&["eve", "gpu", "prompt"]).get(), 1);
    }

    #[test]
    fn conditional_series_appear_only_once_used() {
        let metrics = Metrics::new().unwrap();
        let table = MeterTable::new(1, 1);
        let pair = table.pair(&metrics, (0, "ann"), (0, "gpu"));
        pair.cost.inc_by(1.0);
        let text = metrics.render().unwrap();
        assert!(!text.contains("tollgate_savings_usd_total{"), "{text}");
        assert!(!text.contains("tollgate_usage_estimated_total{"), "{text}");
        pair.usage_estimated(&metrics).inc();
        assert!(metrics.render().unwrap().contains("tollgate_usage_estimated_total{backend=\"gpu\"} 1"));
    }

    #[test]
    fn requests_are_counted_under_their_own_reason_and_status() {
        let metrics = Metrics::new().unwrap();
        let table = MeterTable::new(1, 1);
        let pair = table.pair(&metrics, (0, "ann"), (0, "gpu"));
        pair.count_request(&metrics, "premium", "quality-first", "200");
        pair.count_request(&metrics, "premium", "quality-first", "200");
        pair.count_request(&metrics, "premium", "fallback:cpu", "200");
        pair.count_request(&metrics, "premium", "quality-first", "502");
        let count =
            |reason: &str, status: &str| metrics.requests.with_label_values(&["gpu", "premium", reason, status]).get();
        assert_eq!(count("quality-first", "200"), 2);
        assert_eq!(count("fallback:cpu", "200"), 1);
        assert_eq!(count("quality-first", "502"), 1);
    }
}
