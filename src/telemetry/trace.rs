//! OTLP traces over HTTP/protobuf: a server span per request and a client span per upstream
//! attempt (fallbacks and cascade escalations are attempts of their own), named and attributed
//! by the OpenTelemetry GenAI semantic conventions plus Tollgate's own `tollgate.*`.
//!
//! A client's W3C `traceparent` is continued; each attempt sends its own span's `traceparent`
//! upstream. Sampling is parent-based with `sample_ratio` for new traces. Spans are exported in
//! batches by the SDK's own thread, off the request path: a dead collector costs a counter
//! (`tollgate_trace_export_failures_total`), never a request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::Entry;
use crate::config::{Backend, Telemetry};
use crate::metering::Settled;
use crate::request::Endpoint;

/// How long spans wait to be exported at most; a full batch goes at once.
const EXPORT_EVERY: Duration = Duration::from_millis(1000);
/// Spans waiting for export at most (about 1 KiB each); beyond, the SDK drops new ones.
const MAX_QUEUED_SPANS: usize = 16 * 1024;
const MAX_SPANS_PER_EXPORT: usize = 512;
/// One export's deadline: a black-holed collector holds the exporting thread this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TraceError(String);

/// The tracer, shared by every request.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

/// Counts what the exporter could not deliver.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    exported: IntCounter,
    failures: IntCounter,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.exported.inc_by(spans),
            Err(e) => {
                self.failures.inc();
                tracing::debug!(error = %e, spans, "trace export failed");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
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
    /// The tracer for `config`, or `None` when no `otlp_endpoint` is set.
    pub fn start(
        config: &Telemetry,
        exported: IntCounter,
        failures: IntCounter,
    ) -> Result<Option<Arc<Self>>, TraceError> {
        let Some(endpoint) = &config.otlp_endpoint else { return Ok(None) };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(traces_url(endpoint))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TraceError(e.to_string()))?;
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(EXPORT_EVERY)
            .with_max_queue_size(MAX_QUEUED_SPANS)
            .with_max_export_batch_size(MAX_SPANS_PER_EXPORT)
            .build();
        let processor = BatchSpanProcessor::builder(Counted { inner: exporter, exported, failures })
            .with_batch_config(batches)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
            .build();
        let tracer = provider.tracer("tollgate");
        Ok(Some(Arc::new(Self { provider, tracer, propagator: TraceContextPropagator::new() })))
    }

    /// Exports what is queued (at shutdown), waiting up to the export deadline.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }

    /// The server span of a request: a child of the client's `traceparent` when it sent one.
    pub fn server_span(&self, headers: &HeaderMap, endpoint: Endpoint) -> ServerSpan {
        let parent = self.propagator.extract(&HeaderReader(headers));
        let span = self
            .tracer
            .span_builder(operation(endpoint))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        let child_parent = Context::new().with_remote_span_context(span.span_context().clone());
        ServerSpan { span, endpoint, child_parent }
    }

    /// A client span for one attempt at `backend`, under the request's server span.
    pub fn client_span(&self, parent: &Context, backend: &Backend, endpoint: Endpoint, attempt: usize) -> ClientSpan {
        let operation = operation(endpoint);
        let mut builder =
            self.tracer.span_builder(format!("{operation} {}", backend.model)).with_kind(SpanKind::Client);
        // Building attributes costs; a span that is not sampled records none.
        if parent.span().span_context().is_sampled() {
            builder = builder.with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.provider.name", "openai"),
                KeyValue::new("gen_ai.request.model", backend.model.clone()),
                KeyValue::new("tollgate.backend", backend.name.clone()),
                KeyValue::new("tollgate.tier", backend.tier.clone()),
                KeyValue::new("tollgate.attempt", attempt as i64),
            ]);
        }
        let span = builder.start_with_context(&self.tracer, parent);
        let mut carrier = TraceParent(None);
        self.propagator
            .inject_context(&Context::new().with_remote_span_context(span.span_context().clone()), &mut carrier);
        ClientSpan { span, traceparent: carrier.0, model: backend.model.clone() }
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

/// A request's server span, until its answer ends.
pub struct ServerSpan {
    span: Span,
    endpoint: Endpoint,
    /// The context client spans are children of.
    child_parent: Context,
}

