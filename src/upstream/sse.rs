//! Server-sent events from a backend: forwarded event by event while the usage is read out of
//! the stream as it passes.
//!
//! Two usage shapes exist: a separate chunk with `"choices": []` before `[DONE]` (OpenAI,
//! llama.cpp) and usage on the last content chunk (TensorZero and others). Both are read. The
//! gateway always asks for usage; a client that did not ask gets the stream without it.

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::apis::usage::{Seen, StreamUsage};
use crate::apis::{event_end, Dialect};
use crate::openai::Usage;

/// Reads usage out of an SSE stream and filters what the client should not see.
#[derive(Debug)]
pub struct SseScanner {
    /// The stream's API: chat's chunks, or a client API passed through to a backend serving it.
    dialect: Dialect,
    native: StreamUsage,
    /// Bytes of an event not yet complete (split across network reads).
    pending: BytesMut,
    hide_usage: bool,
    usage: Option<Usage>,
    content_events: u64,
    saw_done: bool,
}

#[derive(Deserialize)]
struct ChunkProbe {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

enum Verdict {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

impl SseScanner {
    pub fn new(hide_usage: bool) -> Self {
        Self {
            dialect: Dialect::Chat,
            native: StreamUsage::default(),
            pending: BytesMut::new(),
            hide_usage,
            usage: None,
            content_events: 0,
            saw_done: false,
        }
    }

    /// A stream in a client API's own shape (`response.completed`, `message_stop`...): read,
    /// never filtered.
    pub fn native(dialect: Dialect) -> Self {
        Self { dialect, ..Self::new(false) }
    }

    /// The usage the backend reported, once its chunk has passed.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Events that carried generated output: the local completion count when usage is missing
    /// (backends stream about one token per event).
    pub fn content_events(&self) -> u64 {
        self.content_events
    }

    /// Whether `data: [DONE]` (or a native stream's own end) arrived: the stream ended as the
    /// backend meant it to.
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Takes the next piece of the stream; returns the complete events to forward now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        let complete = if self.pending.is_empty() && last_event_end(&chunk) == Some(chunk.len()) {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            match last_event_end(&self.pending) {
                Some(end) => self.pending.split_to(end).freeze(),
                None => return Bytes::new(),
            }
        };
        self.filter(complete)
    }

    /// The end of the stream: whatever is left (an event without its blank line) goes out as is.
    pub fn finish(&mut self) -> Bytes {
        if self.pending.is_empty() {
            return Bytes::new();
        }
        let rest = self.pending.split().freeze();
        self.filter(rest)
    }

    fn filter(&mut self, events: Bytes) -> Bytes {
        let mut rewritten: Option<BytesMut> = None;
        let mut start = 0;
        while start < events.len() {
            let end = event_end(&events[start..]).map_or(events.len(), |e| start + e);
            let event = &events[start..end];
            match self.inspect(event) {
                Verdict::Keep => {
                    if let Some(out) = &mut rewritten {
                        out.extend_from_slice(event);
                    }
                }
                Verdict::Drop => {
                    rewritten.get_or_insert_with(|| BytesMut::from(&events[..start]));
                }
                Verdict::Replace(bytes) => {
                    rewritten.get_or_insert_with(|| BytesMut::from(&events[..start])).extend_from_slice(&bytes);
                }
            }
            start = end;
        }
        rewritten.map_or(events, BytesMut::freeze)
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let Some(payload) = data_of(event) else {
            return Verdict::Keep;
        };
        let payload = payload.trim_ascii();
        if self.dialect != Dialect::Chat {
            match self.native.event(self.dialect, payload) {
                Seen::Content => self.content_events += 1,
                Seen::End => self.saw_done = true,
                Seen::Other => {}
            }
            self.usage = self.native.usage();
            return Verdict::Keep;
        }
        if payload == b"[DONE]" {
            self.saw_done = true;
            return Verdict::Keep;
        }
        if payload.is_empty() {
            return Verdict::Keep;
        }
        if !carries_usage(payload) {
            self.content_events += 1;
            return Verdict::Keep;
        }
        let Ok(probe) = serde_json::from_slice::<ChunkProbe>(payload) else {
            self.content_events += 1;
            return Verdict::Keep;
        };
        let has_choices = probe.choices.as_ref().is_some_and(|c| !c.is_empty());
        if has_choices {
            self.content_events += 1;
        }
        let Some(usage) = probe.usage else {
            return Verdict::Keep;
        };
        self.usage = Some(usage);
        if !self.hide_usage {
            Verdict::Keep
        } else if has_choices {
            without_usage(payload).map_or(Verdict::Keep, Verdict::Replace)
        } else {
            Verdict::Drop
        }
    }
}

/// The event re-encoded without its `usage` member (usage on a content chunk, hidden).
fn without_usage(payload: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(payload).ok()?;
    value.as_object_mut()?.remove("usage");
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, &value).ok()?;
    out.extend_from_slice(b"\n\n");
    Some(out)
}

