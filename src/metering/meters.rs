//! The metric series a request updates when it settles, looked up once per (principal,
//! backend) and config snapshot instead of once per request: each lookup in a labelled family
//! hashes the label values and takes the family's lock, and a settlement updated seven series.
//!
//! Per-user series exist only for users that have them (config users, API users created with
//! `"metrics": true`); everyone's spend also goes to per-plan and per-team series, so the
//! number of series is bounded by the configuration, not by the number of subscribers.
//!
//! The users without series of their own share one pair per (plan, team, backend)
//! ([`SharedPairs`]): their series are the same ones, and a pair shared by ten thousand users
//! stays in the CPU's caches, where ten thousand pairs of their own did not (each request's
//! settlement missed on them).

use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use prometheus::{Counter, Histogram, IntCounter};

use crate::config::User;
use crate::metrics::Metrics;

/// The `plan` label of a user on no plan.
pub const NO_PLAN: &str = "none";

/// A user's own series on one backend.
pub struct UserSeries {
    user: Arc<str>,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub cost: Counter,
    savings: OnceLock<Counter>,
    premium_tokens: OnceLock<IntCounter>,
}

/// The series of one (principal, backend) pair. The conditional ones are created on first
/// use, so that a pair shows only what it has done (no zero `savings` for a route without a
/// baseline).
pub struct PairMeters {
    /// `None`: the user has no series of its own.
    pub user_series: Option<UserSeries>,
    pub plan_cost: Counter,
    pub team_cost: Option<Counter>,
    pub request_duration: Histogram,
    plan: Arc<str>,
    backend: Arc<str>,
    plan_savings: OnceLock<Counter>,
    usage_estimated: OnceLock<IntCounter>,
    /// `requests_total` with status 200 and the first routing reason seen: a user's requests
    /// to one backend mostly share their reason.
    answered: OnceLock<(String, IntCounter)>,
}

/// Whose series a shared pair holds: (plan, team, backend).
type SharedBy = (Arc<str>, Option<Arc<str>>, Arc<str>);

/// The pairs of the users without series of their own: bounded by the configuration and the
/// teams, like the series they hold.
#[derive(Default)]
pub struct SharedPairs(DashMap<SharedBy, Arc<PairMeters>>);

impl PairMeters {
    /// `user`'s pair on `backend`: its own when it has series, else the one its plan and team
    /// share.
    pub fn of(metrics: &Metrics, user: &User, backend: &str) -> Arc<Self> {
        let plan: Arc<str> = user.plan.clone().unwrap_or_else(|| NO_PLAN.into());
        if user.series {
            return Arc::new(Self::new(metrics, user, plan, backend));
        }
        let shared = metrics.shared_pairs.0.entry((Arc::clone(&plan), user.team.clone(), backend.into()));
        Arc::clone(shared.or_insert_with(|| Arc::new(Self::new(metrics, user, plan, backend))).value())
    }

