//! The exporter: a thread of its own (at background priority) that takes finished spans from a
//! bounded queue, batches them (up to [`MAX_SPANS_PER_EXPORT`], or what came within
//! [`EXPORT_EVERY`] of a batch's first span) and posts each batch to the collector as OTLP/HTTP
//! protobuf. Requests only ever try to enqueue: a full queue drops the span and counts it.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use prometheus::IntCounter;
use tokio::time::Instant;

use super::otlp::Encoder;
use super::SpanRecord;
use crate::upstream::pool::Pool;

/// How long spans wait to be exported at most; a full batch goes at once.
pub const EXPORT_EVERY: Duration = Duration::from_millis(1000);
/// The exporter sleeps this long between looks at the queue while spans come.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Spans waiting for export at most (a few hundred bytes each); beyond, new ones are dropped.
pub const MAX_QUEUED_SPANS: usize = 16 * 1024;
pub const MAX_SPANS_PER_EXPORT: usize = 512;
/// One export's deadline: a black-holed collector holds the exporter this long, while the
/// queue absorbs (then drops) what requests finish meanwhile.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

// Spans go by value: boxing them would cost an allocation per span, freed on another thread.
#[allow(clippy::large_enum_variant)]
pub enum Message {
    Span(SpanRecord),
    /// Export what came before, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What the exporter counts.
#[derive(Clone)]
pub struct Counters {
    pub exported: IntCounter,
    pub failures: IntCounter,
    pub dropped: IntCounter,
}

/// Where batches go.
pub struct Collector {
    pub pool: Arc<Pool>,
    /// The traces path (origin form) and the `Host` it is sent with.
    pub path: Uri,
    pub host: HeaderValue,
    /// From `OTEL_EXPORTER_OTLP_TRACES_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS` (a vendor's key).
    pub headers: HeaderMap,
}

impl Collector {
    /// `url`: the full traces URL.
    pub fn new(url: &Uri, headers: HeaderMap) -> Result<Self, String> {
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err("the OTLP endpoint needs a scheme and a host".into());
        };
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let path = url.path_and_query().map_or_else(
            || Uri::from_static("/v1/traces"),
            |p| Uri::builder().path_and_query(p.clone()).build().unwrap_or_else(|_| Uri::from_static("/v1/traces")),
        );
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let pool = Pool::new(origin, CONNECT_TIMEOUT, 1, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        Ok(Self { pool, path, host, headers })
    }
}

/// The requests' end of the queue.
pub struct Queue {
    sender: SyncSender<Message>,
    dropped: IntCounter,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    pub fn push(&self, span: SpanRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.sender.try_send(Message::Span(span)) {
            self.dropped.inc();
        }
    }

    /// Exports everything queued so far, waiting up to `wait` (blocks: call off the runtime).
    pub fn flush(&self, wait: Duration) -> bool {
        let (done, finished) = std::sync::mpsc::channel();
        self.sender.send(Message::Flush(done)).is_ok() && finished.recv_timeout(wait).is_ok()
    }
}

/// Starts the exporter thread.
pub fn start(collector: Collector, service_name: &str, counters: Counters) -> std::io::Result<Queue> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(MAX_QUEUED_SPANS);
    let encoder = Encoder::new(service_name);
    let dropped = counters.dropped.clone();
    std::thread::Builder::new()
        .name("tollgate-traces".into())
        .spawn(move || run(receiver, collector, encoder, counters))?;
    Ok(Queue { sender, dropped })
}

