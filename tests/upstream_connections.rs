//! Tollgate's own connections to a backend: kept alive and reused between requests, replaced
//! when the backend has closed them, never reused after `connection: close`. The backend is a
//! raw HTTP/1.1 server over TCP on 127.0.0.1 that counts the connections it accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{chat, config_for, Gateway, ALICE_KEY, ENV};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy)]
struct Behaviour {
    /// Closes a connection that stays idle this long (a backend's keep-alive expiry).
    idle_close: Duration,
    /// Answers with `connection: close` and closes.
    close_each: bool,
}

struct KeepAliveUpstream {
    base_url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeepAliveUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeepAliveUpstream {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (accepted, served) = (Arc::clone(&connections), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp, behaviour, Arc::clone(&served)));
            }
        });
        Self { base_url, connections, requests, task }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut tcp: TcpStream, behaviour: Behaviour, served: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        let request = match tokio::time::timeout(behaviour.idle_close, read_request(&mut tcp, &mut buf)).await {
            Ok(Some(request)) => request,
            _ => return,
        };
        served.fetch_add(1, Ordering::SeqCst);
        let connection = if behaviour.close_each { "close" } else { "keep-alive" };
        let usage = r#"{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}"#;
        let answer = if request["stream"] == json!(true) {
            let mut body = String::new();
            for _ in 0..4 {
                push_chunk(&mut body, r#"data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}"#);
            }
            push_chunk(&mut body, &format!(r#"data: {{"choices":[],"usage":{usage}}}"#));
            push_chunk(&mut body, "data: [DONE]");
            body.push_str("0\r\n\r\n");
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\
                 connection: {connection}\r\n\r\n{body}"
            )
        } else {
            let body = format!(
                r#"{{"id":"x","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            );
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
                body.len()
            )
        };
        if tcp.write_all(answer.as_bytes()).await.is_err() || behaviour.close_each {
            return;
        }
    }
}

fn push_chunk(body: &mut String, event: &str) {
    let event = format!("{event}\n\n");
    body.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
}

/// One request (head and Content-Length body) from `tcp`, its JSON body parsed; `None` at EOF.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Value> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= head_end + length {
                let body = serde_json::from_slice(&buf[head_end..head_end + length]).ok();
                buf.drain(..head_end + length);
                return body;
            }
        }
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn gateway_for(upstream: &KeepAliveUpstream) -> Gateway {
    Gateway::start(&config_for(&upstream.base_url, &["m"], ""), ENV).await
}

async fn ask(gateway: &Gateway, stream: bool) -> String {
    let mut body = chat("m");
    body["stream"] = json!(stream);
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &body).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test]
async fn sequential_requests_reuse_one_backend_connection() {
    let upstream = KeepAliveUpstream::start(Behaviour { idle_close: Duration::from_secs(30), close_each: false }).await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..4 {
        assert!(ask(&gateway, false).await.contains("\"hi\""));
        let streamed = ask(&gateway, true).await;
        assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 8);
    assert_eq!(upstream.connections(), 1, "answers and streams read to their end free the connection");
    let usage = gateway.usage("alice").await;
    assert_eq!(usage["requests"], 8, "{usage}");
}

#[tokio::test]
async fn concurrent_requests_open_at_most_the_backends_concurrency() {
    let upstream = KeepAliveUpstream::start(Behaviour { idle_close: Duration::from_secs(30), close_each: false }).await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..3 {
        let mut body = chat("m");
        body["stream"] = json!(true);
        for response in gateway.post_concurrently(8, "/v1/chat/completions", ALICE_KEY, &body).await {
            assert_eq!(response.status(), 200);
            assert!(response.text().await.unwrap().contains("[DONE]"));
        }
    }
    // config_for gives the backend max_concurrency 8: idle connections are kept up to that.
    assert!(upstream.connections() <= 8, "{} connections for 24 requests", upstream.connections());
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_costs_no_request() {
    let upstream =
        KeepAliveUpstream::start(Behaviour { idle_close: Duration::from_millis(100), close_each: false }).await;
    let gateway = gateway_for(&upstream).await;
    for round in 0..3 {
        ask(&gateway, round % 2 == 1).await;
        // The backend's keep-alive expires while the connection sits in the pool.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(upstream.connections(), 3, "each closed connection was replaced, and each request answered");
}

#[tokio::test]
async fn connection_close_answers_are_not_reused() {
    let upstream = KeepAliveUpstream::start(Behaviour { idle_close: Duration::from_secs(30), close_each: true }).await;
    let gateway = gateway_for(&upstream).await;
    for round in 0..4 {
        ask(&gateway, round % 2 == 0).await;
    }
    assert_eq!(upstream.connections(), 4);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 4);
}
