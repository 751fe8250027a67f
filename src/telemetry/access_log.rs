//! The access log: one line per request on standard output (the gateway's own log goes to
//! standard error), as JSON or as `key=value` text.
//!
//! A request never waits for it: entries go through a bounded channel to a thread of their own,
//! which formats and writes them in batches. When the channel is full (standard output blocked
//! or slower than the traffic) the entry is dropped and counted in
//! `tollgate_access_log_dropped_total`; the proxy does not slow down for its log.
//!
//! A line never holds a key, a key's hash, a prompt or a completion: only the fields of
//! [`Entry`].

use std::borrow::Cow;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::{AccessLogFormat, Backend};
use crate::cost::Usd;

/// Entries waiting for the writer at most; beyond, they are dropped (and counted).
const QUEUE: usize = 16 * 1024;
/// The writer sleeps this long after an entry arrives, then writes everything that came: while
/// it sleeps, a request's send wakes nobody (a wake per request cost every request a futex
/// call and two context switches in the ledger writer's case).
const BATCH_WINDOW: Duration = Duration::from_millis(20);
pub const WRITER_THREAD: &str = "tollgate-access-log";

/// What the access log says of one request. Fields a refusal never reached are `None`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub request_id: Arc<str>,
    pub user: Option<Arc<str>>,
    /// The model the client asked for: a route's alias or a backend's name.
    pub route: Option<Arc<str>>,
    /// The backend that answered (its name and tier).
    pub backend: Option<Arc<Backend>>,
    pub reason: Option<Cow<'static, str>>,
    /// The response cache's verdict; `None` while no cache is configured.
    pub cache: Option<&'static str>,
    /// The status the client got (499: it hung up; 502/504: the backend broke mid-stream).
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Usd,
    /// The smallest budget left across the principal's levels after this request.
    pub budget_remaining: Option<Usd>,
    pub latency: Duration,
    /// Time to the backend's first body byte.
    pub ttft: Option<Duration>,
    /// The error code of the OpenAI error shape the client got, if any.
    pub error: Option<&'static str>,
}

impl Entry {
    /// An entry with nothing known yet but the request's arrival and id.
    pub fn new(at_ms: i64, request_id: Arc<str>) -> Self {
        Self {
            at_ms,
            request_id,
            user: None,
            route: None,
            backend: None,
            reason: None,
            cache: None,
            status: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: Usd::ZERO,
            budget_remaining: None,
            latency: Duration::ZERO,
            ttft: None,
            error: None,
        }
    }
}

/// The sending side, shared by every request.
pub struct AccessLog {
    format: AtomicU8,
    tx: SyncSender<Entry>,
    dropped: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("format", &self.format()).finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Starts the writer thread (idle while the format is `off`); lines go to `out`.
    pub fn start(
        format: AccessLogFormat,
        dropped: IntCounter,
        out: Box<dyn std::io::Write + Send>,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let log = Arc::new(Self { format: AtomicU8::new(format as u8), tx, dropped });
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || write_loop(&rx, out, || weak.upgrade().map_or(AccessLogFormat::Off, |log| log.format())))?;
        Ok(log)
    }

    /// Standard output, as `tollgate serve` writes it.
    pub fn to_stdout(format: AccessLogFormat, dropped: IntCounter) -> std::io::Result<Arc<Self>> {
        Self::start(format, dropped, Box::new(std::io::stdout()))
    }

    pub fn format(&self) -> AccessLogFormat {
        AccessLogFormat::from_u8(self.format.load(Ordering::Relaxed))
    }

    /// A reload's new format, from the next request on.
    pub fn set_format(&self, format: AccessLogFormat) {
        self.format.store(format as u8, Ordering::Relaxed);
    }

    /// Whether requests should build entries at all.
    pub fn enabled(&self) -> bool {
        self.format() != AccessLogFormat::Off
    }

    /// Hands the entry to the writer, or drops and counts it when the writer is behind.
    pub fn log(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

fn write_loop(rx: &Receiver<Entry>, out: Box<dyn std::io::Write + Send>, format: impl Fn() -> AccessLogFormat) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    while let Ok(first) = rx.recv() {
        std::thread::sleep(BATCH_WINDOW);
        let format = format();
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            line.clear();
            match format {
                AccessLogFormat::Json => json(&entry, &mut line),
                AccessLogFormat::Text => text(&entry, &mut line),
                AccessLogFormat::Off => continue,
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
        // Nowhere to report a failure to write the log but the log itself.
        let _ = out.flush();
    }
}

/// The JSON line's fields, in order.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    request_id: &'a str,
    user: Option<&'a str>,
    route: Option<&'a str>,
    backend: Option<&'a str>,
    tier: Option<&'a str>,
    reason: Option<&'a str>,
    cache: Option<&'a str>,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: &'a serde_json::value::RawValue,
    budget_remaining_usd: Option<&'a serde_json::value::RawValue>,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    error: Option<&'a str>,
}

