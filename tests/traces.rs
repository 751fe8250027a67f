//! OTLP traces from a real `tollgate serve` process to a real OTLP/HTTP receiver on 127.0.0.1
//! that decodes the protobuf with the published OpenTelemetry protos: a server span per
//! request continuing the client's `traceparent`, a client span per upstream attempt (a
//! fallback shows both), GenAI and `tollgate.*` attributes, sampling, and a dead collector that
//! costs requests nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::json;
use support::process::Process;
use support::*;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    trace_state: String,
    flags: u32,
    parent_span_id: String,
    attributes: HashMap<String, AnyValue>,
    error: bool,
    start_ns: u64,
    end_ns: u64,
}

impl Received {
    fn text(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(AnyValue::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(AnyValue::IntValue(n)) => Some(*n),
            _ => None,
        }
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.attributes.get(key) {
            Some(AnyValue::DoubleValue(x)) => Some(*x),
            _ => None,
        }
    }
}

/// An OTLP/HTTP traces endpoint: `POST /v1/traces` with an `ExportTraceServiceRequest`.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    headers: Arc<Mutex<Vec<axum::http::HeaderMap>>>,
}

type Inbox = (Arc<Mutex<Vec<Received>>>, Arc<Mutex<Vec<axum::http::HeaderMap>>>);