    fn new(metrics: &Metrics, user: &User, plan: Arc<str>, backend: &str) -> Self {
        let name = user.name.as_str();
        Self {
            user_series: user.series.then(|| UserSeries {
                user: name.into(),
                prompt_tokens: metrics.tokens.with_label_values(&[name, backend, "prompt"]),
                completion_tokens: metrics.tokens.with_label_values(&[name, backend, "completion"]),
                cost: metrics.cost.with_label_values(&[name, backend]),
                savings: OnceLock::new(),
                premium_tokens: OnceLock::new(),
            }),
            plan_cost: metrics.plan_cost.with_label_values(&[&plan, backend]),
            team_cost: user.team.as_ref().map(|team| metrics.team_cost.with_label_values(&[team, backend])),
            request_duration: metrics.request_duration.with_label_values(&[backend]),
            plan,
            backend: backend.into(),
            plan_savings: OnceLock::new(),
            usage_estimated: OnceLock::new(),
            answered: OnceLock::new(),
        }
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

    /// Adds one settled request's tokens and cost to every series it belongs to.
    pub fn add(&self, prompt_tokens: u64, completion_tokens: u64, cost: f64) {
        if let Some(series) = &self.user_series {
            series.prompt_tokens.inc_by(prompt_tokens);
            series.completion_tokens.inc_by(completion_tokens);
            series.cost.inc_by(cost);
        }
        self.plan_cost.inc_by(cost);
        if let Some(team) = &self.team_cost {
            team.inc_by(cost);
        }
    }

    pub fn add_savings(&self, metrics: &Metrics, usd: f64) {
        if let Some(series) = &self.user_series {
            series.savings.get_or_init(|| metrics.savings.with_label_values(&[&series.user])).inc_by(usd);
        }
        self.plan_savings.get_or_init(|| metrics.plan_savings.with_label_values(&[&self.plan])).inc_by(usd);
    }

    pub fn add_premium_tokens(&self, metrics: &Metrics, tokens: u64) {
        if let Some(series) = &self.user_series {
            series
                .premium_tokens
                .get_or_init(|| metrics.premium_tokens.with_label_values(&[&series.user]))
                .inc_by(tokens);
        }
    }

    pub fn usage_estimated(&self, metrics: &Metrics) -> &IntCounter {
        self.usage_estimated.get_or_init(|| metrics.usage_estimated.with_label_values(&[&self.backend]))
    }
}

/// Backends whose pairs sit inline in a principal (the first ones of the config).
const INLINE_PAIRS: usize = 2;

/// One principal's pairs, by backend index: the first ones inline, in the principal's own
/// cache lines (a separate allocation was one more miss per request with thousands of
/// principals in use); the others allocated on the first request to one of them.
#[derive(Default)]
pub struct MeterRow {
    first: [OnceLock<Arc<PairMeters>>; INLINE_PAIRS],
    rest: OnceLock<Box<[OnceLock<Arc<PairMeters>>]>>,
}

impl MeterRow {
    /// Touches the first pair's slot, read when the request settles: see
    /// [`Principal::warm`](crate::tenancy::Principal::warm).
    pub fn warm(&self) {
        std::hint::black_box(self.first[0].get().is_some());
    }

