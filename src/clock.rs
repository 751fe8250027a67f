//! Wall-clock time, for UTC budget periods and record timestamps. Durations and deadlines use
//! `tokio::time::Instant` instead (monotonic, and pausable in tests).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Seconds since the Unix epoch at `at`, from a moment known on both clocks (`anchor_ms` on the
/// wall clock is `anchor` on the monotonic one): one reading of the monotonic clock instead of
/// one of each, for the instants a request reads anyway.
pub fn unix_at(anchor_ms: i64, anchor: tokio::time::Instant, at: tokio::time::Instant) -> i64 {
    let since = i64::try_from(at.saturating_duration_since(anchor).as_millis()).unwrap_or(i64::MAX);
    anchor_ms.saturating_add(since).div_euclid(1000)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Nanoseconds since the Unix epoch (span times).
pub fn unix_now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wall_time_derives_from_the_anchor_plus_the_monotonic_time_since() {
        let anchor = tokio::time::Instant::now();
        let anchor_ms = 1_700_000_000_999;
        assert_eq!(unix_at(anchor_ms, anchor, anchor), 1_700_000_000);
        // One millisecond later the second has turned.
        assert_eq!(unix_at(anchor_ms, anchor, anchor + Duration::from_millis(1)), 1_700_000_001);
        assert_eq!(unix_at(anchor_ms, anchor, anchor + Duration::from_secs(86_400)), 1_700_086_400);
        // An instant before the anchor (a reading taken earlier) counts as the anchor.
        assert_eq!(unix_at(anchor_ms, anchor + Duration::from_secs(5), anchor), 1_700_000_000);
    }
}
