//! The OTLP trace protobuf (`ExportTraceServiceRequest`, opentelemetry-proto's
//! `trace/v1/trace.proto`), written straight from Tollgate's span records into one reused
//! buffer: no intermediate message tree, no string per attribute key. The tests decode it with
//! the published definitions.

use super::{Detail, Outcome, SpanRecord};
use crate::config::Backend;

// Wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH: u64 = 2;
const FIXED32: u64 = 5;

const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;
/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK` and `..._IS_REMOTE_MASK`.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;
/// Every exported span was sampled.
const SAMPLED: u32 = 0x01;

/// Encodes batches of spans for one service.
pub struct Encoder {
    /// `ResourceSpans.resource` and the `ScopeSpans.scope` field, the same in every batch.
    resource: Vec<u8>,
    scope: Vec<u8>,
    spans: Vec<u8>,
    span: Vec<u8>,
    name: String,
}

impl Encoder {
    pub fn new(service_name: &str) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        let mut attributes = Vec::new();
        attr_str(&mut attributes, 1, "service.name", service_name);
        attr_str(&mut attributes, 1, "service.version", version);
        attr_str(&mut attributes, 1, "telemetry.sdk.name", "tollgate");
        attr_str(&mut attributes, 1, "telemetry.sdk.language", "rust");
        let mut resource = Vec::new();
        bytes_field(&mut resource, 1, &attributes);
        let mut scope_body = Vec::new();
        bytes_field(&mut scope_body, 1, b"tollgate");
        bytes_field(&mut scope_body, 2, version.as_bytes());
        let mut scope = Vec::new();
        bytes_field(&mut scope, 1, &scope_body);
        Self { resource, scope, spans: Vec::new(), span: Vec::new(), name: String::new() }
    }

    /// One `ExportTraceServiceRequest` carrying `batch`.
    pub fn encode(&mut self, batch: &[SpanRecord]) -> Vec<u8> {
        self.spans.clear();
        for record in batch {
            self.span.clear();
            encode_span(&mut self.span, &mut self.name, record);
            bytes_field(&mut self.spans, 2, &self.span);
        }
        let scope_spans = self.scope.len() + self.spans.len();
        let resource_spans = self.resource.len() + field_len(scope_spans);
        let mut out = Vec::with_capacity(field_len(resource_spans));
        key(&mut out, 1, LENGTH);
        varint(&mut out, resource_spans as u64);
        out.extend_from_slice(&self.resource);
        key(&mut out, 2, LENGTH);
        varint(&mut out, scope_spans as u64);
        out.extend_from_slice(&self.scope);
        out.extend_from_slice(&self.spans);
        out
    }
}

fn encode_span(out: &mut Vec<u8>, name: &mut String, record: &SpanRecord) {
    let operation = super::operation(record.endpoint);
    name.clear();
    name.push_str(operation);
    bytes_field(out, 1, &record.trace_id);
    bytes_field(out, 2, &record.span_id);
    if let Some(state) = &record.tracestate {
        bytes_field(out, 3, state.as_bytes());
    }
    let mut flags = SAMPLED | HAS_IS_REMOTE;
    if let Some(parent) = &record.parent {
        bytes_field(out, 4, &parent.span_id);
        if parent.remote {
            flags |= IS_REMOTE;
        }
    }
    key(out, 16, FIXED32);
    out.extend_from_slice(&flags.to_le_bytes());
    match &record.detail {
        Detail::Server(entry) => {
            if let Some(route) = &entry.route {
                name.push(' ');
                name.push_str(route);
            }
            bytes_field(out, 5, name.as_bytes());
            varint_field(out, 6, KIND_SERVER);
            times(out, record);
            attr_str(out, 9, "gen_ai.operation.name", operation);
            attr_str(out, 9, "tollgate.request_id", entry.request_id.as_str());
            attr_int(out, 9, "http.response.status_code", i64::from(entry.status));
            if let Some(route) = &entry.route {
                attr_str(out, 9, "gen_ai.request.model", route);
            }
            if let Some(user) = &entry.user {
                attr_str(out, 9, "tollgate.user", user);
            }
            if let Some(backend) = &entry.backend {
                attr_str(out, 9, "gen_ai.response.model", &backend.model);
                backend_attributes(out, backend);
                attr_int(out, 9, "gen_ai.usage.input_tokens", count(entry.prompt_tokens));
                attr_int(out, 9, "gen_ai.usage.output_tokens", count(entry.completion_tokens));
            }
            if let Some(reason) = &entry.reason {
                attr_str(out, 9, "tollgate.reason", reason);
            }
            if let Some(cache) = entry.cache {
                attr_str(out, 9, "tollgate.cache", cache);
            }
            attr_f64(out, 9, "tollgate.cost_usd", entry.cost.as_f64());
            if let Some(left) = entry.budget_remaining {
                attr_f64(out, 9, "tollgate.budget_remaining_usd", left.as_f64());
            }
            if let Some(code) = entry.error {
                attr_str(out, 9, "error.type", code);
                status_error(out, code);
            }
        }
        Detail::Attempt { backend, attempt, outcome } => {
            name.push(' ');
            name.push_str(&backend.model);
            bytes_field(out, 5, name.as_bytes());
            varint_field(out, 6, KIND_CLIENT);
            times(out, record);
            attr_str(out, 9, "gen_ai.operation.name", operation);
            attr_str(out, 9, "gen_ai.provider.name", "openai");
            attr_str(out, 9, "gen_ai.request.model", &backend.model);
            backend_attributes(out, backend);
            attr_int(out, 9, "tollgate.attempt", i64::from(*attempt));
            match outcome {
                Outcome::Failed { kind, message } => {
                    attr_str(out, 9, "error.type", kind);
                    status_error(out, message);
                }
                Outcome::Answered { prompt_tokens, completion_tokens, status, cost, reason, error } => {
                    attr_str(out, 9, "gen_ai.response.model", &backend.model);
                    attr_int(out, 9, "gen_ai.usage.input_tokens", count(*prompt_tokens));
                    attr_int(out, 9, "gen_ai.usage.output_tokens", count(*completion_tokens));
                    attr_int(out, 9, "http.response.status_code", i64::from(*status));
                    attr_f64(out, 9, "tollgate.cost_usd", cost.as_f64());
                    attr_str(out, 9, "tollgate.reason", reason);
                    if let Some(code) = error {
                        attr_str(out, 9, "error.type", code);
                        status_error(out, code);
                    }
                }
            }
        }
    }
}

fn backend_attributes(out: &mut Vec<u8>, backend: &Backend) {
    attr_str(out, 9, "tollgate.backend", &backend.name);
    attr_str(out, 9, "tollgate.tier", &backend.tier);
}

fn times(out: &mut Vec<u8>, record: &SpanRecord) {
    key(out, 7, FIXED64);
    out.extend_from_slice(&record.start_ns.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&record.end_ns.max(record.start_ns).to_le_bytes());
}

/// `Span.status` (field 15): `{message, code: ERROR}`.
fn status_error(out: &mut Vec<u8>, message: &str) {
    let body = field_len(message.len()) + 2;
    key(out, 15, LENGTH);
    varint(out, body as u64);
    bytes_field(out, 2, message.as_bytes());
    varint_field(out, 3, STATUS_ERROR);
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `KeyValue` with a string `AnyValue` (oneof field 1), as field `field` of its message.
fn attr_str(out: &mut Vec<u8>, field: u32, name: &str, value: &str) {
    attr(
        out,
        field,
        name,
        1,
        LENGTH,
        |out| {
            varint(out, value.len() as u64);
            out.extend_from_slice(value.as_bytes());
        },
        varint_len(value.len() as u64) + value.len(),
    );
}

/// An `int_value` (field 3, varint of the two's complement).
fn attr_int(out: &mut Vec<u8>, field: u32, name: &str, value: i64) {
    let bits = value as u64;
    attr(out, field, name, 3, VARINT, |out| varint(out, bits), varint_len(bits));
}

/// A `double_value` (field 4, fixed64).
fn attr_f64(out: &mut Vec<u8>, field: u32, name: &str, value: f64) {
    attr(out, field, name, 4, FIXED64, |out| out.extend_from_slice(&value.to_le_bytes()), 8);
}

/// `KeyValue { key = 1, value = 2: AnyValue { <value_field>: ... } }`, lengths computed
/// rather than encoded twice.
fn attr(
    out: &mut Vec<u8>,
    field: u32,
    name: &str,
    value_field: u32,
    wire: u64,
    write_value: impl FnOnce(&mut Vec<u8>),
    value_len: usize,
) {
    let any_value = 1 + value_len;
    let key_value = field_len(name.len()) + field_len(any_value);
    key(out, field, LENGTH);
    varint(out, key_value as u64);
    bytes_field(out, 1, name.as_bytes());
    key(out, 2, LENGTH);
    varint(out, any_value as u64);
    key(out, value_field, wire);
    write_value(out);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u64) {
    varint(out, u64::from(field) << 3 | wire);
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// The encoded size of a length-delimited field of `len` bytes with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LENGTH);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    key(out, field, VARINT);
    varint(out, n);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;

    use super::*;
    use crate::cost::Usd;
    use crate::request::Endpoint;
    use crate::telemetry::trace::ParentSpan;
    use crate::telemetry::{Entry, RequestId};

    fn backend() -> Arc<Backend> {
        let env = |_: &str| None;
        let config = crate::config::Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded", &env).unwrap();
        Arc::clone(&config.backends[0])
    }

    fn attributes(span: &opentelemetry_proto::tonic::trace::v1::Span) -> std::collections::HashMap<String, Value> {
        span.attributes.iter().map(|a| (a.key.clone(), a.value.clone().unwrap().value.unwrap())).collect()
    }

    /// Long strings (multi-byte lengths), negative and huge numbers, a batch past 16 KiB (a
    /// three-byte length): what the integration tests' short values never reach.
    #[test]
    fn batches_decode_with_the_published_definitions() {
        let route: String = "r".repeat(300);
        let message = "connecting failed: ".to_owned() + &"x".repeat(200);
        let mut entry = Entry::new(1_700_000_000_000, RequestId::from_stored("req-1").unwrap());
        entry.route = Some(route.as_str().into());
        entry.user = Some("ünïcode user".into());
        entry.backend = Some(backend());
        entry.prompt_tokens = u64::MAX;
        entry.completion_tokens = 300;
        entry.cost = Usd::from_pico(125_000_000);
        entry.status = 429;
        entry.error = Some("budget_exceeded");
        let server = SpanRecord {
            trace_id: [7; 16],
            span_id: [1; 8],
            parent: Some(ParentSpan { span_id: [9; 8], remote: true }),
            tracestate: Some(http::HeaderValue::from_static("vendor=abc")),
            start_ns: 1_700_000_000_000_000_000,
            end_ns: 1_700_000_000_250_000_000,
            endpoint: Endpoint::ChatCompletions,
            detail: Detail::Server(entry),
        };
        let attempt = |n: u32| SpanRecord {
            trace_id: [7; 16],
            span_id: [2; 8],
            parent: Some(ParentSpan { span_id: [1; 8], remote: false }),
            tracestate: None,
            start_ns: 10,
            end_ns: 5,
            endpoint: Endpoint::Embeddings,
            detail: Detail::Attempt {
                backend: backend(),
                attempt: n,
                outcome: Outcome::Failed { kind: "connect", message: message.clone() },
            },
        };
        let mut batch = vec![server];
        batch.extend((1..=100).map(attempt));
        let mut encoder = Encoder::new("svc");
        let bytes = encoder.encode(&batch);
        assert!(bytes.len() > 16 * 1024);
        // The encoder is reused: a second batch encodes alike.
        assert_eq!(encoder.encode(&batch), bytes);

        let request = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let resource = &request.resource_spans[0];
        let service = resource.resource.as_ref().unwrap().attributes.iter().find(|a| a.key == "service.name");
        assert_eq!(service.unwrap().value.clone().unwrap().value, Some(Value::StringValue("svc".into())));
        let scope = &resource.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "tollgate");
        assert_eq!(scope.spans.len(), 101);

        let span = &scope.spans[0];
        assert_eq!((span.trace_id.as_slice(), span.parent_span_id.as_slice()), (&[7; 16][..], &[9; 8][..]));
        assert_eq!(span.trace_state, "vendor=abc");
        assert_eq!(span.name, format!("chat {route}"));
        assert_eq!((span.kind, span.flags), (2, 0x301));
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 250_000_000);
        let status = span.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "budget_exceeded"));
        let attrs = attributes(span);
        assert_eq!(attrs["gen_ai.request.model"], Value::StringValue(route.clone()));
        assert_eq!(attrs["tollgate.user"], Value::StringValue("ünïcode user".into()));
        assert_eq!(attrs["gen_ai.usage.input_tokens"], Value::IntValue(i64::MAX));
        assert_eq!(attrs["gen_ai.usage.output_tokens"], Value::IntValue(300));
        assert_eq!(attrs["http.response.status_code"], Value::IntValue(429));
        assert_eq!(attrs["tollgate.cost_usd"], Value::DoubleValue(0.000_125));
        assert_eq!(attrs["tollgate.request_id"], Value::StringValue("req-1".into()));

        let last = &scope.spans[100];
        assert_eq!(
            (last.kind, last.flags, last.name.as_str()),
            (3, 0x101, format!("embeddings {}", backend().model).as_str())
        );
        assert_eq!(last.end_time_unix_nano, last.start_time_unix_nano, "an end before the start is clamped");
        assert_eq!(last.status.as_ref().unwrap().message, message);
        let attrs = attributes(last);
        assert_eq!(attrs["tollgate.attempt"], Value::IntValue(100));
        assert_eq!(attrs["error.type"], Value::StringValue("connect".into()));
        assert_eq!(attrs["gen_ai.operation.name"], Value::StringValue("embeddings".into()));
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for n in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, n);
            assert_eq!(out.len(), varint_len(n), "{n}");
        }
    }
}
