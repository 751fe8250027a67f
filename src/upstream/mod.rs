//! The client side: one [`Upstream`] per configured backend, over our own keep-alive connections
//! (`pool`) or an in-process simulation.

mod anthropic;
mod forward;
pub mod health;
pub(crate) mod pool;
mod simulate;
pub mod sse;
pub mod state;

pub use forward::upstream_body;
pub use state::{BackendState, Slot};

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::apis::Dialect;
use crate::config::{Api, Backend, Simulate, Target};
use crate::request::ProxyRequest;

/// A response body from a backend: read from a pooled connection, or made here (a simulated
/// backend's, or an answer already read whole and handed back). An enum rather than a boxed
/// body: one allocation fewer per request.
pub enum UpstreamBody {
    Connection(pool::ConnBody),
    /// An Anthropic backend's answer, as a chat completion.
    Translated(Box<crate::apis::body::Translated<pool::ConnBody>>),
    Whole(Full<Bytes>),
    Simulated(simulate::ChannelBody),
}

impl UpstreamBody {
    pub fn whole(bytes: Bytes) -> Self {
        Self::Whole(Full::new(bytes))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Connection(body) => Pin::new(body).poll_frame(cx),
            Self::Translated(body) => Pin::new(body.as_mut()).poll_frame(cx),
            Self::Whole(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
            Self::Simulated(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Connection(body) => body.is_end_stream(),
            Self::Translated(body) => body.is_end_stream(),
            Self::Whole(body) => body.is_end_stream(),
            Self::Simulated(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Connection(body) => body.size_hint(),
            Self::Translated(body) => body.size_hint(),
            Self::Whole(body) => body.size_hint(),
            Self::Simulated(body) => body.size_hint(),
        }
    }
}

/// A body failed mid-way: the backend's connection broke, or its deadline passed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("backend connection failed mid-body")]
    Broken(#[source] hyper::Error),
    #[error("backend took longer than its timeout")]
    Deadline,
}

/// Why a backend gave no answer. The messages reach clients: they name the backend and never
/// its URL's secrets or keys.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("backend `{backend}` could not be reached")]
    Connect { backend: String },
    #[error("backend `{backend}` did not answer within {after:?}")]
    Timeout { backend: String, after: Duration },
    #[error("backend `{backend}` broke off its answer")]
    Broken { backend: String },
    #[error("the prompt does not fit backend `{backend}`'s context window")]
    ContextOverflow { backend: String },
    #[error("backend `{backend}` failed with HTTP {status}")]
    Status { backend: String, status: u16 },
    #[error("backend `{backend}` cannot be used: {reason}")]
    Unusable { backend: String, reason: String },
    /// The request cannot be put in the API the backend speaks: not the backend's fault.
    #[error("backend `{backend}` speaks another API, which cannot express this request: {reason}")]
    Untranslatable { backend: String, reason: crate::apis::Untranslatable },
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// Bounded label for `tollgate_upstream_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Status { .. } => "status",
            Self::Broken { .. } => "broken",
            Self::ContextOverflow { .. } => "context",
            Self::Unusable { .. } => "unusable",
            Self::Untranslatable { .. } => "untranslatable",
        }
    }
}

/// A configured backend, ready to send to.
pub struct Upstream {
    pub backend: Arc<Backend>,
    /// The backend's name and tier as response header values, made once (`None`: a name a
    /// header cannot carry).
    pub name_header: Option<HeaderValue>,
    pub tier_header: Option<HeaderValue>,
    /// Survives reloads: capacity, health and the occupancy clock.
    pub state: Arc<BackendState>,
    transport: Transport,
}

enum Transport {
    Http { pool: Arc<pool::Pool>, destination: Box<forward::Destination> },
    Simulated(Simulate),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("backend", &self.backend.name).finish_non_exhaustive()
    }
}

