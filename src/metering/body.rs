//! The response body on its way to the client: forwarded frame by frame, read for usage as it
//! passes, cut at the backend's deadline, and metered however it ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use super::{Ending, Meter};
use crate::openai::UsageCarrier;
use crate::request::estimate_text_tokens;
use crate::upstream::sse::SseScanner;
use crate::upstream::{BodyError, UpstreamBody};

/// A JSON body is copied aside (it is forwarded at once) to read its usage at the end; beyond
/// this size the copy stops and usage is counted locally.
const MAX_JSON_COPY: usize = 8 * 1024 * 1024;

enum Reader {
    Sse(SseScanner),
    Json {
        copy: Vec<u8>,
    },
    /// Error bodies and other answers: forwarded, not read.
    Opaque,
}

/// See the module doc. The meter is dropped (and so recorded) when the body ends or is dropped.
pub struct MeteredBody {
    inner: UpstreamBody,
    reader: Reader,
    deadline: Pin<Box<Sleep>>,
    meter: Option<Meter>,
    first_byte_seen: bool,
    /// An event still to send before ending (an SSE error notice).
    trailer: Option<Bytes>,
}

impl MeteredBody {
    /// `sse`: the answer is an event stream; `hide_usage`: the client did not ask for usage.
    pub fn new(inner: UpstreamBody, meter: Meter, kind: BodyKind, deadline: Instant) -> Self {
        let reader = match kind {
            BodyKind::Sse { hide_usage } => Reader::Sse(SseScanner::new(hide_usage)),
            BodyKind::Json => Reader::Json { copy: Vec::new() },
            BodyKind::Opaque => Reader::Opaque,
        };
        Self {
            inner,
            reader,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            meter: Some(meter),
            first_byte_seen: false,
            trailer: None,
        }
    }

    fn take_bytes(&mut self, bytes: Bytes) -> Bytes {
        if !self.first_byte_seen && !bytes.is_empty() {
            self.first_byte_seen = true;
            if let Some(m) = &self.meter {
                m.first_byte();
            }
        }
        match &mut self.reader {
            Reader::Sse(scanner) => {
                let out = scanner.feed(bytes);
                if let Some(meter) = &mut self.meter {
                    if let Some(usage) = scanner.usage() {
                        meter.reported(usage);
                    }
                    meter.counted(scanner.content_events());
                }
                out
            }
            Reader::Json { copy } => {
                if copy.len() + bytes.len() <= MAX_JSON_COPY {
                    copy.extend_from_slice(&bytes);
                }
                bytes
            }
            Reader::Opaque => bytes,
        }
    }

    /// The body ended as the backend meant: read the usage and record.
    fn complete(&mut self) -> Option<Bytes> {
        let rest = match &mut self.reader {
            Reader::Sse(scanner) => Some(scanner.finish()).filter(|b| !b.is_empty()),
            Reader::Json { copy } => {
                if let Some(meter) = &mut self.meter {
                    read_json_usage(copy, meter);
                }
                None
            }
            Reader::Opaque => None,
        };
        self.finish(Ending::Complete);
        rest
    }

    /// The body ended early: for streams, tell the client in-band, since its status is long sent.
    fn fail(&mut self, ending: Ending) {
        if let Reader::Sse(_) = self.reader {
            let (message, code) = match ending {
                Ending::Deadline => ("the backend did not finish within its timeout", "upstream_timeout"),
                _ => ("the backend connection broke mid-stream", "upstream_error"),
            };
            let event = format!(
                "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"api_error\",\"param\":null,\"code\":\"{code}\"}}}}\n\n"
            );
            self.trailer = Some(Bytes::from(event));
        }
        self.finish(ending);
    }

    fn finish(&mut self, ending: Ending) {
        if let Some(mut meter) = self.meter.take() {
            meter.end(ending);
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away. A JSON answer may still be whole in
        // the copy (it was all forwarded); otherwise the meter counts locally.
        if let (Some(meter), Reader::Json { copy }) = (&mut self.meter, &self.reader) {
            read_json_usage(copy, meter);
        }
    }
}

/// What kind of answer a body carries.
#[derive(Debug, Clone, Copy)]
pub enum BodyKind {
    Sse { hide_usage: bool },
    Json,
    Opaque,
}

#[derive(Deserialize)]
struct TextProbe {
    #[serde(default)]
    choices: Vec<ChoiceProbe>,
}

#[derive(Deserialize)]
struct ChoiceProbe {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message: Option<MessageProbe>,
}

#[derive(Deserialize)]
struct MessageProbe {
    #[serde(default)]
    content: Option<String>,
}

fn read_json_usage(copy: &[u8], meter: &mut Meter) {
    if let Ok(UsageCarrier { usage: Some(usage) }) = serde_json::from_slice(copy) {
        meter.reported(usage);
    } else if let Ok(probe) = serde_json::from_slice::<TextProbe>(copy) {
        let tokens = probe
            .choices
            .iter()
            .filter_map(|c| c.text.as_deref().or(c.message.as_ref().and_then(|m| m.content.as_deref())))
            .map(estimate_text_tokens)
            .sum();
        meter.counted(tokens);
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(trailer) = this.trailer.take() {
            return Poll::Ready(Some(Ok(Frame::data(trailer))));
        }
        if this.meter.is_none() {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.fail(Ending::Deadline);
            return match this.trailer.take() {
                Some(t) => Poll::Ready(Some(Ok(Frame::data(t)))),
                None => Poll::Ready(Some(Err(BodyError::Deadline))),
            };
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(bytes) => {
                        let mut out = this.take_bytes(bytes);
                        // A body of known length may be dropped as soon as its last byte is
                        // written, without one more poll: complete it with that byte.
                        if this.inner.is_end_stream() {
                            if let Some(rest) = this.complete() {
                                out = [out, rest].concat().into();
                            }
                        }
                        // A partial SSE event is held back until complete; poll on for more.
                        if out.is_empty() && this.meter.is_some() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "backend body failed");
                    this.fail(Ending::BackendBroke);
                    return match this.trailer.take() {
                        Some(t) => Poll::Ready(Some(Ok(Frame::data(t)))),
                        None => Poll::Ready(Some(Err(e))),
                    };
                }
                None => {
                    let rest = this.complete();
                    return Poll::Ready(rest.map(|b| Ok(Frame::data(b))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.meter.is_none() && self.trailer.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader {
            // Usage filtering may change the length of a stream; JSON passes through as is.
            Reader::Json { .. } | Reader::Opaque => self.inner.size_hint(),
            Reader::Sse(_) => SizeHint::default(),
        }
    }
}
