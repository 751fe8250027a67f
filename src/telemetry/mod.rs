//! Following one request: its id (echoed, sent upstream, recorded), its access log line and
//! its trace.

pub mod access_log;
pub mod request_id;
pub mod trace;

use std::sync::Arc;

use http::{HeaderMap, HeaderName};

pub use access_log::{AccessLog, Entry};
pub use request_id::{RequestId, HEADER_REQUEST_ID};
pub use trace::{ClientSpan, ServerSpan, TraceContext, Tracing};

/// What reports one request when it ends: its access log line and its server span, either
/// or both (`None` of them: the request builds no summary at all).
#[derive(Debug, Default)]
pub struct Trail {
    pub log: Option<Arc<AccessLog>>,
    pub span: Option<ServerSpan>,
}

impl Trail {
    pub fn is_on(&self) -> bool {
        self.log.is_some() || self.span.is_some()
    }

    /// Ends the request's span and writes its line.
    pub fn finish(self, entry: Entry) {
        match (self.span, self.log) {
            (Some(span), Some(log)) => {
                span.finish(entry.clone());
                log.log(entry);
            }
            (Some(span), None) => span.finish(entry),
            (None, Some(log)) => log.log(entry),
            (None, None) => {}
        }
    }
}

/// The headers that follow a request upstream: its id, and its attempt's trace context.
#[derive(Debug, Clone, Copy)]
pub struct Propagation<'a> {
    pub request_id: &'a RequestId,
    pub span: Option<&'a ClientSpan>,
}

impl Propagation<'_> {
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(HEADER_REQUEST_ID, self.request_id.header_value());
        if let Some(span) = self.span {
            headers.insert(HeaderName::from_static("traceparent"), span.traceparent().clone());
            if let Some(state) = span.tracestate() {
                headers.insert(HeaderName::from_static("tracestate"), state.clone());
            }
        }
    }
}