fn run(receiver: Receiver<Message>, collector: Collector, mut encoder: Encoder, counters: Counters) {
    crate::background::yield_to_requests("tollgate-traces");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "the trace exporter could not start; spans are dropped");
            return;
        }
    };
    let mut exporter = Exporter { collector, runtime, counters, failing: false };
    let mut pending = Vec::with_capacity(MAX_SPANS_PER_EXPORT);
    // Blocks only while nothing is pending: one wake per burst, not per span.
    while let Ok(first) = receiver.recv() {
        let mut oldest = Instant::now();
        let mut flushed = Vec::new();
        let mut closed = false;
        take(first, &mut pending, &mut flushed);
        loop {
            if flushed.is_empty() {
                // While this sleeps a request's send wakes nobody.
                std::thread::sleep(BATCH_WINDOW);
            }
            loop {
                match receiver.try_recv() {
                    Ok(message) => take(message, &mut pending, &mut flushed),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let due = !flushed.is_empty() || closed || oldest.elapsed() >= EXPORT_EVERY;
            while pending.len() >= MAX_SPANS_PER_EXPORT || (due && !pending.is_empty()) {
                let take = pending.len().min(MAX_SPANS_PER_EXPORT);
                exporter.export(&mut encoder, &pending[..take]);
                pending.drain(..take);
                oldest = Instant::now();
            }
            for done in flushed.drain(..) {
                let _ = done.send(());
            }
            if closed {
                return;
            }
            if pending.is_empty() {
                break;
            }
        }
    }
}

fn take(message: Message, pending: &mut Vec<SpanRecord>, flushed: &mut Vec<std::sync::mpsc::Sender<()>>) {
    match message {
        Message::Span(span) => pending.push(span),
        Message::Flush(done) => flushed.push(done),
    }
}

struct Exporter {
    collector: Collector,
    runtime: tokio::runtime::Runtime,
    counters: Counters,
    /// The last export failed: the next failure is not logged again.
    failing: bool,
}

impl Exporter {
    fn export(&mut self, encoder: &mut Encoder, batch: &[SpanRecord]) {
        let body = Bytes::from(encoder.encode(batch));
        let spans = batch.len() as u64;
        match self.runtime.block_on(post(&self.collector, body)) {
            Ok(()) => {
                self.counters.exported.inc_by(spans);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
            }
            Err(e) => {
                self.counters.failures.inc();
                // Once per outage, not once per batch.
                if std::mem::replace(&mut self.failing, true) {
                    tracing::debug!(error = %e, spans, "trace export failed");
                } else {
                    tracing::warn!(error = %e, spans, "trace export failed; spans are dropped until it works");
                }
            }
        }
    }
}

async fn post(collector: &Collector, body: Bytes) -> Result<(), String> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(collector.path.clone())
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    headers.extend(collector.headers.clone());
    headers.insert(HOST, collector.host.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    let exchange = async {
        let answer = collector.pool.send(request, Instant::now()).await.map_err(|e| e.to_string())?;
        let status = answer.status();
        // Read to the end, so that the connection is kept for the next batch.
        let _ = answer.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, exchange)
        .await
        .map_err(|_| "the collector did not answer in time".to_owned())?
}

/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs
/// separated by commas, values percent-encoded (the OpenTelemetry exporter convention).
/// Errors name the header, never its value (it is often a vendor's API key).
pub fn headers_from(text: Option<String>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let Some(text) = text else { return Ok(headers) };
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            return Err("an OTLP header is not `name=value`".into());
        };
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{}` is not a header name", name.trim()))?;
        let value = HeaderValue::from_bytes(&percent_decode(value.trim()))
            .map_err(|_| format!("the value of OTLP header `{name}` is not a valid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn otlp_headers_are_read_the_opentelemetry_way() {
        let headers = headers_from(Some("x-honeycomb-team=abc%3D%3D, authorization=Basic%20dXNlcg==".into())).unwrap();
        assert_eq!(headers["x-honeycomb-team"], "abc==");
        assert_eq!(headers["authorization"], "Basic dXNlcg==");
        assert!(headers_from(None).unwrap().is_empty());
        let error = headers_from(Some("x-key=secret-value, broken".into())).unwrap_err();
        assert!(!error.contains("secret-value"), "{error}");
        let error = headers_from(Some("x-key=bad\u{1}value".into())).unwrap_err();
        assert!(error.contains("x-key") && !error.contains("bad"), "{error}");
    }
}
