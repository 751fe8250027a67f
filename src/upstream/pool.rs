//! Our own HTTP/1 connections to a backend, kept alive between requests.
//!
//! hyper's pooled client runs each connection in a task of its own, so every chunk of an answer
//! crosses to the request's task through a channel and a wake-up, and is written to the client
//! by itself. Here a connection is driven by the task that uses it: the request's, while it
//! waits for the head, then the response body's ([`ConnBody`]), so whatever one read from the
//! backend brings is relayed by one write to the client. A connection whose answer was read to
//! its end goes back to the idle list; any other is closed.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

use super::BodyError;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Connection = http1::Connection<Io, Full<Bytes>>;
type Sender = http1::SendRequest<Full<Bytes>>;

/// Why no answer head arrived on a connection.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting failed: {0}")]
    Connect(String),
    #[error("the exchange failed: {0}")]
    Exchange(#[source] hyper::Error),
}

/// An open connection, between two requests or serving one. The connection (hyper's state
/// and buffers, the TLS session) is boxed: every future and body that holds a `Live` would
/// otherwise carry, and copy on each move, its kilobytes.
struct Live {
    sender: Sender,
    connection: Box<Connection>,
}

struct Idle {
    live: Live,
    since: Instant,
}

/// The connections of one backend.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// scheme://authority, what the connector dials.
    origin: Uri,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Whether the task closing expired idle connections runs (started with the first idle one).
    sweeping: AtomicBool,
}

impl Pool {
    /// Dials `origin` (scheme://authority), over TLS for https; keeps at most `max_idle`
    /// connections waiting, each for at most `idle_timeout`.
    pub fn new(
        origin: Uri,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Result<Arc<Self>, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let idle = Mutex::new(Vec::new());
        Ok(Arc::new(Self { connector, origin, idle, max_idle, idle_timeout, sweeping: AtomicBool::new(false) }))
    }

    /// Sends `request` (origin-form URI, `Host` set) and waits for the answer's head. A reused
    /// connection that turns out closed before the request was written is replaced by another,
    /// so a backend's keep-alive expiry never fails a request. `now`: the caller's latest clock
    /// reading.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
        now: Instant,
    ) -> Result<Response<ConnBody>, SendError> {
        loop {
            let (mut live, reused) = match self.checkout(now).await {
                Some(live) => (live, true),
                // Boxed: dialing and the TLS handshake make a large future, and it is rare.
                None => (Box::pin(self.connect()).await?, false),
            };
            let answer = live.sender.try_send_request(request);
            let (answer, connection_ended) = drive(&mut live.connection, answer).await;
            match answer {
                Ok(response) => {
                    // A backend may close right after a short answer: the body is buffered.
                    let live = (!connection_ended).then_some(live);
                    let pool = Arc::clone(self);
                    return Ok(response.map(|incoming| ConnBody { incoming, live, pool }));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Exchange(failed.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<Live, SendError> {
        let io =
            self.connector.clone().oneshot(self.origin.clone()).await.map_err(|e| SendError::Connect(e.to_string()))?;
        let (sender, connection) =
            http1::Builder::new().handshake(io).await.map_err(|e| SendError::Connect(e.to_string()))?;
        Ok(Live { sender, connection: Box::new(connection) })
    }

    /// The most recently used idle connection that is still open; older and closed ones are
    /// dropped on the way.
    async fn checkout(&self, now: Instant) -> Option<Live> {
        loop {
            let Idle { mut live, since } = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
            if now.saturating_duration_since(since) >= self.idle_timeout {
                continue;
            }
            // Nobody polled it while idle: one poll reads a close or reset the backend sent.
            let usable = poll_fn(|cx| {
                let open = Pin::new(&mut live.connection).poll(cx).is_pending();
                Poll::Ready(open && matches!(live.sender.poll_ready(cx), Poll::Ready(Ok(()))))
            })
            .await;
            if usable {
                return Some(live);
            }
        }
    }

    /// Expired connections are left to the sweep (and skipped by `checkout`): scanning the
    /// list here would cost every request a pass over up to `max_idle` entries under the lock.
    fn checkin(self: &Arc<Self>, live: Live) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(Idle { live, since: Instant::now() });
        }
        drop(idle);
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            self.sweep_in_background();
        }
    }

    fn close_expired(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|i| now.duration_since(i.since) < self.idle_timeout);
    }

    /// Without traffic nothing else would close idle connections after a burst (each holds a
    /// socket and its buffers). The task ends with the pool, i.e. with the config that made it.
    fn sweep_in_background(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let pool = Arc::downgrade(self);
        let period = self.idle_timeout / 2;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match pool.upgrade() {
                    Some(pool) => pool.close_expired(),
                    None => return,
                }
            }
        });
    }
}

