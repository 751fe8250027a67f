//! Budget periods in UTC: where the current one started and when it ends. Pure calendar
//! arithmetic on Unix seconds (no time-zone database needed: periods are UTC by contract).

use crate::config::BudgetPeriod;

const SECONDS_PER_DAY: i64 = 86_400;

/// Start of the period holding `now` (Unix seconds). `Total` never rolls over: it starts at 0.
pub fn start(period: BudgetPeriod, now: i64) -> i64 {
    match period {
        BudgetPeriod::Day => now.div_euclid(SECONDS_PER_DAY) * SECONDS_PER_DAY,
        BudgetPeriod::Month => {
            let (year, month, _) = civil_from_days(now.div_euclid(SECONDS_PER_DAY));
            days_from_civil(year, month, 1) * SECONDS_PER_DAY
        }
        BudgetPeriod::Total => 0,
    }
}

/// End of the period holding `now`; `None` for `Total`.
pub fn end(period: BudgetPeriod, now: i64) -> Option<i64> {
    match period {
        BudgetPeriod::Day => Some(start(period, now) + SECONDS_PER_DAY),
        BudgetPeriod::Month => {
            let (year, month, _) = civil_from_days(now.div_euclid(SECONDS_PER_DAY));
            let (year, month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
            Some(days_from_civil(year, month, 1) * SECONDS_PER_DAY)
        }
        BudgetPeriod::Total => None,
    }
}

pub fn name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Month => "month",
        BudgetPeriod::Total => "total",
    }
}

/// `2026-11-28T00:00:00Z`
pub fn rfc3339(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(SECONDS_PER_DAY));
    let secs = unix.rem_euclid(SECONDS_PER_DAY);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// RFC 3339 with milliseconds when there are any: `2026-11-28T09:30:00.250Z`.
pub fn rfc3339_ms(at_ms: i64) -> String {
    let seconds = rfc3339(at_ms.div_euclid(1000));
    match at_ms.rem_euclid(1000) {
        0 => seconds,
        ms => format!("{}.{ms:03}Z", seconds.trim_end_matches('Z')),
    }
}

/// Unix milliseconds of an RFC 3339 timestamp: `2026-03-01T09:30:00Z`, with optional
/// fractional seconds and a `±HH:MM` offset instead of `Z`. `None` when malformed.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    // ASCII only: every slice below then falls on a character boundary.
    if !text.is_ascii() {
        return None;
    }
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = ms.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let (h, m) = (rest[1..3].parse::<i64>().ok()?, rest[4..6].parse::<i64>().ok()?);
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, u32::try_from(month).ok()?, u32::try_from(day).ok()?);
    let seconds = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_s;
    Some(seconds * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = u32::try_from(day_of_year - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-28T04:20:00Z
    const NOW: i64 = 1_795_839_600;

    #[test]
    fn day_and_month_periods_start_and_end_at_utc_boundaries() {
        assert_eq!(rfc3339(NOW), "2026-11-28T04:20:00Z");
        assert_eq!(rfc3339(start(BudgetPeriod::Day, NOW)), "2026-11-28T00:00:00Z");
        assert_eq!(end(BudgetPeriod::Day, NOW).map(rfc3339).as_deref(), Some("2026-11-29T00:00:00Z"));
        assert_eq!(rfc3339(start(BudgetPeriod::Month, NOW)), "2026-11-01T00:00:00Z");
        assert_eq!(end(BudgetPeriod::Month, NOW).map(rfc3339).as_deref(), Some("2026-12-01T00:00:00Z"));
        assert_eq!(start(BudgetPeriod::Total, NOW), 0);
        assert_eq!(end(BudgetPeriod::Total, NOW), None);
    }

    #[test]
    fn december_rolls_into_the_next_year_and_leap_days_exist() {
        let dec = days_from_civil(2026, 12, 15) * SECONDS_PER_DAY;
        assert_eq!(end(BudgetPeriod::Month, dec).map(rfc3339).as_deref(), Some("2027-01-01T00:00:00Z"));
        let leap = days_from_civil(2028, 2, 29) * SECONDS_PER_DAY;
        assert_eq!(rfc3339(leap), "2028-02-29T00:00:00Z");
        assert_eq!(end(BudgetPeriod::Month, leap).map(rfc3339).as_deref(), Some("2028-03-01T00:00:00Z"));
    }

    #[test]
    fn rfc3339_parses_what_rfc3339_prints_and_offsets() {
        assert_eq!(parse_rfc3339(&rfc3339(NOW)), Some(NOW * 1000));
        assert_eq!(parse_rfc3339("2026-11-28T04:20:00.25Z"), Some(NOW * 1000 + 250));
        assert_eq!(parse_rfc3339("2026-11-28T05:20:00+01:00"), Some(NOW * 1000));
        for bad in [
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T04:20:00",
            "2026-11-28T04:20:00.Z",
            "x026-11-28T04:20:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates_round_trip_over_centuries() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