    /// The series of `user` on backend `index` (named `backend`) of a snapshot with
    /// `backends` backends.
    pub fn pair(
        &self,
        metrics: &Metrics,
        user: &User,
        (index, backend): (usize, &str),
        backends: usize,
    ) -> Arc<PairMeters> {
        let slot = match index.checked_sub(INLINE_PAIRS) {
            None => self.first.get(index),
            Some(past) => {
                self.rest.get_or_init(|| (INLINE_PAIRS..backends).map(|_| OnceLock::new()).collect()).get(past)
            }
        };
        match slot {
            Some(cell) => {
                let pair = cell.get_or_init(|| PairMeters::of(metrics, user, backend));
                // A principal read before a reload may meet a request on the new snapshot,
                // whose backend at this index is another: correct, only not cached.
                if &*pair.backend == backend {
                    return Arc::clone(pair);
                }
                PairMeters::of(metrics, user, backend)
            }
            None => PairMeters::of(metrics, user, backend),
        }
    }
}

impl std::fmt::Debug for MeterRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeterRow").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn user(name: &str, series: bool, plan: Option<&str>, team: Option<&str>) -> User {
        let mut u = User::new(name, &Limits::default());
        u.series = series;
        u.plan = plan.map(Into::into);
        u.team = team.map(Into::into);
        u
    }

    #[test]
    fn a_pair_is_looked_up_once_and_updates_the_labelled_series() {
        let metrics = Metrics::new().unwrap();
        let (ann, row) = (user("ann", true, Some("pro"), None), MeterRow::default());
        let first = row.pair(&metrics, &ann, (0, "gpu"), 2);
        let again = row.pair(&metrics, &ann, (0, "gpu"), 2);
        assert!(Arc::ptr_eq(&first, &again));
        first.add(3, 4, 0.25);
        first.add_savings(&metrics, 0.5);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "gpu", "prompt"]).get(), 3);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "gpu", "completion"]).get(), 4);
        assert_eq!(metrics.savings.with_label_values(&["ann"]).get(), 0.5);
        assert_eq!(metrics.plan_cost.with_label_values(&["pro", "gpu"]).get(), 0.25);
        // Another backend at the same index after a reload: counted, not cached.
        let moved = row.pair(&metrics, &ann, (0, "cpu"), 2);
        assert!(!Arc::ptr_eq(&first, &moved));
        moved.add(1, 0, 0.0);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "cpu", "prompt"]).get(), 1);
    }

    #[test]
    fn pairs_past_the_inline_ones_are_kept_too() {
        let metrics = Metrics::new().unwrap();
        let (ann, row) = (user("ann", true, None, None), MeterRow::default());
        for (index, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let first = row.pair(&metrics, &ann, (index, name), 4);
            assert!(Arc::ptr_eq(&first, &row.pair(&metrics, &ann, (index, name), 4)), "backend {name}");
            first.add(1, 0, 0.0);
            assert_eq!(metrics.tokens.with_label_values(&["ann", name, "prompt"]).get(), 1);
        }
        // A reload that added backends: those past the row's end are counted, not cached.
        let added = row.pair(&metrics, &ann, (4, "e"), 5);
        assert!(!Arc::ptr_eq(&added, &row.pair(&metrics, &ann, (4, "e"), 5)));
    }

    #[test]
    fn a_user_without_series_counts_only_in_its_plan_and_team() {
        let metrics = Metrics::new().unwrap();
        let bob = user("bob", false, Some("free"), Some("acme"));
        let pair = MeterRow::default().pair(&metrics, &bob, (0, "cpu"), 1);
        pair.add(10, 20, 0.5);
        pair.add_savings(&metrics, 0.1);
        let text = metrics.render().unwrap();
        assert!(!text.contains("user=\"bob\""), "{text}");
        assert_eq!(metrics.plan_cost.with_label_values(&["free", "cpu"]).get(), 0.5);
        assert_eq!(metrics.team_cost.with_label_values(&["acme", "cpu"]).get(), 0.5);
        assert_eq!(metrics.plan_savings.with_label_values(&["free"]).get(), 0.1);
    }

    #[test]
    fn users_without_series_share_their_plan_and_teams_pair_and_series_users_do_not() {
        let metrics = Metrics::new().unwrap();
        let pair = |u: &User| MeterRow::default().pair(&metrics, u, (0, "cpu"), 1);
        let (bob, eve) = (
            pair(&user("bob", false, Some("free"), Some("acme"))),
            pair(&user("eve", false, Some("free"), Some("acme"))),
        );
        assert!(Arc::ptr_eq(&bob, &eve));
        let other_team = pair(&user("kim", false, Some("free"), Some("zeta")));
        let other_plan = pair(&user("lee", false, Some("pro"), Some("acme")));
        assert!(!Arc::ptr_eq(&bob, &other_team) && !Arc::ptr_eq(&bob, &other_plan));
        let (ann, amy) = (
            pair(&user("ann", true, Some("free"), Some("acme"))),
            pair(&user("amy", true, Some("free"), Some("acme"))),
        );
        assert!(!Arc::ptr_eq(&ann, &amy) && !Arc::ptr_eq(&ann, &bob));
        bob.add(1, 1, 0.25);
        eve.add(1, 1, 0.5);
        ann.add(2, 0, 1.0);
        assert_eq!(metrics.team_cost.with_label_values(&["acme", "cpu"]).get(), 1.75);
        assert_eq!(metrics.tokens.with_label_values(&["ann", "cpu", "prompt"]).get(), 2);
        let text = metrics.render().unwrap();
        assert!(
            !text.contains("user=\"bob\"") && !text.contains("user=\"eve\"") && text.contains("user=\"amy\""),
            "{text}"
        );
    }

    #[test]
    fn conditional_series_appear_only_once_used() {
        let metrics = Metrics::new().unwrap();
        let pair = MeterRow::default().pair(&metrics, &user("ann", true, None, None), (0, "gpu"), 1);
        pair.add(0, 0, 1.0);
        let text = metrics.render().unwrap();
        assert!(!text.contains("tollgate_savings_usd_total{"), "{text}");
        assert!(!text.contains("tollgate_usage_estimated_total{"), "{text}");
        assert!(text.contains("tollgate_plan_cost_usd_total{backend=\"gpu\",plan=\"none\"} 1"), "{text}");
        pair.usage_estimated(&metrics).inc();
        assert!(metrics.render().unwrap().contains("tollgate_usage_estimated_total{backend=\"gpu\"} 1"));
    }

    #[test]
    fn requests_are_counted_under_their_own_reason_and_status() {
        let metrics = Metrics::new().unwrap();
        let pair = MeterRow::default().pair(&metrics, &user("ann", true, None, None), (0, "gpu"), 1);
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
