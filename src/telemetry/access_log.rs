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

use super::RequestId;
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
    pub request_id: RequestId,
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
    pub fn new(at_ms: i64, request_id: RequestId) -> Self {
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
    crate::background::yield_to_requests(WRITER_THREAD);
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Line::default();
    while let Ok(first) = rx.recv() {
        std::thread::sleep(BATCH_WINDOW);
        let format = format();
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            line.clear();
            match format {
                AccessLogFormat::Json => line.json(&entry),
                AccessLogFormat::Text => line.text(&entry),
                AccessLogFormat::Off => continue,
            }
            line.bytes.push(b'\n');
            if out.write_all(&line.bytes).is_err() {
                break;
            }
        }
        // Nowhere to report a failure to write the log but the log itself.
        let _ = out.flush();
    }
}

/// One field's value.
enum Value<'a> {
    Text(Option<&'a str>),
    Count(u64),
    Usd(Option<Usd>),
    Ms(Option<Duration>),
}

/// The fields of a line, in order.
fn fields<'e>(e: &'e Entry, mut field: impl FnMut(&'static str, Value<'e>)) {
    field("request_id", Value::Text(Some(e.request_id.as_str())));
    field("user", Value::Text(e.user.as_deref()));
    field("route", Value::Text(e.route.as_deref()));
    field("backend", Value::Text(e.backend.as_ref().map(|b| b.name.as_str())));
    field("tier", Value::Text(e.backend.as_ref().map(|b| b.tier.as_str())));
    field("reason", Value::Text(e.reason.as_deref()));
    field("cache", Value::Text(e.cache));
    field("status", Value::Count(u64::from(e.status)));
    field("prompt_tokens", Value::Count(e.prompt_tokens));
    field("completion_tokens", Value::Count(e.completion_tokens));
    field("cost_usd", Value::Usd(Some(e.cost)));
    field("budget_remaining_usd", Value::Usd(e.budget_remaining));
    field("latency_ms", Value::Ms(Some(e.latency)));
    field("ttft_ms", Value::Ms(e.ttft));
    field("error", Value::Text(e.error));
}

/// A line being formatted, and the last second's timestamp (lines come in order of their
/// end, mostly within one second: formatting the date once per second is enough).
#[derive(Default)]
struct Line {
    bytes: Vec<u8>,
    second: Option<(i64, String)>,
}

impl Line {
    fn clear(&mut self) {
        self.bytes.clear();
    }

    /// `2026-12-05T18:56:20.123Z`: always with milliseconds, so that every line has one shape.
    fn time(&mut self, at_ms: i64) {
        let second = at_ms.div_euclid(1000);
        let cached = match &self.second {
            Some((s, text)) if *s == second => text,
            _ => {
                let text = crate::ledger::period::rfc3339(second);
                &self.second.insert((second, text.trim_end_matches('Z').to_owned())).1
            }
        };
        self.bytes.extend_from_slice(cached.as_bytes());
        let _ = write!(self.bytes, ".{:03}Z", at_ms.rem_euclid(1000));
    }

    fn json(&mut self, e: &Entry) {
        self.bytes.extend_from_slice(b"{\"time\":\"");
        self.time(e.at_ms);
        self.bytes.push(b'"');
        let bytes = &mut self.bytes;
        fields(e, |key, value| {
            let _ = write!(bytes, ",\"{key}\":");
            match value {
                Value::Text(Some(text)) => json_string(bytes, text),
                Value::Count(n) => {
                    let _ = write!(bytes, "{n}");
                }
                // Exact decimals: `Usd` prints plain digits, never an exponent.
                Value::Usd(Some(usd)) => {
                    let _ = write!(bytes, "{usd}");
                }
                Value::Ms(Some(d)) => milliseconds(bytes, d),
                Value::Text(None) | Value::Usd(None) | Value::Ms(None) => bytes.extend_from_slice(b"null"),
            }
        });
        self.bytes.push(b'}');
    }

