//! The request trace: one JSON object per line, what `tollgate simulate` replays and
//! `tollgate report --export-trace` writes.
//!
//! `{"t": 1772355600 | "2026-03-01T09:00:00Z", "user": "acme", "model": "auto",
//!   "prompt_tokens": 1200, "completion_tokens": 350, "max_tokens": 512, "min_quality": 0.6}`
//! (`max_tokens` and `min_quality` optional: without `max_tokens` the route's
//! `default_max_tokens` sizes the estimate, as live). An optional `prompt_hash` (any string,
//! e.g. a hash of the canonical request) marks a cacheable request: with `[cache]` on, a
//! request whose hash, model and cache scope repeat within the TTL is a hit.

use serde::{Deserialize, Serialize};

use crate::ledger::{period, RequestRecord};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub user: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub max_tokens: Option<u64>,
    /// The request's quality hint (`x-tollgate-min-quality`).
    pub min_quality: Option<f64>,
    /// Same hash, same request: what the response cache would serve again.
    pub prompt_hash: Option<String>,
}

/// A trace that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}:{line}: {message}")]
    Line { file: String, line: usize, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    t: serde_json::Value,
    user: String,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    min_quality: Option<f64>,
    #[serde(default)]
    prompt_hash: Option<String>,
}

#[derive(Serialize)]
struct OutLine<'a> {
    t: String,
    user: &'a str,
    model: &'a str,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Parses a whole trace (blank lines and `#` comments skipped), sorted by time (stable: equal
/// times keep their order in the file).
pub fn parse(text: &str, file: &str) -> Result<Vec<TraceRecord>, TraceError> {
    let mut records = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let fail = |message: String| TraceError::Line { file: file.to_owned(), line: i + 1, message };
        let line: Line = serde_json::from_str(raw).map_err(|e| fail(e.to_string()))?;
        let at_ms = time_ms(&line.t).ok_or_else(|| {
            fail(format!("`t` must be Unix seconds or an RFC 3339 time (2026-03-01T09:00:00Z), got {}", line.t))
        })?;
        if let Some(q) = line.min_quality.filter(|q| !(0.0..=1.0).contains(q)) {
            return Err(fail(format!("`min_quality` must be between 0 and 1, got {q}")));
        }
        records.push(TraceRecord {
            at_ms,
            user: line.user,
            model: line.model,
            prompt_tokens: line.prompt_tokens,
            completion_tokens: line.completion_tokens,
            max_tokens: line.max_tokens.filter(|&m| m > 0),
            min_quality: line.min_quality,
            prompt_hash: line.prompt_hash,
        });
    }
    records.sort_by_key(|r| r.at_ms);
    Ok(records)
}

pub fn load(path: &std::path::Path) -> Result<Vec<TraceRecord>, TraceError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { file: file.clone(), source })?;
    parse(&text, &file)
}

fn time_ms(t: &serde_json::Value) -> Option<i64> {
    match t {
        serde_json::Value::String(s) => period::parse_rfc3339(s),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(seconds) => seconds.checked_mul(1000),
            #[expect(clippy::cast_possible_truncation, reason = "range checked just before")]
            None => n.as_f64().filter(|s| s.is_finite() && s.abs() < 1e15).map(|s| (s * 1000.0).round() as i64),
        },
        _ => None,
    }
}

/// The trace of ledger records: the demand they stand for, to replay against another policy.
/// A cascade's second call (`escalated:confidence`) is the same request again, and an answer
/// the backend refused (4xx/5xx, but not a client that hung up) used nothing: both are left out.
/// Its line (JSON and a newline), `None` for a record left out.
pub fn line(r: &RequestRecord) -> Option<String> {
    let failed = r.status >= 400 && r.status != 499;
    if failed || r.reason == "escalated:confidence" {
        return None;
    }
    let line = OutLine {
        t: period::rfc3339_ms(r.at_ms),
        user: &r.user,
        model: &r.route,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
    };
    serde_json::to_string(&line).ok().map(|json| json + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Usd;

    #[test]
    fn times_are_seconds_or_rfc3339_and_the_trace_is_sorted() {
        let text = "{\"t\": \"2026-03-01T00:00:01.5Z\", \"user\": \"a\", \"model\": \"auto\", \"prompt_tokens\": 1, \"completion_tokens\": 2}\n\
                    # a comment\n\n\
                    {\"t\": 1772323200, \"user\": \"b\", \"model\": \"auto\", \"prompt_tokens\": 3, \"completion_tokens\": 4, \"min_quality\": 0.5}\n";
        let trace = parse(text, "t.jsonl").unwrap();
        assert_eq!(trace.len(), 2);
        assert_eq!((trace[0].user.as_str(), trace[0].at_ms), ("b", 1_772_323_200_000));
        assert_eq!(trace[0].min_quality, Some(0.5));
        assert_eq!(trace[1].at_ms, 1_772_323_201_500);
    }

    #[test]
    fn a_bad_line_is_named_with_its_number() {
        let text = "{\"t\": 1, \"user\": \"a\", \"model\": \"auto\", \"prompt_tokens\": 1, \"completion_tokens\": 2}\n\
                    {\"t\": \"yesterday\", \"user\": \"a\", \"model\": \"auto\", \"prompt_tokens\": 1, \"completion_tokens\": 2}\n";
        let e = parse(text, "t.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("t.jsonl:2: `t` must be"), "{e}");
        let e = parse("{\"t\": 1, \"user\": \"a\"}", "t.jsonl").unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1: missing field"), "{e}");
    }

    #[test]
    fn exported_records_read_back_as_the_same_demand() {
        let record = |at_ms, reason: &str, status| RequestRecord {
            at_ms,
            user: "u".into(),
            route: "auto".into(),
            backend: "b".into(),
            reason: reason.to_owned().into(),
            prompt_tokens: 10,
            completion_tokens: 20,
            cost: Usd::ZERO,
            status,
            latency_ms: 5,
            request_id: None,
        };
        let records = [
            record(1_772_323_200_123, "cost-first", 200),
            record(1_772_323_200_124, "escalated:confidence", 200),
            record(1_772_323_201_000, "quality-first", 502),
            record(1_772_323_202_000, "quality-first", 499),
        ];
        let text: String = records.iter().filter_map(line).collect();
        let trace = parse(&text, "x").unwrap();
        assert_eq!(trace.iter().map(|r| r.at_ms).collect::<Vec<_>>(), [1_772_323_200_123, 1_772_323_202_000]);
        assert_eq!((trace[0].prompt_tokens, trace[0].completion_tokens, trace[0].model.as_str()), (10, 20, "auto"));
    }
}
