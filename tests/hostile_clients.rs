//! Hostile or broken clients: slow heads, unfinished bodies, idle connections, oversized
//! headers, malformed bodies and attempts to steer where the gateway connects. Each gets a
//! bounded, clear answer; nobody else waits; nothing reaches a backend it should not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn setup(server_extra: &str) -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let config = config_for(&upstream.base_url(), &["echo"], "")
        .replace("shutdown_grace_s = 5\n", &format!("shutdown_grace_s = 5\n{server_extra}"));
    let gateway = Gateway::start(&config, ENV).await;
    (upstream, gateway)
}

/// Reads until the peer closes (or `limit` passes); returns what arrived and when it closed.
async fn read_to_close(tcp: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + limit, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), Some(started.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_and_blocks_nobody() {
    let (_upstream, gateway) = setup("header_read_timeout_s = 1\n").await;
    let mut slow = TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            if slow.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (_, closed) = read_to_close(&mut slow, Duration::from_secs(3)).await;
        closed
    });
    let started = Instant::now();
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(500), "others are served meanwhile");
    let closed = trickle.await.unwrap();
    assert!(closed.is_some(), "the slow client's connection is closed by the gateway");
}

#[tokio::test]
async fn a_body_that_never_finishes_gets_a_408() {
    let (upstream, gateway) = setup("body_read_timeout_s = 1\n").await;
    let mut tcp = TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (answer, _) = read_to_close(&mut tcp, Duration::from_secs(4)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_the_connection_limit_refuses_clearly() {
    let (_upstream, gateway) = setup("max_connections = 50\nheader_read_timeout_s = 2\n").await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(gateway.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(gateway.addr).await.unwrap();
    extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answer, _) = read_to_close(&mut extra, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"code\":\"connection_limit\""), "{answer}");
    // The idle ones are closed after the header read timeout, which frees the slots.
    let (_, closed) = read_to_close(&mut idle[0], Duration::from_secs(4)).await;
    assert!(closed.is_some_and(|t| t < Duration::from_secs(4)), "idle connection still open");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = gateway.post("/v1/chat/completions", ALICE_KEY, &chat("auto")).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (upstream, gateway) = setup("").await;
    let client = reqwest::Client::new();
    let one_big = client
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("x-junk", "a".repeat(10_000))
        .json(&chat("auto"))
        .send()
        .await
        .unwrap();
    assert_eq!(one_big.status(), 431);
    let body: Value = one_big.json().await.unwrap();
    assert_eq!(body["error"]["code"], "header_too_large");

    let mut many = client.post(gateway.url("/v1/chat/completions")).bearer_auth(ALICE_KEY);
    for i in 0..120 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_eq!(many.json(&chat("auto")).send().await.unwrap().status(), 431);
    let mut huge = client.post(gateway.url("/v1/chat/completions")).bearer_auth(ALICE_KEY);
    for i in 0..20 {
        huge = huge.header(format!("x-h{i}"), "b".repeat(4000));
    }
    assert_eq!(huge.json(&chat("auto")).send().await.unwrap().status(), 431);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn malformed_bodies_are_4xx_in_the_openai_shape_and_never_reach_a_backend() {
    let (upstream, gateway) = setup("").await;
    let cases: &[(&[u8], &str)] = &[
        (br#"{"model":"auto","model":"other","messages":[{"role":"user","content":"x"}]}"#, "appears twice"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x","content":"y"}]}"#, "appears twice"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"temperature":1e400}"#, "not valid JSON"),
        (b"{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}", "not valid JSON"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "`stream`"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, "`max_tokens`"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#, "`max_tokens`"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":"10"}"#, "`max_tokens`"),
        (br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":1000000000}"#, "tokens"),
        (br#"{"model":"auto","messages":{}}"#, "`messages`"),
        (br#"{"model":"auto","messages":[]}"#, "`messages`"),
        (br#"{"model":"auto","messages":[1]}"#, "`messages[0]`"),
        (br#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#, "`model`"),
        (br#"[1,2,3]"#, "JSON object"),
        (b"", "not valid JSON"),
    ];
    let deep = format!(
        "{{\"model\":\"auto\",\"messages\":[{{\"role\":\"user\",\"content\":{}1{}}}]}}",
        "[".repeat(300),
        "]".repeat(300)
    );
    let client = reqwest::Client::new();
    let mut all: Vec<(Vec<u8>, &str)> = cases.iter().map(|(b, m)| (b.to_vec(), *m)).collect();
    all.push((deep.into_bytes(), "not valid JSON"));
    for (body, expected) in all {
        let response = client
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(ALICE_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{} → {text}", String::from_utf8_lossy(&body));
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains(expected), "{expected}: {text}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert!(upstream.seen().is_empty(), "nothing invalid went upstream");
}

#[tokio::test]
async fn no_request_field_or_header_chooses_where_the_gateway_connects() {
    let (upstream, gateway) = setup("").await;
    let decoy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let decoy_url = format!("http://{}/v1", decoy.local_addr().unwrap());
    let mut body = chat("auto");
    for field in ["api_base", "base_url", "url", "endpoint"] {
        body[field] = Value::String(decoy_url.clone());
    }
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(ALICE_KEY)
        .header("x-forwarded-host", decoy.local_addr().unwrap().to_string())
        .header("x-tollgate-backend", "elsewhere")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.seen().len(), 1, "the configured backend got it");
    let nobody = tokio::time::timeout(Duration::from_millis(200), decoy.accept()).await;
    assert!(nobody.is_err(), "the decoy address was never contacted");
}

#[tokio::test]
async fn admin_keys_are_checked_exactly() {
    let (_upstream, gateway) = setup("").await;
    let client = reqwest::Client::new();
    let near_misses = [
        // (A trailing space never arrives: HTTP parsers strip it from header values.)
        ADMIN_KEY.to_uppercase(),
        format!(" {ADMIN_KEY}"),
        ADMIN_KEY[..ADMIN_KEY.len() - 1].to_owned(),
        format!("{ADMIN_KEY}x"),
        ALICE_KEY.to_owned(),
    ];
    for key in near_misses {
        let response = client
            .get(gateway.url("/admin/usage"))
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "`{key}`");
    }
    let ok = client.get(gateway.url("/admin/usage")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}