/// Milliseconds with microsecond precision.
fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// A dollar amount as an exact JSON number (Usd prints plain decimals).
fn usd_raw(usd: Usd) -> Option<Box<serde_json::value::RawValue>> {
    serde_json::value::RawValue::from_string(usd.to_string()).ok()
}

fn json(e: &Entry, line: &mut String) {
    let cost = usd_raw(e.cost);
    let remaining = e.budget_remaining.and_then(usd_raw);
    let zero = serde_json::value::RawValue::NULL;
    let view = JsonLine {
        time: crate::ledger::period::rfc3339_ms(e.at_ms),
        request_id: &e.request_id,
        user: e.user.as_deref(),
        route: e.route.as_deref(),
        backend: e.backend.as_ref().map(|b| b.name.as_str()),
        tier: e.backend.as_ref().map(|b| b.tier.as_str()),
        reason: e.reason.as_deref(),
        cache: e.cache,
        status: e.status,
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        cost_usd: cost.as_deref().unwrap_or(zero),
        budget_remaining_usd: remaining.as_deref(),
        latency_ms: ms(e.latency),
        ttft_ms: e.ttft.map(ms),
        error: e.error,
    };
    if let Ok(text) = serde_json::to_string(&view) {
        line.push_str(&text);
    }
}

/// `key=value` pairs; `-` for what is unknown; values with spaces or quotes are quoted.
fn text(e: &Entry, line: &mut String) {
    use std::fmt::Write as _;
    let mut pair = |key: &str, value: Option<&str>| {
        let value = value.unwrap_or("-");
        if value.is_empty() || value.bytes().any(|b| b == b' ' || b == b'"' || b == b'=' || b.is_ascii_control()) {
            let _ = write!(line, " {key}={value:?}");
        } else {
            let _ = write!(line, " {key}={value}");
        }
    };
    pair("time", Some(&crate::ledger::period::rfc3339_ms(e.at_ms)));
    pair("request_id", Some(&e.request_id));
    pair("user", e.user.as_deref());
    pair("route", e.route.as_deref());
    pair("backend", e.backend.as_ref().map(|b| b.name.as_str()));
    pair("tier", e.backend.as_ref().map(|b| b.tier.as_str()));
    pair("reason", e.reason.as_deref());
    pair("cache", e.cache);
    pair("status", Some(&e.status.to_string()));
    pair("prompt_tokens", Some(&e.prompt_tokens.to_string()));
    pair("completion_tokens", Some(&e.completion_tokens.to_string()));
    pair("cost_usd", Some(&e.cost.to_string()));
    pair("budget_remaining_usd", e.budget_remaining.map(|u| u.to_string()).as_deref());
    pair("latency_ms", Some(&format!("{:.3}", ms(e.latency))));
    pair("ttft_ms", e.ttft.map(|t| format!("{:.3}", ms(t))).as_deref());
    pair("error", e.error);
    // The first pair's leading space.
    line.remove(0);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;

    fn entry() -> Entry {
        let env = |_: &str| None;
        let config = crate::config::Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded", &env).unwrap();
        let backend = Arc::clone(&config.backends[1]);
        Entry {
            user: Some("alice".into()),
            route: Some("auto".into()),
            backend: Some(backend),
            reason: Some("cost-first".into()),
            status: 200,
            prompt_tokens: 12,
            completion_tokens: 30,
            cost: Usd::from_pico(12_345),
            budget_remaining: Some(Usd::from_pico(4_990_000_000_000)),
            latency: Duration::from_micros(12_345),
            ttft: Some(Duration::from_micros(2_500)),
            ..Entry::new(1_764_892_800_123, "req-1".into())
        }
    }

    #[test]
    fn a_json_line_has_every_field_with_exact_money() {
        let mut line = String::new();
        json(&entry(), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2025-12-05T00:00:00.123Z");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!((v["user"].as_str(), v["route"].as_str()), (Some("alice"), Some("auto")));
        assert_eq!((v["backend"].as_str(), v["tier"].as_str()), (Some("sim-cpu"), Some("economy")));
        assert_eq!(v["reason"], "cost-first");
        assert!(v["cache"].is_null());
        assert_eq!(
            (v["status"].as_u64(), v["prompt_tokens"].as_u64(), v["completion_tokens"].as_u64()),
            (Some(200), Some(12), Some(30))
        );
        assert!(line.contains(r#""cost_usd":0.000000012345"#), "{line}");
        assert!(line.contains(r#""budget_remaining_usd":4.99"#), "{line}");
        assert_eq!((v["latency_ms"].as_f64(), v["ttft_ms"].as_f64()), (Some(12.345), Some(2.5)));
        assert!(v["error"].is_null());
    }

    #[test]
    fn a_text_line_is_key_value_pairs_with_dashes_for_the_unknown() {
        let refused = Entry { status: 401, error: Some("invalid_api_key"), ..Entry::new(0, "r 2".into()) };
        let mut line = String::new();
        text(&refused, &mut line);
        assert!(line.starts_with("time=1970-01-01T00:00:00Z request_id=\"r 2\" user=- route=-"), "{line}");
        assert!(line.contains(" status=401 ") && line.ends_with(" error=invalid_api_key"), "{line}");
        assert!(line.contains(" cost_usd=0.0 ") && line.contains(" ttft_ms=- "), "{line}");
    }

    /// An `io::Write` the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Shared, want: usize) -> Vec<String> {
        for _ in 0..200 {
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= want {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("fewer than {want} lines written");
    }

    #[test]
    fn entries_are_written_one_line_each_and_off_writes_nothing() {
        let out = Shared::default();
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AccessLog::start(AccessLogFormat::Json, dropped.clone(), Box::new(out.clone())).unwrap();
        for i in 0..3 {
            log.log(Entry { status: 200, ..Entry::new(i, format!("id-{i}").into()) });
        }
        let written = lines(&out, 3);
        assert_eq!(written.len(), 3);
        for (i, line) in written.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["request_id"], format!("id-{i}"));
        }
        log.set_format(AccessLogFormat::Off);
        assert!(!log.enabled());
        log.set_format(AccessLogFormat::Text);
        log.log(Entry { status: 404, ..Entry::new(9, "id-9".into()) });
        assert!(lines(&out, 4)[3].contains("request_id=id-9 "));
        assert_eq!(dropped.get(), 0);
    }

    /// A writer that never returns: standard output piped to a process that stopped reading.
    struct Stuck;

    impl std::io::Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_entries_instead_of_blocking_requests() {
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AccessLog::start(AccessLogFormat::Json, dropped.clone(), Box::new(Stuck)).unwrap();
        // The writer takes the first entry and blocks on writing it (BufWriter passes a line
        // of over its capacity straight through); the queue then fills and the rest is dropped.
        let big = "x".repeat(100 * 1024);
        log.log(Entry { user: Some(big.into()), ..Entry::new(0, "first".into()) });
        std::thread::sleep(BATCH_WINDOW * 3);
        let sent = QUEUE + 500;
        for i in 0..sent {
            log.log(Entry::new(i as i64, "x".into()));
        }
        assert_eq!(dropped.get(), 500, "the queue holds {QUEUE}; the rest is counted, never waited for");
    }
}
