//! `GET /admin/dashboard/spend`: spend over time, everyone's or one user's, in hourly or daily
//! buckets (UTC), read from the ledger's hourly rollups: a window of a month is a few hundred
//! rows whatever the number of records.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::ApiError;
use crate::http::admin::Admin;
use crate::ledger::period;
use crate::ledger::rollup::{HourQuery, HourRow, Sums, HOUR_S};

const DAY_S: i64 = 86_400;
/// Buckets in one answer at most: two months of hours, or years of days.
const MAX_BUCKETS: i64 = 1500;

#[derive(Deserialize)]
pub struct SpendQuery {
    /// `hour` (default) or `day`.
    bucket: Option<String>,
    /// RFC 3339; default `to` minus 48 hours (hourly) or 31 days (daily).
    from: Option<String>,
    /// RFC 3339; default the end of the current bucket.
    to: Option<String>,
    /// One user's spend; everyone's when absent.
    user: Option<String>,
}

#[derive(Serialize, Default, Clone, PartialEq, Debug)]
pub struct Figures {
    spend_usd: f64,
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// What the premium backends (the highest quality in the running config) served.
    premium_spend_usd: f64,
    premium_requests: u64,
}

impl Figures {
    fn add(&mut self, sums: &Sums, premium: bool) {
        self.spend_usd += sums.spent.as_f64();
        self.requests += sums.requests;
        self.errors += sums.errors;
        self.prompt_tokens += sums.prompt_tokens;
        self.completion_tokens += sums.completion_tokens;
        if premium {
            self.premium_spend_usd += sums.spent.as_f64();
            self.premium_requests += sums.requests;
        }
    }
}

#[derive(Serialize, Default, Clone, PartialEq, Debug)]
struct BackendFigures {
    spend_usd: f64,
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(skip)]
    latency_ms: u64,
    mean_latency_ms: Option<f64>,
}

#[derive(Serialize, Debug, PartialEq)]
struct Point {
    start: String,
    #[serde(flatten)]
    figures: Figures,
    by_backend: BTreeMap<String, BackendFigures>,
}

#[derive(Serialize)]
pub struct Spend {
    object: &'static str,
    user: Option<String>,
    bucket: &'static str,
    timezone: &'static str,
    from: String,
    to: String,
    points: Vec<Point>,
    totals: Figures,
}

/// A window of whole buckets: `[from, to)`, both on a bucket's start (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub bucket_s: i64,
    pub from: i64,
    pub to: i64,
}

impl Window {
    /// The window a query asks for at `now`, widened to whole buckets.
    fn of(q: &SpendQuery, now: i64) -> Result<Self, ApiError> {
        let bucket_s = match q.bucket.as_deref() {
            None | Some("hour") => HOUR_S,
            Some("day") => DAY_S,
            Some(other) => {
                let message = format!("`bucket` must be `hour` or `day`, not `{other}`");
                return Err(ApiError::bad_request(message, Some("bucket")));
            }
        };
        let time = |field: &'static str, text: &Option<String>| -> Result<Option<i64>, ApiError> {
            text.as_deref()
                .map(|t| {
                    period::parse_rfc3339(t).map(|ms| ms.div_euclid(1000)).ok_or_else(|| {
                        let message = format!("`{field}` must be an RFC 3339 time such as 2026-12-01T00:00:00Z");
                        ApiError::bad_request(message, Some(field))
                    })
                })
                .transpose()
        };
        let to = ceil(time("to", &q.to)?.unwrap_or(now + 1), bucket_s);
        let default_span = if bucket_s == HOUR_S { 48 * HOUR_S } else { 31 * DAY_S };
        let from = floor(time("from", &q.from)?.unwrap_or(to - default_span), bucket_s);
        if from >= to {
            return Err(ApiError::bad_request("`from` must be before `to`", Some("from")));
        }
        if (to - from) / bucket_s > MAX_BUCKETS {
            let message = format!("at most {MAX_BUCKETS} buckets in one answer: narrow the window or use `bucket=day`");
            return Err(ApiError::bad_request(message, Some("from")));
        }
        Ok(Self { bucket_s, from, to })
    }
}

fn floor(t: i64, step: i64) -> i64 {
    t.div_euclid(step) * step
}

fn ceil(t: i64, step: i64) -> i64 {
    floor(t + step - 1, step)
}

/// The rollup rows summed per bucket of `window`, every bucket present (empty ones too).
fn bucketed(rows: &[HourRow], window: Window, premium: &HashSet<String>) -> (Vec<Point>, Figures) {
    let buckets = usize::try_from((window.to - window.from) / window.bucket_s).unwrap_or(0);
    let mut points: Vec<Point> = (0..buckets)
        .map(|i| Point {
            start: period::rfc3339(window.from + i64::try_from(i).unwrap_or(0) * window.bucket_s),
            figures: Figures::default(),
            by_backend: BTreeMap::new(),
        })
        .collect();
    let mut totals = Figures::default();
    for row in rows {
        let Ok(i) = usize::try_from((row.hour - window.from).div_euclid(window.bucket_s)) else { continue };
        let Some(point) = points.get_mut(i) else { continue };
        let is_premium = premium.contains(&*row.backend);
        point.figures.add(&row.sums, is_premium);
        totals.add(&row.sums, is_premium);
        let backend = point.by_backend.entry(row.backend.to_string()).or_default();
        backend.spend_usd += row.sums.spent.as_f64();
        backend.requests += row.sums.requests;
        backend.errors += row.sums.errors;
        backend.prompt_tokens += row.sums.prompt_tokens;
        backend.completion_tokens += row.sums.completion_tokens;
        backend.latency_ms += row.sums.latency_ms;
        #[expect(clippy::cast_precision_loss, reason = "a mean")]
        let mean = (backend.requests > 0).then(|| backend.latency_ms as f64 / backend.requests as f64);
        backend.mean_latency_ms = mean;
    }
    (points, totals)
}