/// Polls the connection alongside the answer it owes, until the answer's head (or failure);
/// also says whether the connection has ended (it must not be polled again).
async fn drive<F, T>(connection: &mut Connection, answer: F) -> (T, bool)
where
    F: Future<Output = T>,
{
    let mut answer = std::pin::pin!(answer);
    let mut connection_done = false;
    poll_fn(|cx| {
        // The connection first: what it reads resolves the answer in the same pass.
        if !connection_done {
            if let Poll::Ready(result) = Pin::new(&mut *connection).poll(cx) {
                connection_done = true;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "backend connection ended");
                }
            }
        }
        answer.as_mut().poll(cx).map(|answer| (answer, connection_done))
    })
    .await
}

/// An answer's body, driving its connection as it is read.
pub struct ConnBody {
    incoming: Incoming,
    /// `None` once the connection has ended (or gone back to the pool).
    live: Option<Live>,
    pool: Arc<Pool>,
}

impl ConnBody {
    /// The answer was read to its end: the connection may serve another request.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut live) = self.live.take() else { return };
        // One more poll lets it notice the end of the message and ask for the next request.
        if Pin::new(&mut live.connection).poll(cx).is_pending() && live.sender.is_ready() {
            self.pool.checkin(live);
        }
    }
}

impl Body for ConnBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(live) = &mut this.live {
            if let Poll::Ready(result) = Pin::new(&mut live.connection).poll(cx) {
                this.live = None;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "backend connection ended mid-body");
                }
            }
        }
        let frame = std::task::ready!(Pin::new(&mut this.incoming).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if this.incoming.is_end_stream() {
                    this.release(cx);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.live = None;
                Poll::Ready(Some(Err(BodyError::Broken(e))))
            }
            None => {
                this.release(cx);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers one request per connection read and reports when Tollgate's side
    /// closes the connection.
    async fn backend() -> (Uri, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while tcp.read(&mut buf).await.unwrap_or(0) > 0 {
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        tcp.write_all(answer.as_bytes()).await.unwrap();
                    }
                    let _ = closed.send(());
                });
            }
        });
        (origin, closes)
    }

    async fn get(pool: &Arc<Pool>, origin: &Uri) {
        let mut request = Request::new(Full::new(Bytes::new()));
        let host = origin.authority().unwrap().as_str().parse().unwrap();
        request.headers_mut().insert(http::header::HOST, host);
        let response = pool.send(request, Instant::now()).await.unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout_without_further_traffic() {
        let (origin, mut closes) = backend().await;
        let pool = Pool::new(origin.clone(), Duration::from_secs(1), 4, Duration::from_millis(200)).unwrap();
        get(&pool, &origin).await;
        get(&pool, &origin).await;
        assert!(closes.try_recv().is_err(), "kept open and reused between requests");
        let closed = tokio::time::timeout(Duration::from_secs(2), closes.recv()).await;
        assert!(matches!(closed, Ok(Some(()))), "closed by the sweep");
        assert_eq!(pool.idle.lock().unwrap().len(), 0);
    }
}