/// Idle pooled connections are kept this long: long enough to reuse between bursts, short
/// enough not to hit upstream servers' own keep-alive limits.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Upstream {
    /// Builds the client for `backend`; done once per config load, never per request.
    pub fn new(backend: Arc<Backend>, state: Arc<BackendState>) -> Result<Self, UpstreamError> {
        let transport = match &backend.target {
            Target::Simulated(sim) => Transport::Simulated(sim.clone()),
            Target::Http { base_url, api_key } => {
                let unusable = |reason: String| UpstreamError::Unusable { backend: backend.name.clone(), reason };
                let (destination, origin) =
                    forward::Destination::new(base_url, backend.api, api_key.as_ref()).map_err(unusable)?;
                let max_idle = backend.max_concurrency as usize;
                let pool = pool::Pool::new(origin, backend.connect_timeout, max_idle, POOL_IDLE_TIMEOUT)
                    .map_err(|e| unusable(format!("TLS setup failed: {e}")))?;
                Transport::Http { pool, destination: Box::new(destination) }
            }
        };
        let name_header = HeaderValue::from_str(&backend.name).ok();
        let tier_header = HeaderValue::from_str(&backend.tier).ok();
        Ok(Self { backend, name_header, tier_header, state, transport })
    }

    /// Sends `request` (model rewritten, usage asked for) and waits for the response head.
    /// Failing before the head is what allows a fallback to another backend.
    /// `with_logprobs`: ask for log-probabilities (a cascade's first call); `now`: the caller's
    /// latest clock reading; `spare_headers`: a header map to empty and reuse.
    pub async fn send(
        &self,
        request: &ProxyRequest,
        with_logprobs: bool,
        now: tokio::time::Instant,
        spare_headers: Option<http::HeaderMap>,
        propagation: crate::telemetry::Propagation<'_>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // A backend serving the client's API itself gets the client's request as it came.
        let native = request.native.as_deref().filter(|n| self.backend.native.serves(n.dialect));
        if let Some(reason) =
            request.native.as_ref().and_then(|n| n.untranslatable.clone()).filter(|_| native.is_none())
        {
            return Err(UpstreamError::Untranslatable { backend: self.backend.name.clone(), reason });
        }
        match &self.transport {
            Transport::Simulated(sim) => {
                Ok(Box::pin(simulate::respond(sim, &self.backend, request, with_logprobs)).await)
            }
            Transport::Http { pool, destination } => {
                let (body, dialect) = match native {
                    Some(native) => {
                        let clamped = request.clamped_field().and(request.max_tokens);
                        (Bytes::from(native.body(&self.backend.model, clamped)), native.dialect)
                    }
                    None => {
                        let mut body = forward::upstream_body(request, &self.backend.model, with_logprobs);
                        if self.backend.api == Api::Anthropic {
                            body = anthropic::request_body(&self.backend.name, request.endpoint, &body)?;
                        }
                        (body, Dialect::Chat)
                    }
                };
                let mut http_request = destination.request(request.endpoint, dialect, body, spare_headers);
                propagation.apply(http_request.headers_mut());
                let timeout = self.backend.first_byte_timeout;
                let response = match tokio::time::timeout_at(now + timeout, pool.send(http_request, now)).await {
                    Err(_) => {
                        return Err(UpstreamError::Timeout { backend: self.backend.name.clone(), after: timeout })
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(backend = %self.backend.name, error = %e, "backend request failed");
                        return Err(UpstreamError::Connect { backend: self.backend.name.clone() });
                    }
                    Ok(Ok(response)) => response,
                };
                let mut response = match (self.backend.api, dialect) {
                    (Api::Anthropic, Dialect::Chat) => anthropic::answer(response),
                    _ => response.map(UpstreamBody::Connection),
                };
                // Tells metering how to read the answer, and the client side not to translate it.
                if dialect != Dialect::Chat {
                    response.extensions_mut().insert(dialect);
                }
                Ok(response)
            }
        }
    }
}
