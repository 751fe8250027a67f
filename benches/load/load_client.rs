//! The load harness's client (`benches/load/run.sh`): closed-loop load over keep-alive HTTP/1.1
//! connections, one request at a time per connection, with the checks a generic load tool
//! cannot make: the time to the first body byte, and whether each answer carried its usage and
//! (streams) `data: [DONE]`.
//!
//! ```text
//! load_client --url http://127.0.0.1:PORT/v1/chat/completions [--key KEY] [--model auto]
//!             [--concurrency 1] [--duration-s 5] [--warmup-s 1] [--stream] [--threads 1]
//! load_client --url … --stream --hold 1000 --watch-pid PID [--hold-timeout-s 60]
//! load_client --url … --keys-file FILE [--rate 10000] [--expect-status 401]
//! ```
//! `--keys-file`: one key per line, used in turn by successive requests (the scale benchmark's
//! traffic over many principals). `--rate`: at most that many requests per second in all,
//! paced per connection. `--expect-status`: the status an answer must have to count (default:
//! any 2xx), e.g. 401 for a flood of unknown keys.
//! Prints one JSON object on stdout. Every run is bounded: no new request starts after the
//! measured window, and requests still running `GRACE` later are abandoned.
//! `--hold N`: opens N streams at once (point it at a slow stream) and reports the largest
//! resident set of process PID while they were open.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// How long requests still in flight at the end of the window may take to finish.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    authority: String,
    path: String,
    keys: Arc<[String]>,
    next_key: Arc<AtomicUsize>,
    body: Bytes,
    stream: bool,
    /// The status an answer must have to count; `None`: any 2xx.
    expect: Option<u16>,
    /// Each connection's pause between request starts, when the rate is bounded.
    pace: Option<Duration>,
    /// `--unique`: every request's question carries its own number (cache misses).
    unique: Option<Arc<AtomicUsize>>,
}

impl Target {
    /// The next request's body.
    fn body(&self) -> Bytes {
        match &self.unique {
            None => self.body.clone(),
            Some(counter) => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&self.body).replacen("proxies.", &format!("proxies, #{n}."), 1);
                Bytes::from(text)
            }
        }
    }

    /// The key for the next request, if any: the keys in turn.
    fn key(&self) -> Option<&str> {
        if self.keys.is_empty() {
            return None;
        }
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        Some(self.keys[n % self.keys.len()].as_str())
    }
}

/// What one request showed.
struct Sample {
    latency: Duration,
    first_byte: Duration,
    usage: bool,
    done: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut url, mut key, mut model) = (String::new(), None, "auto".to_owned());
    let (mut concurrency, mut duration_s, mut warmup_s, mut threads) = (1usize, 5.0f64, 1.0f64, 1usize);
    let (mut stream, mut hold, mut watch_pid, mut hold_timeout_s) = (false, 0usize, 0u32, 60u64);
    let (mut keys_file, mut rate, mut expect, mut unique) = (None, 0f64, None, false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--stream" {
            stream = true;
            continue;
        }
        if flag == "--unique" {
            unique = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = value,
            "--key" => key = Some(value),
            "--model" => model = value,
            "--concurrency" => concurrency = value.parse()?,
            "--duration-s" => duration_s = value.parse()?,
            "--warmup-s" => warmup_s = value.parse()?,
            "--threads" => threads = value.parse()?,
            "--hold" => hold = value.parse()?,
            "--watch-pid" => watch_pid = value.parse()?,
            "--hold-timeout-s" => hold_timeout_s = value.parse()?,
            "--keys-file" => keys_file = Some(value),
            "--rate" => rate = value.parse()?,
            "--expect-status" => expect = Some(value.parse()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let rest = url.strip_prefix("http://").ok_or("--url must be http://HOST:PORT/PATH")?;
    let (authority, path) = rest.split_once('/').ok_or("--url needs a path")?;
    let addr: SocketAddr = authority.parse()?;
    let body = if stream {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say something short about proxies."}}],"max_tokens":32,"stream":true,"stream_options":{{"include_usage":true}}}}"#
        )
    } else {
        format!(
            r#"{{"model":"{model}","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say something short about proxies."}}],"max_tokens":32}}"#
        )
    };
    let keys: Vec<String> = match keys_file {
        Some(file) => std::fs::read_to_string(file)?.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect(),
        None => key.into_iter().collect(),
    };
    let target = Target {
        addr,
        authority: authority.to_owned(),
        path: format!("/{path}"),
        keys: keys.into(),
        next_key: Arc::new(AtomicUsize::new(0)),
        body: Bytes::from(body),
        stream,
        expect,
        pace: (rate > 0.0).then(|| Duration::from_secs_f64(concurrency as f64 / rate)),
        unique: unique.then(|| Arc::new(AtomicUsize::new(0))),
    };
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    let report = if hold > 0 {
        runtime.block_on(hold_streams(target, hold, watch_pid, Duration::from_secs(hold_timeout_s)))
    } else {
        runtime.block_on(closed_loop(
            target,
            concurrency,
            Duration::from_secs_f64(warmup_s),
            Duration::from_secs_f64(duration_s),
        ))
    };
    println!("{report}");
    Ok(())
}