impl std::fmt::Debug for ServerSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSpan").field("context", self.span.span_context()).finish_non_exhaustive()
    }
}

impl ServerSpan {
    pub fn child_parent(&self) -> &Context {
        &self.child_parent
    }

    /// Ends the span with what the access log says of the request.
    pub fn finish(mut self, entry: &Entry) {
        if self.span.is_recording() {
            let operation = operation(self.endpoint);
            if let Some(route) = &entry.route {
                self.span.update_name(format!("{operation} {route}"));
            }
            let mut attributes = Vec::with_capacity(16);
            attributes.push(KeyValue::new("gen_ai.operation.name", operation));
            attributes.push(KeyValue::new("tollgate.request_id", entry.request_id.as_str().to_owned()));
            attributes.push(KeyValue::new("http.response.status_code", i64::from(entry.status)));
            let text =
                |key: &'static str, value: &Option<Arc<str>>| value.as_ref().map(|v| KeyValue::new(key, v.to_string()));
            attributes.extend(text("gen_ai.request.model", &entry.route));
            attributes.extend(text("tollgate.user", &entry.user));
            if let Some(backend) = &entry.backend {
                attributes.push(KeyValue::new("gen_ai.response.model", backend.model.clone()));
                attributes.push(KeyValue::new("tollgate.backend", backend.name.clone()));
                attributes.push(KeyValue::new("tollgate.tier", backend.tier.clone()));
                attributes.push(KeyValue::new("gen_ai.usage.input_tokens", count(entry.prompt_tokens)));
                attributes.push(KeyValue::new("gen_ai.usage.output_tokens", count(entry.completion_tokens)));
            }
            if let Some(reason) = &entry.reason {
                attributes.push(KeyValue::new("tollgate.reason", reason.to_string()));
            }
            attributes.push(KeyValue::new("tollgate.cost_usd", entry.cost.as_f64()));
            if let Some(left) = entry.budget_remaining {
                attributes.push(KeyValue::new("tollgate.budget_remaining_usd", left.as_f64()));
            }
            if let Some(code) = entry.error {
                attributes.push(KeyValue::new("error.type", code));
                self.span.set_status(Status::error(code));
            }
            self.span.set_attributes(attributes);
        }
        self.span.end();
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One upstream attempt's span, until its answer ends (or it fails).
pub struct ClientSpan {
    span: Span,
    traceparent: Option<HeaderValue>,
    model: String,
}

impl std::fmt::Debug for ClientSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSpan").field("context", self.span.span_context()).finish_non_exhaustive()
    }
}

impl ClientSpan {
    /// The `traceparent` the attempt sends upstream.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }

    /// The attempt failed before an answer (`kind`: connect, timeout, status...).
    pub fn failed(mut self, kind: &'static str, message: String) {
        if self.span.is_recording() {
            self.span.set_attribute(KeyValue::new("error.type", kind));
            self.span.set_status(Status::error(message));
        }
        self.span.end();
    }

    /// The attempt's answer ended (completely or not) with `settled`.
    pub fn finish(mut self, settled: &Settled, this_call_cost: crate::cost::Usd) {
        if self.span.is_recording() {
            self.span.set_attributes([
                KeyValue::new("gen_ai.response.model", self.model.clone()),
                KeyValue::new("gen_ai.usage.input_tokens", count(settled.prompt_tokens)),
                KeyValue::new("gen_ai.usage.output_tokens", count(settled.completion_tokens)),
                KeyValue::new("http.response.status_code", i64::from(settled.status)),
                KeyValue::new("tollgate.cost_usd", this_call_cost.as_f64()),
                KeyValue::new("tollgate.reason", settled.reason.to_string()),
            ]);
            if let Some(code) = settled.error {
                self.span.set_attribute(KeyValue::new("error.type", code));
                self.span.set_status(Status::error(code));
            }
        }
        self.span.end_with_timestamp(SystemTime::now());
    }
}

/// Reads `traceparent` and `tracestate` from a request's headers.
struct HeaderReader<'a>(&'a HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Keeps the `traceparent` a propagator writes (the span's own context carries no state).
struct TraceParent(Option<HeaderValue>);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = HeaderValue::from_str(&value).ok();
        }
    }
}
