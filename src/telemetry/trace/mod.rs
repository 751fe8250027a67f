//! OTLP traces over HTTP/protobuf: a server span per request and a client span per upstream
//! attempt (fallbacks and cascade escalations are attempts of their own), named and attributed
//! by the OpenTelemetry GenAI semantic conventions plus Tollgate's own `tollgate.*`.
//!
//! A client's W3C `traceparent` is continued; each attempt sends its own span's `traceparent`
//! upstream. Sampling is parent-based with `sample_ratio` for new traces.
//!
//! Why not the OpenTelemetry SDK: with `opentelemetry_sdk` 0.33 and `opentelemetry-otlp`'s
//! HTTP exporter, two spans per request cost the gateway 13 µs of CPU per request (45% more)
//! and 22% of its throughput at c=64 on the 2-core bench machine: generic attribute vectors
//! built on the request path, each span copied into the batch processor's channel and again
//! into a protobuf message tree with a `String` per attribute key, all freed on another
//! thread. Here a request only records what it already knows (its access log entry, a few
//! `Arc`s) and enqueues it; the exporter thread writes the protobuf straight from that
//! (`otlp`), so tracing costs what it must: ids, two queue sends and the encoding off the
//! request path (`docs/PERFORMANCE.md`, "Traces and the access log").

mod context;
mod export;
mod otlp;

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use self::context::{new_span_id, new_trace_id, traceparent, Parent, Sampler};
pub use self::context::{SpanId, TraceId};
use self::export::{Collector, Queue};
pub use self::export::{Counters, EXPORT_TIMEOUT};
use super::Entry;
use crate::config::{Backend, Env, Telemetry};
use crate::cost::Usd;
use crate::metering::Settled;
use crate::request::Endpoint;

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TraceError(String);

/// The tracer, shared by every request.
pub struct Tracing {
    queue: Arc<Queue>,
    sampler: Sampler,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

/// The OTLP/HTTP traces URL of a collector's base URL (`http://host:4318`), or the URL as it is
/// when it already names the traces path.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

impl Tracing {
    /// The tracer for `config`, or `None` when no `otlp_endpoint` is set. Collector headers
    /// (a vendor's key) come from `OTEL_EXPORTER_OTLP_TRACES_HEADERS` or
    /// `OTEL_EXPORTER_OTLP_HEADERS`, as for OpenTelemetry's own exporters.
    pub fn start(config: &Telemetry, env: &dyn Env, counters: Counters) -> Result<Option<Arc<Self>>, TraceError> {
        let Some(endpoint) = &config.otlp_endpoint else { return Ok(None) };
        let url: http::Uri =
            traces_url(endpoint).parse().map_err(|e: http::uri::InvalidUri| TraceError(e.to_string()))?;
        let headers = export::headers_from(
            env.var("OTEL_EXPORTER_OTLP_TRACES_HEADERS").or_else(|| env.var("OTEL_EXPORTER_OTLP_HEADERS")),
        )
        .map_err(TraceError)?;
        let collector = Collector::new(&url, headers).map_err(TraceError)?;
        let queue = export::start(collector, &config.service_name, counters).map_err(|e| TraceError(e.to_string()))?;
        Ok(Some(Arc::new(Self { queue: Arc::new(queue), sampler: Sampler::new(config.sample_ratio) })))
    }

    /// Exports what is queued (at shutdown), waiting up to the export deadline. Blocks.
    pub fn shutdown(&self) {
        if !self.queue.flush(EXPORT_TIMEOUT + std::time::Duration::from_secs(1)) {
            tracing::warn!("traces not all exported at shutdown");
        }
    }

    /// The server span of a request: a child of the client's `traceparent` when it sent one.
    pub fn server_span(&self, headers: &HeaderMap, endpoint: Endpoint) -> ServerSpan {
        let parent = Parent::from_headers(headers);
        let span_id = new_span_id();
        let (trace_id, sampled) = match &parent {
            Some(parent) => (parent.trace_id, parent.sampled()),
            None => {
                let id = new_trace_id();
                (id, self.sampler.samples(&id))
            }
        };
        // What an attempt of an unrecorded trace sends upstream: the client's own context, or
        // a new one saying "not sampled", so the backend's tracing decides alike.
        let forward = match (&parent, sampled) {
            (_, true) => None,
            (Some(parent), false) => Some(parent.header.clone()),
            (None, false) => Some(traceparent(&trace_id, &span_id, false)),
        };
        let (remote_parent, tracestate) = match parent {
            Some(parent) => (Some(parent.span_id), parent.tracestate),
            None => (None, None),
        };
        ServerSpan {
            context: Arc::new(TraceContext { trace_id, span_id, tracestate, forward }),
            remote_parent,
            start_ns: crate::clock::unix_now_ns(),
            endpoint,
            queue: sampled.then(|| Arc::clone(&self.queue)),
        }
    }

