//! A fault-injecting OpenAI-like upstream over raw TCP: it does to Tollgate what broken or
//! hostile servers do. The fault is chosen by the (rewritten) `model` of the request:
//! `cut` (stream stops mid-way, connection dropped), `eof-no-done` (stream ends cleanly but
//! without `[DONE]`), `stall-head` (never answers), `stall-mid` (two chunks, then silence),
//! `reset` (closes the socket as soon as the request is read), `slow-headers` (a byte of head
//! every 300 ms), `bad-sse` (malformed lines, then a proper end), `ok` (a normal stream).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct FaultyUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultyUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        Self { addr, requests, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request (head and Content-Length body) and returns its `model`.
async fn read_model(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + length]).ok()?;
    body["model"].as_str().map(str::to_owned)
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

fn token_event() -> String {
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"}}],\"usage\":null}\n\n".to_owned()
}

const USAGE_EVENT: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n";

async fn serve(mut tcp: TcpStream) {
    let Some(model) = read_model(&mut tcp).await else { return };
    match model.as_str() {
        "stall-head" => tokio::time::sleep(Duration::from_secs(60)).await,
        "reset" => {
            let _ = tcp.set_zero_linger();
            drop(tcp);
        }
        "slow-headers" => {
            for byte in SSE_HEAD.bytes() {
                if tcp.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        "cut" | "stall-mid" | "eof-no-done" | "bad-sse" | "ok" => {
            let _ = tcp.write_all(SSE_HEAD.as_bytes()).await;
            let tokens = if model == "stall-mid" { 2 } else { 3 };
            for _ in 0..tokens {
                let _ = tcp.write_all(&chunk(&token_event())).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match model.as_str() {
                "cut" => {
                    let _ = tcp.set_zero_linger();
                }
                "stall-mid" => tokio::time::sleep(Duration::from_secs(60)).await,
                "eof-no-done" => {
                    let _ = tcp.write_all(&chunk(USAGE_EVENT)).await;
                    let _ = tcp.write_all(b"0\r\n\r\n").await;
                }
                _ => {
                    if model == "bad-sse" {
                        let _ = tcp.write_all(&chunk("data: {not json at all\n\n")).await;
                        let _ = tcp.write_all(&chunk("this line is not sse\n\n")).await;
                        let _ = tcp.write_all(&chunk("data: {\"usage\": [1, 2\n\n")).await;
                    }
                    let _ = tcp.write_all(&chunk(USAGE_EVENT)).await;
                    let _ = tcp.write_all(&chunk("data: [DONE]\n\n")).await;
                    let _ = tcp.write_all(b"0\r\n\r\n").await;
                }
            }
        }
        _ => {}
    }
}