/// The `data:` payload of one event (several `data:` lines joined with `\n`, as SSE says).
fn data_of(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut lines = event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d));
    let first = lines.next()?;
    match lines.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = [first, b"\n", second].concat();
            for more in lines {
                joined.push(b'\n');
                joined.extend_from_slice(more);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// Length up to and including the blank line that ends the last complete event.
fn last_event_end(bytes: &[u8]) -> Option<usize> {
    let mut end = None;
    let mut start = 0;
    while let Some(e) = event_end(&bytes[start..]) {
        start += e;
        end = Some(start);
    }
    end
}

/// Whether a chunk has a non-null `usage` member. Backends asked for usage send
/// `"usage":null` on every content chunk; only the real one is worth parsing.
fn carries_usage(payload: &[u8]) -> bool {
    static USAGE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE_KEY.find_iter(payload).any(|at| {
        let rest = payload[at + 7..].trim_ascii_start();
        let value = rest.strip_prefix(b":").map_or(rest, <[u8]>::trim_ascii_start);
        !value.starts_with(b"null")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(scanner: &mut SseScanner, pieces: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(p)));
        }
        out.extend_from_slice(&scanner.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn reads_usage_and_hides_the_usage_chunk_when_not_asked() {
        let stream = format!("{CONTENT}{CONTENT}{USAGE}{DONE}");
        let mut s = SseScanner::new(true);
        let out = run(&mut s, &[stream.as_bytes()]);
        assert_eq!(out, format!("{CONTENT}{CONTENT}{DONE}"));
        assert_eq!(s.usage(), Some(Usage::new(9, 2)));
        assert_eq!(s.content_events(), 2);
        assert!(s.saw_done());
    }

    #[test]
    fn only_a_non_null_usage_counts_as_usage() {
        assert!(!carries_usage(br#"{"choices":[],"usage" : null}"#));
        assert!(carries_usage(br#"{"usage":{"prompt_tokens":1}}"#));
        assert!(!carries_usage(br#"{"choices":[{"delta":{"content":"no usage here"}}]}"#));
    }

    #[test]
    fn keeps_the_usage_chunk_when_asked() {
        let stream = format!("{CONTENT}{USAGE}{DONE}");
        let mut s = SseScanner::new(false);
        assert_eq!(run(&mut s, &[stream.as_bytes()]), stream);
        assert_eq!(s.usage(), Some(Usage::new(9, 2)));
    }

    #[test]
    fn events_split_across_reads_at_every_byte_are_reassembled() {
        let stream = format!("{CONTENT}{USAGE}{DONE}");
        let bytes = stream.as_bytes();
        for cut in 1..bytes.len() {
            let mut s = SseScanner::new(true);
            let out = run(&mut s, &[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(out, format!("{CONTENT}{DONE}"), "cut at {cut}");
            assert_eq!(s.usage(), Some(Usage::new(9, 2)), "cut at {cut}");
        }
    }

    #[test]
    fn usage_on_the_last_content_chunk_is_read_and_stripped_when_hidden() {
        let last = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\r\n\r\n";
        let mut s = SseScanner::new(true);
        let out = run(&mut s, &[last.as_bytes(), DONE.as_bytes()]);
        assert!(!out.contains("usage"), "{out}");
        assert!(out.contains("finish_reason"));
        assert_eq!(s.usage(), Some(Usage::new(3, 1)));
    }
}