/// A fresh keep-alive connection to the target.
async fn connect(addr: SocketAddr) -> Option<http1::SendRequest<Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// One request on `sender`, read to its end.
async fn one(sender: &mut http1::SendRequest<Full<Bytes>>, target: &Target) -> Option<Sample> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = target.key() {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let body = target.body();
    let request = builder.header(header::CONTENT_LENGTH, body.len()).body(Full::new(body)).ok()?;
    sender.ready().await.ok()?;
    let started = Instant::now();
    let response = sender.send_request(request).await.ok()?;
    let counts = match target.expect {
        Some(code) => response.status().as_u16() == code,
        None => response.status().is_success(),
    };
    if !counts {
        return None;
    }
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut seen = Vec::with_capacity(if target.stream { 8192 } else { 1024 });
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Ok(data) = frame.into_data() {
            if first_byte.is_none() && !data.is_empty() {
                first_byte = Some(started.elapsed());
            }
            seen.extend_from_slice(&data);
        }
    }
    let latency = started.elapsed();
    let usage = has_usage(&seen);
    let done = !target.stream || memchr::memmem::find(&seen, b"data: [DONE]").is_some();
    Some(Sample { latency, first_byte: first_byte.unwrap_or(latency), usage, done })
}

/// A non-null `"usage": {…}` member anywhere in the answer, whatever the spacing.
fn has_usage(bytes: &[u8]) -> bool {
    memchr::memmem::find_iter(bytes, b"\"usage\"").any(|at| {
        let rest = bytes[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().starts_with(b"{"))
    })
}

async fn closed_loop(target: Target, concurrency: usize, warmup: Duration, duration: Duration) -> String {
    let begin = Instant::now();
    let window_start = begin + warmup;
    let window_end = window_start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (target, errors) = (target.clone(), Arc::clone(&errors));
        workers.push(tokio::spawn(async move {
            let (mut samples, mut all) = (Vec::new(), 0u64);
            let mut sender = None;
            let mut next_start = Instant::now();
            while Instant::now() < window_end {
                if let Some(pace) = target.pace {
                    tokio::time::sleep_until(next_start).await;
                    next_start = (next_start + pace).max(Instant::now() - pace);
                }
                if sender.is_none() {
                    sender = connect(target.addr).await;
                    if sender.is_none() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let Some(s) = sender.as_mut() else { continue };
                let started = Instant::now();
                match one(s, &target).await {
                    Some(sample) => {
                        all += 1;
                        if started >= window_start && Instant::now() <= window_end {
                            samples.push(sample);
                        }
                    }
                    None => {
                        if started >= window_start {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        sender = None;
                    }
                }
            }
            (samples, all)
        }));
    }
    let (mut samples, mut all) = (Vec::new(), 0);
    for worker in workers {
        let remaining = (window_end + GRACE).saturating_duration_since(Instant::now());
        if let Ok(Ok((mut s, n))) = tokio::time::timeout(remaining, worker).await {
            samples.append(&mut s);
            all += n;
        }
    }
    summarise(&samples, all, errors.load(Ordering::Relaxed), duration)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// `all`: every answer completed, warm-up and tail included (what the server did work for).
fn summarise(samples: &[Sample], all: u64, errors: u64, window: Duration) -> String {
    let mut latency: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    let mut first: Vec<Duration> = samples.iter().map(|s| s.first_byte).collect();
    latency.sort_unstable();
    first.sort_unstable();
    let usage = samples.iter().filter(|s| s.usage).count();
    let done = samples.iter().filter(|s| s.done).count();
    format!(
        r#"{{"requests":{},"all":{all},"errors":{errors},"rps":{:.3},"p50_ms":{:.4},"p99_ms":{:.4},"ttfb_p50_ms":{:.4},"ttfb_p99_ms":{:.4},"usage_ok":{usage},"done_ok":{done}}}"#,
        samples.len(),
        samples.len() as f64 / window.as_secs_f64(),
        percentile(&latency, 50.0),
        percentile(&latency, 99.0),
        percentile(&first, 50.0),
        percentile(&first, 99.0),
    )
}

/// Resident set (VmRSS, KiB) of `pid` now.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn hold_streams(target: Target, streams: usize, pid: u32, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let opened = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (target, opened) = (target.clone(), Arc::clone(&opened));
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(target.addr).await?;
            let mut builder = Request::builder()
                .method(Method::POST)
                .uri(target.path.as_str())
                .header(header::HOST, target.authority.as_str())
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(key) = target.key() {
                builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
            }
            let request = builder.body(Full::new(target.body())).ok()?;
            sender.ready().await.ok()?;
            let response = sender.send_request(request).await.ok()?;
            let mut body = response.into_body();
            let mut seen = Vec::new();
            let mut counted = false;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.ok()?.into_data() {
                    if !counted {
                        counted = true;
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    seen.extend_from_slice(&data);
                }
            }
            Some(has_usage(&seen) && memchr::memmem::find(&seen, b"data: [DONE]").is_some())
        }));
    }
    // Sample the resident set while the streams are open.
    let sampler = {
        let (opened, finished) = (Arc::clone(&opened), Arc::clone(&finished));
        tokio::spawn(async move {
            let (mut max, mut at_all_open) = (0u64, 0u64);
            while !finished.load(Ordering::Relaxed) {
                let rss = rss_kib(pid);
                max = max.max(rss);
                if at_all_open == 0 && opened.load(Ordering::Relaxed) as usize >= streams {
                    at_all_open = rss;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (max, at_all_open)
        })
    };
    let mut complete = 0;
    for task in tasks {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(Some(true))) = tokio::time::timeout(remaining, task).await {
            complete += 1;
        }
    }
    finished.store(true, Ordering::Relaxed);
    let (max, at_all_open) = sampler.await.unwrap_or((0, 0));
    format!(
        r#"{{"streams":{streams},"opened":{},"complete":{complete},"max_rss_kib":{max},"rss_all_open_kib":{at_all_open}}}"#,
        opened.load(Ordering::Relaxed)
    )
}