    /// `key=value` pairs; `-` for what is unknown; values with spaces, quotes or `=` quoted.
    fn text(&mut self, e: &Entry) {
        self.bytes.extend_from_slice(b"time=");
        self.time(e.at_ms);
        let bytes = &mut self.bytes;
        fields(e, |key, value| {
            let _ = write!(bytes, " {key}=");
            match value {
                Value::Text(Some(text)) if text.is_empty() || text.bytes().any(needs_quotes) => {
                    json_string(bytes, text)
                }
                Value::Text(Some(text)) => bytes.extend_from_slice(text.as_bytes()),
                Value::Count(n) => {
                    let _ = write!(bytes, "{n}");
                }
                Value::Usd(Some(usd)) => {
                    let _ = write!(bytes, "{usd}");
                }
                Value::Ms(Some(d)) => milliseconds(bytes, d),
                Value::Text(None) | Value::Usd(None) | Value::Ms(None) => bytes.push(b'-'),
            }
        });
    }
}

fn needs_quotes(b: u8) -> bool {
    b == b' ' || b == b'"' || b == b'=' || b == b'\\' || b.is_ascii_control()
}

/// Milliseconds with microseconds: `12.345`.
fn milliseconds(bytes: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    let _ = write!(bytes, "{}.{:03}", micros / 1000, micros % 1000);
}

/// A JSON string: quotes, backslashes and control characters escaped, the rest as it is.
fn json_string(bytes: &mut Vec<u8>, text: &str) {
    bytes.push(b'"');
    if !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        bytes.extend_from_slice(text.as_bytes());
    } else {
        for b in text.bytes() {
            match b {
                b'"' => bytes.extend_from_slice(b"\\\""),
                b'\\' => bytes.extend_from_slice(b"\\\\"),
                b'\n' => bytes.extend_from_slice(b"\\n"),
                b if b < 0x20 => {
                    let _ = write!(bytes, "\\u{:04x}", b);
                }
                b => bytes.push(b),
            }
        }
    }
    bytes.push(b'"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;

    fn id(text: &str) -> RequestId {
        RequestId::from_stored(text).unwrap()
    }

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
            ..Entry::new(1_764_892_800_123, id("req-1"))
        }
    }

    #[test]
    fn a_json_line_has_every_field_with_exact_money() {
        let mut formatted = Line::default();
        formatted.json(&entry());
        let line = String::from_utf8(formatted.bytes).unwrap();
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
    fn strings_a_client_chose_are_escaped_and_the_line_stays_one_line() {
        let tricky = "he said \"hi\"\n\\ é\u{1}";
        let mut formatted = Line::default();
        formatted.json(&Entry { route: Some(tricky.into()), ..Entry::new(5, id("a")) });
        let line = String::from_utf8(formatted.bytes).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["route"], tricky);
        assert_eq!(v["time"], "1970-01-01T00:00:00.005Z");
        let mut formatted = Line::default();
        formatted.text(&Entry { route: Some(tricky.into()), ..Entry::new(5, id("a")) });
        let line = String::from_utf8(formatted.bytes).unwrap();
        assert!(!line.contains('\n') && line.contains(r#" route="he said \"hi\"\n\\ é\u0001" "#), "{line}");
    }

    #[test]
    fn a_text_line_is_key_value_pairs_with_dashes_for_the_unknown() {
        let refused = Entry {
            status: 401,
            error: Some("invalid_api_key"),
            reason: Some("two words".into()),
            ..Entry::new(0, id("r-2"))
        };
        let mut formatted = Line::default();
        formatted.text(&refused);
        let line = String::from_utf8(formatted.bytes).unwrap();
        assert!(line.starts_with("time=1970-01-01T00:00:00.000Z request_id=r-2 user=- route=-"), "{line}");
        assert!(line.contains(" status=401 ") && line.ends_with(" error=invalid_api_key"), "{line}");
        assert!(line.contains(" reason=\"two words\" "), "values with spaces are quoted: {line}");
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
            log.log(Entry { status: 200, ..Entry::new(i, id(&format!("id-{i}"))) });
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
        log.log(Entry { status: 404, ..Entry::new(9, id("id-9")) });
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
        log.log(Entry { user: Some(big.into()), ..Entry::new(0, id("first")) });
        std::thread::sleep(BATCH_WINDOW * 3);
        let sent = QUEUE + 500;
        for i in 0..sent {
            log.log(Entry::new(i as i64, id("x")));
        }
        assert_eq!(dropped.get(), 500, "the queue holds {QUEUE}; the rest is counted, never waited for");
    }
}
