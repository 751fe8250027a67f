//! The body of every response the gateway sends: a proxied answer read whole, a metered
//! stream, or one of axum's (errors, the admin API, health, metrics). An enum rather than
//! axum's boxed body: a proxied answer, nearly all of the traffic, then costs no allocation
//! for its body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::metering::MeteredBody;

pub type Response = http::Response<ResponseBody>;

pub enum ResponseBody {
    Whole(Full<Bytes>),
    /// Boxed: a stream's state is ~0.5 KiB, and every response moves through hyper by value.
    Metered(Box<MeteredBody>),
    /// An answer in another API than chat's (`http::client_api`).
    Translated(Box<crate::apis::body::Translated<ResponseBody>>),
    Axum(axum::body::Body),
}

impl ResponseBody {
    pub fn whole(bytes: Bytes) -> Self {
        Self::Whole(Full::new(bytes))
    }
}

/// One of axum's responses, as the gateway sends it.
pub fn from_axum(response: axum::response::Response) -> Response {
    response.map(ResponseBody::Axum)
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Whole(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
            Self::Metered(body) => Pin::new(body.as_mut()).poll_frame(cx).map_err(Into::into),
            Self::Translated(body) => Pin::new(body.as_mut()).poll_frame(cx),
            Self::Axum(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(body) => body.is_end_stream(),
            Self::Metered(body) => body.is_end_stream(),
            Self::Translated(body) => body.is_end_stream(),
            Self::Axum(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(body) => body.size_hint(),
            Self::Metered(body) => body.size_hint(),
            Self::Translated(body) => body.size_hint(),
            Self::Axum(body) => body.size_hint(),
        }
    }
}