    /// A client span for one attempt at `backend`, under the request's server span.
    pub fn client_span(
        &self,
        trace: &TraceContext,
        backend: &Arc<Backend>,
        endpoint: Endpoint,
        attempt: u32,
    ) -> ClientSpan {
        if let Some(forward) = &trace.forward {
            return ClientSpan(Box::new(Attempt {
                traceparent: forward.clone(),
                tracestate: trace.tracestate.clone(),
                open: None,
            }));
        }
        let span_id = new_span_id();
        ClientSpan(Box::new(Attempt {
            traceparent: traceparent(&trace.trace_id, &span_id, true),
            tracestate: trace.tracestate.clone(),
            open: Some(OpenAttempt {
                queue: Arc::clone(&self.queue),
                trace_id: trace.trace_id,
                span_id,
                parent: trace.span_id,
                start_ns: crate::clock::unix_now_ns(),
                endpoint,
                backend: Arc::clone(backend),
                attempt,
            }),
        }))
    }
}

/// `gen_ai.operation.name` of an endpoint.
fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    }
}

/// A request's place in its trace: what its attempts are children of, or what they forward
/// when the trace is not recorded here.
#[derive(Debug, Clone)]
pub struct TraceContext {
    trace_id: TraceId,
    /// The server span's id.
    span_id: SpanId,
    tracestate: Option<HeaderValue>,
    /// Not sampled: the `traceparent` every attempt sends upstream.
    forward: Option<HeaderValue>,
}

/// A request's server span, until its answer ends.
#[derive(Debug)]
pub struct ServerSpan {
    /// Shared with the request's attempts.
    context: Arc<TraceContext>,
    remote_parent: Option<SpanId>,
    start_ns: u64,
    endpoint: Endpoint,
    /// `None`: not sampled, nothing is recorded.
    queue: Option<Arc<Queue>>,
}

impl ServerSpan {
    pub fn context(&self) -> &Arc<TraceContext> {
        &self.context
    }

    /// Ends the span with what the access log says of the request.
    pub fn finish(self, entry: Entry) {
        let Some(queue) = self.queue else { return };
        let context = &self.context;
        queue.push(SpanRecord {
            trace_id: context.trace_id,
            span_id: context.span_id,
            parent: self.remote_parent.map(|span_id| ParentSpan { span_id, remote: true }),
            tracestate: context.tracestate.clone(),
            start_ns: self.start_ns,
            end_ns: crate::clock::unix_now_ns(),
            endpoint: self.endpoint,
            detail: Detail::Server(entry),
        });
    }
}

/// One upstream attempt's span, until its answer ends (or it fails). Boxed: requests carry it
/// in their meter, which stays small while traces are off.
#[derive(Debug)]
pub struct ClientSpan(Box<Attempt>);

#[derive(Debug)]
struct Attempt {
    traceparent: HeaderValue,
    tracestate: Option<HeaderValue>,
    /// `None`: not sampled.
    open: Option<OpenAttempt>,
}

#[derive(Debug)]
struct OpenAttempt {
    queue: Arc<Queue>,
    trace_id: TraceId,
    span_id: SpanId,
    parent: SpanId,
    start_ns: u64,
    endpoint: Endpoint,
    backend: Arc<Backend>,
    attempt: u32,
}

impl OpenAttempt {
    fn end(self, tracestate: Option<HeaderValue>, outcome: Outcome) {
        self.queue.push(SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: Some(ParentSpan { span_id: self.parent, remote: false }),
            tracestate,
            start_ns: self.start_ns,
            end_ns: crate::clock::unix_now_ns(),
            endpoint: self.endpoint,
            detail: Detail::Attempt { backend: self.backend, attempt: self.attempt, outcome },
        });
    }
}

impl ClientSpan {
    /// The `traceparent` the attempt sends upstream.
    pub fn traceparent(&self) -> &HeaderValue {
        &self.0.traceparent
    }

    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.0.tracestate.as_ref()
    }

    /// The attempt failed before an answer (`kind`: connect, timeout, status...).
    pub fn failed(self, kind: &'static str, message: String) {
        let Attempt { open, tracestate, .. } = *self.0;
        if let Some(open) = open {
            open.end(tracestate, Outcome::Failed { kind, message });
        }
    }

    /// The attempt's answer ended (completely or not) with `settled`; `cost`: this call's.
    pub fn finish(self, settled: &Settled, cost: Usd) {
        let Attempt { open, tracestate, .. } = *self.0;
        if let Some(open) = open {
            let outcome = Outcome::Answered {
                prompt_tokens: settled.prompt_tokens,
                completion_tokens: settled.completion_tokens,
                status: settled.status,
                cost,
                reason: settled.reason.clone(),
                error: settled.error,
            };
            open.end(tracestate, outcome);
        }
    }
}

/// A finished span, as the exporter encodes it.
pub struct SpanRecord {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<ParentSpan>,
    tracestate: Option<HeaderValue>,
    start_ns: u64,
    end_ns: u64,
    endpoint: Endpoint,
    detail: Detail,
}

struct ParentSpan {
    span_id: SpanId,
    /// The client's span, not one of ours.
    remote: bool,
}

enum Detail {
    Server(Entry),
    Attempt { backend: Arc<Backend>, attempt: u32, outcome: Outcome },
}

enum Outcome {
    Failed {
        kind: &'static str,
        message: String,
    },
    Answered {
        prompt_tokens: u64,
        completion_tokens: u64,
        status: u16,
        cost: Usd,
        reason: Cow<'static, str>,
        error: Option<&'static str>,
    },
}
