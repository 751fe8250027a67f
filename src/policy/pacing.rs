//! Budget pacing: is a user spending faster than its period elapses?

use crate::cost::Usd;

/// Whether `committed` (spent and reserved) is a larger share of `budget` than the share of the
/// period `[start, end)` elapsed at `now`, by more than `slack`. Ratios only compare; no money
/// is computed in floating point.
pub fn ahead_of_pace(committed: Usd, budget: Usd, start: i64, end: i64, now: i64, slack: f64) -> bool {
    if budget <= Usd::ZERO || end <= start {
        return false;
    }
    #[expect(clippy::cast_precision_loss, reason = "a ratio for a comparison")]
    let (spent_share, elapsed_share) = (
        committed.pico() as f64 / budget.pico() as f64,
        (now - start).clamp(0, end - start) as f64 / (end - start) as f64,
    );
    spent_share > elapsed_share + slack
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn ahead_only_beyond_the_slack() {
        let budget = Usd::from_pico(1000);
        // A quarter of the day gone: 25% spent is on pace, 29% within a 5% slack, 31% ahead.
        assert!(!ahead_of_pace(Usd::from_pico(250), budget, 0, DAY, DAY / 4, 0.05));
        assert!(!ahead_of_pace(Usd::from_pico(290), budget, 0, DAY, DAY / 4, 0.05));
        assert!(ahead_of_pace(Usd::from_pico(310), budget, 0, DAY, DAY / 4, 0.05));
        assert!(!ahead_of_pace(Usd::from_pico(999), budget, 0, DAY, DAY, 0.0), "the period is over");
    }
}
