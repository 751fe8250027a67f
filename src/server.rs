//! Accepting connections: the edge of the gateway. Every socket gets TCP_NODELAY; slow or idle
//! clients are bounded (header read timeout, connection limit, header size and count); shutdown
//! is graceful and bounded.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::{app, AppState};

/// Bytes of one request head (request line and all headers): hyper answers 431 beyond. The
/// header count is bounded by hyper's default (100, also 431 beyond).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves until `shutdown` resolves, then stops accepting, marks the replica as draining, and
/// lets in-flight requests (streams included) finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    // Connection limits apply from start to exit: a reload cannot resize live sockets.
    let (max_connections, header_read_timeout) = {
        let server = &state.snapshot.load().config.server;
        (server.max_connections, server.header_read_timeout)
    };
    let router = app(Arc::clone(&state));
    let connections = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // Bounds a client that trickles its headers, and an idle keep-alive connection's wait
        // for its next request.
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY a response written in several pieces waits for the client's
        // delayed ACK: ~40 ms added to every answer (see shared FACTS.md).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            state.metrics.count_rejected("connection_limit");
            tokio::spawn(refuse(tcp));
            continue;
        };
        let (router, state) = (router.clone(), Arc::clone(&state));
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (router, state) = (router.clone(), Arc::clone(&state));
            async move { Ok::<_, Infallible>(crate::http::handle(router, &state, request).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(crate::wake::absorb_self_wakes(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        }));
    }
    drop(listener);
    tracing::info!(grace_s = grace.as_secs(), "shutting down: no new connections, finishing in-flight requests");
    state.draining.store(true, Ordering::Relaxed);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over: dropping the requests still in flight");
    }
    Ok(())
}

/// A connection over the limit gets a clear 503 (OpenAI error shape) and is closed.
async fn refuse(mut tcp: TcpStream) {
    const BODY: &str = r#"{"error":{"message":"too many connections to this gateway; retry shortly","type":"api_error","param":null,"code":"connection_limit"}}"#;
    // Read what the client already sent, briefly, so closing does not reset the connection
    // before it sees the answer.
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut scratch)).await;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
