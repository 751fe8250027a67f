//! Time per operation of the per-request pure paths: key lookup, request parsing, model
//! resolution in the config snapshot, the routing decision (which must stay under 2 µs: the run
//! fails beyond), cost pricing and the SSE usage scanner over a realistic stream.
//! `cargo bench --bench hot_paths`; the whole gateway under load is `benches/load/run.sh`.
//!
//! A plain harness (no framework) to keep the dependency tree lean; each figure is the median
//! of several timed batches, so a noisy neighbour on a shared machine moves it less.

use std::hint::black_box;

use bytes::Bytes;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use tollgate::config::{Config, EMBEDDED_DEFAULT};
use tollgate::cost::Usd;
use tollgate::openai::Usage;
use tollgate::policy::{decide, Candidate, Candidates, Facts};
use tollgate::request::{Endpoint, ProxyRequest};
use tollgate::snapshot::Snapshot;
use tollgate::upstream::sse::SseScanner;
use tollgate::upstream::upstream_body;

const BATCHES: usize = 15;

/// The routing decision's budget per request (issue 5): a run over it fails.
const DECIDE_LIMIT_NS: f64 = 2_000.0;

/// Median nanoseconds per call of `op`; `None` in a smoke pass.
#[expect(clippy::disallowed_methods, reason = "a benchmark measures wall time on purpose")]
fn measure(name: &str, iterations: u32, mut op: impl FnMut()) -> Option<f64> {
    // `cargo test --all-targets` runs benches without `--bench`: one pass proves they work.
    if !std::env::args().any(|a| a == "--bench") {
        op();
        return None;
    }
    let mut per_op = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = std::time::Instant::now();
        for _ in 0..iterations {
            op();
        }
        per_op.push(start.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    per_op.sort_by(f64::total_cmp);
    let median = per_op[BATCHES / 2];
    println!("{name:<48} {median:>10.0} ns/op (median of {BATCHES} batches of {iterations})");
    Some(median)
}

fn sse_stream(chunks: usize) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..chunks)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
                 \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            ))
        })
        .collect();
    events.push(Bytes::from_static(
        b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":32}}\n\n",
    ));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn main() {
    let none = |_: &str| None;
    let config = match Config::parse(EMBEDDED_DEFAULT, "embedded", &none) {
        Ok(config) => config,
        Err(e) => panic!("embedded config: {e}"),
    };
    let user = &config.users[1];
    let candidates: Candidates<'_> = config
        .backends
        .iter()
        .enumerate()
        .map(|(index, b)| Candidate {
            index,
            name: &b.name,
            quality: b.quality,
            fits_context: true,
            healthy: true,
            has_capacity: true,
            estimated_cost: b.pricing.estimate(120, 256, b.expected_tokens_per_s),
        })
        .collect();
    let facts = Facts {
        candidates,
        pinned: false,
        policy: user.policy,
        min_quality: user.min_quality,
        max_request: user.max_request_usd,
        remaining: Some(Usd::from_pico(1_000_000_000)),
        paced: false,
    };
    let decided = measure("policy::decide (2 candidates, cost-first)", 200_000, || {
        black_box(decide(black_box(&facts)).ok());
    });
    let quality_first =
        Facts { policy: config.users[0].policy, min_quality: config.users[0].min_quality, ..facts.clone() };
    let decided_qf = measure("policy::decide (2 candidates, quality-first)", 200_000, || {
        black_box(decide(black_box(&quality_first)).ok());
    });
    for (policy, ns) in [("cost-first", decided), ("quality-first", decided_qf)] {
        if let Some(ns) = ns.filter(|ns| *ns > DECIDE_LIMIT_NS) {
            panic!("policy::decide ({policy}) takes {ns:.0} ns, over its {DECIDE_LIMIT_NS:.0} ns budget");
        }
    }

    let per_token = config.backends[0].pricing;
    let hourly = config.backends[1].pricing;
    let usage = Usage::new(120, 256);
    measure("cost::Pricing::price_tokens (per token)", 1_000_000, || {
        black_box(black_box(&per_token).price_tokens(black_box(&usage)));
    });
    measure("cost::Pricing::estimate (per hour)", 1_000_000, || {
        black_box(black_box(&hourly).estimate(black_box(120), black_box(256), black_box(30)));
    });

    let freed = Arc::new(tokio::sync::Notify::new());
    let snapshot_config = match Config::parse(EMBEDDED_DEFAULT, "embedded", &none) {
        Ok(config) => config,
        Err(e) => panic!("embedded config: {e}"),
    };
    let snapshot = match Snapshot::new(snapshot_config, None, &freed) {
        Ok(snapshot) => snapshot,
        Err(e) => panic!("snapshot: {e}"),
    };
    measure("snapshot::Snapshot::resolve (route alias)", 1_000_000, || {
        black_box(snapshot.resolve(black_box("auto")));
    });
    measure("snapshot::Snapshot::resolve (pinned backend)", 1_000_000, || {
        black_box(snapshot.resolve(black_box("sim-cpu-135m")));
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tg-demo-cost-key"));
    measure("auth::presented + KeyTable::get (sha256 + lookup)", 200_000, || {
        let key = tollgate::auth::presented(black_box(&headers));
        black_box(key.is_ok_and(|k| snapshot.keys.get(&k).is_some()));
    });

    let body = br#"{"model":"auto","messages":[{"role":"system","content":"You are terse."},
        {"role":"user","content":"Summarise the plot of Hamlet in two sentences."}],"max_tokens":128,"temperature":0.2}"#;
    let body = Bytes::from_static(body);
    measure("request::ProxyRequest::parse (chat)", 100_000, || {
        black_box(ProxyRequest::parse(Endpoint::ChatCompletions, black_box(body.clone())).ok());
    });
    if let Ok(request) = ProxyRequest::parse(Endpoint::ChatCompletions, body.clone()) {
        measure("upstream::upstream_body (chat)", 100_000, || {
            black_box(upstream_body(black_box(&request), "llama-3.1-8b-instruct", false));
        });
    }

    let stream = sse_stream(32);
    measure("sse::SseScanner, 32-chunk stream, usage hidden", 20_000, || {
        let mut scanner = SseScanner::new(true);
        for event in &stream {
            black_box(scanner.feed(event.clone()));
        }
        black_box(scanner.usage());
    });
    let whole: Bytes = stream.concat().into();
    measure("sse::SseScanner, same stream in one read", 20_000, || {
        let mut scanner = SseScanner::new(false);
        black_box(scanner.feed(whole.clone()));
        black_box(scanner.usage());
    });
}
