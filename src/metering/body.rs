//! A streamed (SSE) answer on its way to the client: forwarded event by event, read for usage
//! as it passes, cut when the backend stays silent longer than its timeout, and metered
//! however it ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

use super::{Ending, Meter};
use crate::apis::Dialect;
use crate::cache::StreamCapture;
use crate::openai::UsageCarrier;
use crate::request::estimate_text_tokens;
use crate::upstream::sse::SseScanner;
use crate::upstream::{BodyError, UpstreamBody};

/// See the module doc. The meter settles when the stream ends, fails or is dropped.
pub struct MeteredBody {
    inner: UpstreamBody,
    /// The stream's API: what its events and an error notice look like.
    dialect: Dialect,
    scanner: SseScanner,
    /// Fires after `silence` without a byte from the backend. Moved forward only when it fires
    /// (to `last_byte + silence`), not on every chunk: re-arming a timer per chunk costs more
    /// than relaying the chunk.
    deadline: Pin<Box<Sleep>>,
    silence: Duration,
    last_byte: Instant,
    meter: Option<Meter>,
    first_byte_seen: bool,
    /// An event still to send before ending (an error notice for a stream cut short).
    trailer: Option<Bytes>,
    /// A cacheable answer's events, stored if the stream ends cleanly.
    capture: Option<Box<StreamCapture>>,
}

impl MeteredBody {
    /// `hide_usage`: the client did not ask for the usage chunk; `silence`: the longest the
    /// backend may send nothing.
    pub fn new(inner: UpstreamBody, meter: Meter, hide_usage: bool, silence: Duration) -> Self {
        Self {
            inner,
            dialect: Dialect::Chat,
            scanner: SseScanner::new(hide_usage),
            deadline: Box::pin(tokio::time::sleep(silence)),
            silence,
            last_byte: Instant::now(),
            meter: Some(meter),
            first_byte_seen: false,
            trailer: None,
            capture: None,
        }
    }

    /// A stream in a client API's own shape, from a backend serving that API itself.
    pub fn native(mut self, dialect: Dialect) -> Self {
        if dialect != Dialect::Chat {
            self.dialect = dialect;
            self.scanner = SseScanner::native(dialect);
        }
        self
    }

    /// Stores the answer in the response cache if it ends cleanly.
    pub fn capture(mut self, capture: Option<Box<StreamCapture>>) -> Self {
        self.capture = capture;
        self
    }

    fn take_bytes(&mut self, bytes: Bytes) -> Bytes {
        let out = self.scanner.feed(bytes);
        if let Some(capture) = &mut self.capture {
            capture.feed(&out);
        }
        if let Some(meter) = &mut self.meter {
            if !self.first_byte_seen && !out.is_empty() {
                self.first_byte_seen = true;
                meter.first_byte();
            }
            if let Some(usage) = self.scanner.usage() {
                meter.reported(usage);
            }
            meter.counted(self.scanner.content_events());
        }
        out
    }

    /// The stream ended before its end: tell the client in-band (its status is long sent), and
    /// never with a clean `[DONE]`.
    fn cut(&mut self, ending: Ending) -> Option<Bytes> {
        let (message, code) = match ending {
            Ending::Deadline => ("the backend went silent for longer than its timeout", "upstream_timeout"),
            _ => ("the backend connection broke mid-stream", "upstream_error"),
        };
        self.finish(ending);
        Some(Bytes::from(match self.dialect {
            Dialect::Chat => format!(
                "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"api_error\",\"param\":null,\"code\":\"{code}\"}}}}\n\n"
            ),
            Dialect::Messages => format!(
                "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"api_error\",\"message\":\"{message}\"}}}}\n\n"
            ),
            Dialect::Responses => format!(
                "event: error\ndata: {{\"type\":\"error\",\"code\":\"{code}\",\"message\":\"{message}\",\"param\":null}}\n\n"
            ),
        }))
    }

    fn finish(&mut self, ending: Ending) {
        if let Some(mut meter) = self.meter.take() {
            let complete = matches!(ending, Ending::Complete);
            meter.end(ending);
            let usage = meter.reported_usage();
            let cost = meter.settle();
            if let Some(capture) = self.capture.take().filter(|_| complete) {
                capture.store(usage, cost);
            }
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before the backend closed the stream. After `[DONE]` the answer is whole:
        // a client may hang up at once (the OpenAI SDKs do) while a backend such as llama.cpp
        // has not closed its side yet. Before it, the client went away.
        let ending = if self.scanner.saw_done() { Ending::Complete } else { Ending::ClientGone };
        self.finish(ending);
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
        while this.deadline.as_mut().poll(cx).is_ready() {
            let silent_until = this.last_byte + this.silence;
            if silent_until <= Instant::now() {
                return Poll::Ready(this.cut(Ending::Deadline).map(|b| Ok(Frame::data(b))));
            }
            this.deadline.as_mut().reset(silent_until);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(bytes) => {
                        this.last_byte = Instant::now();
                        let out = this.take_bytes(bytes);
                        // A partial event is held back until complete; poll on for more.
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "backend stream failed");
                    return Poll::Ready(this.cut(Ending::BackendBroke).map(|b| Ok(Frame::data(b))));
                }
                None => {
                    let rest = this.scanner.finish();
                    if let Some(capture) = &mut this.capture {
                        capture.feed(&rest);
                    }
                    if let (Some(meter), Some(usage)) = (&mut this.meter, this.scanner.usage()) {
                        meter.reported(usage);
                    }
                    // A stream that ends without `[DONE]` was cut by the backend.
                    if !this.scanner.saw_done() {
                        this.trailer = this.cut(Ending::BackendBroke);
                    } else {
                        this.finish(Ending::Complete);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.meter.is_none() && self.trailer.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Usage filtering may change the length of a stream.
        SizeHint::default()
    }
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

/// Reads the usage of a whole JSON answer into `meter` (or counts its text when it reports
/// none); `false` when the body is not JSON at all.
pub fn meter_json(dialect: Dialect, bytes: &[u8], meter: &mut Meter) -> bool {
    if dialect != Dialect::Chat {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(bytes) else { return false };
        match crate::apis::usage::of_answer(dialect, &answer) {
            Some(usage) => meter.reported(usage),
            None => meter.counted(estimate_text_tokens(&answer.to_string())),
        }
        return true;
    }
    if let Ok(UsageCarrier { usage: Some(usage) }) = serde_json::from_slice(bytes) {
        meter.reported(usage);
        true
    } else if let Ok(probe) = serde_json::from_slice::<TextProbe>(bytes) {
        let tokens = probe
            .choices
            .iter()
            .filter_map(|c| c.text.as_deref().or(c.message.as_ref().and_then(|m| m.content.as_deref())))
            .map(estimate_text_tokens)
            .sum();
        meter.counted(tokens);
        true
    } else {
        false
    }
}