async fn receive(State((spans, exports)): State<Inbox>, headers: axum::http::HeaderMap, body: Bytes) -> Vec<u8> {
    exports.lock().unwrap().push(headers);
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let mut received = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref().and_then(|v| v.value.clone()) {
                Some(AnyValue::StringValue(s)) => Some(s),
                _ => None,
            })
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            received.push(Received {
                service: service.clone(),
                name: span.name,
                kind: span.kind,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                trace_state: span.trace_state,
                flags: span.flags,
                parent_span_id: hex(&span.parent_span_id),
                attributes: span
                    .attributes
                    .into_iter()
                    .filter_map(|a| Some((a.key, a.value.and_then(|v| v.value)?)))
                    .collect(),
                error: span.status.is_some_and(|s| s.code == StatusCode::Error as i32),
                start_ns: span.start_time_unix_nano,
                end_ns: span.end_time_unix_nano,
            });
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let headers = Arc::new(Mutex::new(Vec::new()));
        let app =
            Router::new().route("/v1/traces", post(receive)).with_state((Arc::clone(&spans), Arc::clone(&headers)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, spans, headers }
    }

    /// The spans received, once there are at least `want` (waits up to 10 s).
    async fn spans(&self, want: usize) -> Vec<Received> {
        for _ in 0..200 {
            let spans = self.spans.lock().unwrap().clone();
            if spans.len() >= want {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spans.lock().unwrap().clone()
    }
}

fn config(upstream: &Upstream, endpoint: &str, ratio: f64) -> String {
    let extra = format!(
        "[[routes]]\nmodel = \"fallback\"\nbackends = [\"fail\", \"echo\"]\n\n\
         [telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"tollgate-test\"\nsample_ratio = {ratio}\n"
    );
    config_for(&upstream.base_url(), &["echo", "fail"], &extra)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn spans_continue_the_client_trace_with_one_client_span_per_attempt_and_genai_attributes() {
    let upstream = Upstream::start().await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{}", collector.addr);
    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, &endpoint, 1.0)).unwrap();
    // A vendor's collector key, the OpenTelemetry way (percent-encoded).
    let env = [ENV, &[("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-key=k%3Dey")]].concat();
    let process = Process::start(dir.path(), &env);
    let client = reqwest::Client::new();
    let url = process.url("/v1/chat/completions");

    // A fallback: `fail` answers 500, `echo` answers.
    let response = client
        .post(&url)
        .bearer_auth(ALICE_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=abc")
        .json(&json!({"model": "fallback", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let fallback_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    response.text().await.unwrap();
    // A stream in a trace of its own, and a refusal.
    let stream = client
        .post(&url)
        .bearer_auth(BOB_KEY)
        .json(&json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert!(stream.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let refused = client.post(&url).bearer_auth("sk-nobody").json(&chat("echo")).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    let spans = collector.spans(6).await;
    assert_eq!(spans.len(), 6, "3 server spans, 2 attempts of the fallback, 1 of the stream: {spans:#?}");
    assert!(spans.iter().all(|s| s.service == "tollgate-test"));
    let servers: Vec<&Received> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    let clients: Vec<&Received> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    assert_eq!((servers.len(), clients.len()), (3, 3));

    let server = servers.iter().find(|s| s.trace_id == TRACE_ID).expect("the client's trace is continued");
    assert_eq!(server.parent_span_id, CLIENT_SPAN);
    assert_eq!(server.trace_state, "vendor=abc");
    assert_eq!(server.flags, 0x301, "sampled, with a remote parent");
    assert_eq!(server.name, "chat fallback");
    assert_eq!(server.text("gen_ai.operation.name"), Some("chat"));
    assert_eq!(server.text("gen_ai.request.model"), Some("fallback"));
    assert_eq!(server.text("gen_ai.response.model"), Some("echo"));
    assert_eq!(server.int("gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(server.int("gen_ai.usage.output_tokens"), Some(7));
    assert_eq!(server.text("tollgate.user"), Some("alice"));
    assert_eq!(server.text("tollgate.reason"), Some("fallback:fail"));
    assert_eq!(server.text("tollgate.tier"), Some("quality"));
    assert_eq!(server.text("tollgate.request_id"), Some(fallback_id.as_str()));
    assert_eq!(server.int("http.response.status_code"), Some(200));
    assert!((server.float("tollgate.cost_usd").unwrap() - 0.000025).abs() < 1e-12);
    assert!(!server.error);

    let mut attempts: Vec<&&Received> = clients.iter().filter(|c| c.trace_id == TRACE_ID).collect();
    attempts.sort_by_key(|c| c.int("tollgate.attempt"));
    assert_eq!(attempts.len(), 2, "one client span per attempt");
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, server.span_id, "attempts are children of the server span");
        assert_eq!(attempt.flags, 0x101, "sampled, with a local parent");
        assert!(attempt.start_ns >= server.start_ns && attempt.end_ns <= server.end_ns);
    }
    let (failed, answered) = (attempts[0], attempts[1]);
    assert_eq!((failed.text("tollgate.backend"), failed.name.as_str()), (Some("fail"), "chat fail"));
    assert!(failed.error && failed.text("error.type") == Some("status"), "{failed:#?}");
    assert_eq!(
        (answered.text("tollgate.backend"), answered.text("gen_ai.request.model")),
        (Some("echo"), Some("echo"))
    );
    assert_eq!(answered.text("gen_ai.provider.name"), Some("openai"));
    assert_eq!(
        (answered.int("gen_ai.usage.input_tokens"), answered.int("gen_ai.usage.output_tokens")),
        (Some(11), Some(7))
    );
    assert!(!answered.error);
    // Each attempt told its backend its own span.
    let sent: Vec<String> = upstream.seen().iter().filter_map(|s| s.traceparent.clone()).collect();
    assert_eq!(sent[0], format!("00-{TRACE_ID}-{}-01", failed.span_id));
    assert_eq!(sent[1], format!("00-{TRACE_ID}-{}-01", answered.span_id));
    assert!(upstream.seen().iter().take(2).all(|s| s.tracestate.as_deref() == Some("vendor=abc")));
    let exports = collector.headers.lock().unwrap().clone();
    assert!(!exports.is_empty());
    for headers in &exports {
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(headers["x-collector-key"], "k=ey", "headers from OTEL_EXPORTER_OTLP_HEADERS");
    }

    let stream_server = servers.iter().find(|s| s.text("tollgate.user") == Some("bob")).unwrap();
    assert!(stream_server.parent_span_id.is_empty(), "a trace of its own");
    let stream_client = clients.iter().find(|c| c.trace_id == stream_server.trace_id).unwrap();
    assert_eq!(stream_client.int("gen_ai.usage.output_tokens"), Some(7), "usage from the end of the stream");
    assert!(stream_server.end_ns >= stream_client.end_ns, "the server span lasts until the stream ends");

    let refusal = servers.iter().find(|s| s.int("http.response.status_code") == Some(401)).unwrap();
    assert!(refusal.error && refusal.text("error.type") == Some("invalid_api_key"));
    assert!(clients.iter().all(|c| c.trace_id != refusal.trace_id), "no backend was called");

    // The exporter counts a batch once the collector's answer is read: just after it arrived.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = client.get(process.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metric_value(&metrics, "tollgate_trace_spans_exported_total", &[]) >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric_value(&metrics, "tollgate_trace_spans_exported_total", &[]) >= 6.0);
    assert_eq!(metric_value(&metrics, "tollgate_trace_export_failures_total", &[]), 0.0);
    assert_eq!(metric_value(&metrics, "tollgate_trace_spans_dropped_total", &[]), 0.0);
    assert!(!metrics.contains("k=ey"), "the collector key stays out of the metrics");
}

#[tokio::test]
async fn unsampled_traces_propagate_without_exporting_and_a_sampled_parent_wins() {
    let upstream = Upstream::start().await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{}/v1/traces", collector.addr);
    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, &endpoint, 0.0)).unwrap();
    let process = Process::start(dir.path(), ENV);
    let client = reqwest::Client::new();
    let url = process.url("/v1/chat/completions");

    for _ in 0..5 {
        let response = client.post(&url).bearer_auth(ALICE_KEY).json(&chat("echo")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let sent = upstream.seen();
    assert!(sent.iter().all(|s| s.traceparent.as_deref().is_some_and(|t| t.ends_with("-00"))), "not sampled");
    let ids: std::collections::HashSet<_> = sent.iter().map(|s| s.traceparent.clone()).collect();
    assert_eq!(ids.len(), 5, "each request a trace of its own");
    // A client's unsampled context goes upstream as it came: this hop records nothing.
    let unsampled = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    let response = client
        .post(&url)
        .bearer_auth(ALICE_KEY)
        .header("traceparent", &unsampled)
        .json(&chat("echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.seen().last().unwrap().traceparent.as_deref(), Some(unsampled.as_str()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(collector.spans(0).await.is_empty(), "sample_ratio 0 exports nothing");

    let response = client
        .post(&url)
        .bearer_auth(ALICE_KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(&chat("echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = collector.spans(2).await;
    assert_eq!(spans.len(), 2, "a sampled parent is followed: {spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == TRACE_ID));
}

#[tokio::test]
async fn a_dead_collector_costs_requests_nothing_but_a_counter() {
    let upstream = Upstream::start().await;
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, &format!("http://{dead}"), 1.0)).unwrap();
    let process = Process::start(dir.path(), ENV);
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let response = client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .json(&chat("echo"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut failures = 0.0;
    for _ in 0..100 {
        let metrics = client.get(process.url("/metrics")).send().await.unwrap().text().await.unwrap();
        failures = metric_value(&metrics, "tollgate_trace_export_failures_total", &[]);
        if failures > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failures > 0.0, "the failed export is counted");
    let response = client.get(process.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200, "and the gateway stays ready");
}