/// The figures of everyone's rollups from each of `starts` to `to` (hour starts), read at
/// once: what the overview's today and this month show.
pub async fn spans<const N: usize>(state: &AppState, starts: [i64; N], to: i64) -> Result<[Figures; N], ApiError> {
    let from = starts.iter().copied().min().unwrap_or(to);
    let rows = state.ledger.hourly(HourQuery { user: None, from, to }).await?;
    let premium = crate::http::usage::premium_backends(&state.snapshot.load().config);
    let mut out: [Figures; N] = std::array::from_fn(|_| Figures::default());
    for row in &rows {
        for (figures, start) in out.iter_mut().zip(starts) {
            if row.hour >= start {
                figures.add(&row.sums, premium.contains(&*row.backend));
            }
        }
    }
    Ok(out)
}

/// `GET /admin/dashboard/spend` (admin).
pub async fn spend(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Query(q): Query<SpendQuery>,
) -> Result<Json<Spend>, ApiError> {
    let window = Window::of(&q, crate::clock::unix_now())?;
    let user: Option<Arc<str>> = q.user.as_deref().map(Arc::from);
    let rows = state.ledger.hourly(HourQuery { user, from: window.from, to: window.to }).await?;
    let premium = crate::http::usage::premium_backends(&state.snapshot.load().config);
    let (points, totals) = bucketed(&rows, window, &premium);
    Ok(Json(Spend {
        object: "dashboard.spend",
        user: q.user,
        bucket: if window.bucket_s == HOUR_S { "hour" } else { "day" },
        timezone: "UTC",
        from: period::rfc3339(window.from),
        to: period::rfc3339(window.to),
        points,
        totals,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cost::Usd;

    fn query(bucket: Option<&str>, from: Option<&str>, to: Option<&str>) -> SpendQuery {
        SpendQuery { bucket: bucket.map(Into::into), from: from.map(Into::into), to: to.map(Into::into), user: None }
    }

    #[test]
    fn a_window_covers_whole_utc_buckets_and_defaults_to_the_last_48_hours() {
        let now = period::parse_rfc3339("2026-12-06T07:13:24Z").unwrap() / 1000;
        let w = Window::of(&query(None, None, None), now).unwrap();
        assert_eq!(period::rfc3339(w.to), "2026-12-06T08:00:00Z");
        assert_eq!(period::rfc3339(w.from), "2026-12-04T08:00:00Z");
        let w = Window::of(&query(Some("day"), Some("2026-12-01T05:00:00Z"), None), now).unwrap();
        assert_eq!(
            (period::rfc3339(w.from), period::rfc3339(w.to)),
            ("2026-12-01T00:00:00Z".into(), "2026-12-07T00:00:00Z".into())
        );
    }

    #[test]
    fn bad_windows_are_refused_naming_the_field() {
        let now = 1_764_547_200;
        for (q, field) in [
            (query(Some("week"), None, None), "bucket"),
            (query(None, Some("yesterday"), None), "from"),
            (query(None, Some("2026-12-06T00:00:00Z"), Some("2026-12-05T00:00:00Z")), "from"),
            (query(None, Some("2020-01-01T00:00:00Z"), Some("2026-01-01T00:00:00Z")), "from"),
        ] {
            let ApiError::BadRequest { param, .. } = Window::of(&q, now).unwrap_err() else { panic!("a 400") };
            assert_eq!(param, Some(field));
        }
    }

    #[test]
    fn rows_land_in_their_bucket_and_add_up_to_the_totals() {
        let day = period::parse_rfc3339("2026-12-01T00:00:00Z").unwrap() / 1000;
        let window = Window { bucket_s: DAY_S, from: day, to: day + 2 * DAY_S };
        let row = |hour: i64, backend: &str, pico: i64| HourRow {
            hour,
            backend: backend.into(),
            sums: Sums {
                requests: 2,
                errors: 1,
                spent: Usd::from_pico(pico),
                prompt_tokens: 10,
                completion_tokens: 5,
                latency_ms: 300,
            },
        };
        let rows = [
            row(day, "gpu", 1_000_000),
            row(day + 5 * HOUR_S, "cpu", 2_000_000),
            row(day + 30 * HOUR_S, "gpu", 4_000_000),
            row(day + 50 * HOUR_S, "gpu", 8_000_000), // past the window
        ];
        let premium = HashSet::from(["gpu".to_owned()]);
        let (points, totals) = bucketed(&rows, window, &premium);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].start, "2026-12-01T00:00:00Z");
        assert_eq!(points[0].figures.requests, 4);
        assert!((points[0].figures.spend_usd - 3e-6).abs() < 1e-15);
        assert!((points[0].figures.premium_spend_usd - 1e-6).abs() < 1e-15);
        assert_eq!(points[0].by_backend["gpu"].mean_latency_ms, Some(150.0));
        assert_eq!(points[1].figures.premium_requests, 2);
        assert_eq!((totals.requests, totals.errors, totals.prompt_tokens), (6, 3, 30));
        assert!((totals.spend_usd - 7e-6).abs() < 1e-15);
    }
}
