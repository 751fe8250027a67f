//! Usage read from answers in the Responses and Messages APIs' own shapes (a backend serving
//! them natively), in the gateway's convention: OpenAI's, where prompt tokens include those
//! read from and written to the upstream's cache.

use serde_json::Value;

use super::Dialect;
use crate::openai::{PromptTokensDetails, Usage};

/// The usage of a whole answer in `dialect` (`None`: it reports none).
pub fn of_answer(dialect: Dialect, answer: &Value) -> Option<Usage> {
    let usage = answer.get("usage").filter(|u| u.is_object())?;
    let mut counts = Counts::default();
    counts.take(dialect, usage);
    counts.usage()
}

/// What an event of a native stream meant, for metering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Generated output (one token, about).
    Content,
    /// The stream's own end: it ended as the backend meant it to.
    End,
    Other,
}

/// Reads usage out of a native stream event by event.
#[derive(Debug, Default)]
pub struct StreamUsage {
    counts: Counts,
}

impl StreamUsage {
    /// One event's `data:` payload.
    pub fn event(&mut self, dialect: Dialect, payload: &[u8]) -> Seen {
        let Ok(event) = serde_json::from_slice::<Value>(payload) else { return Seen::Other };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
        match (dialect, kind) {
            (Dialect::Messages, "message_start") => {
                if let Some(usage) = event.pointer("/message/usage") {
                    self.counts.take(dialect, usage);
                }
                Seen::Other
            }
            // Cumulative counts: they replace the ones before.
            (Dialect::Messages, "message_delta") => {
                if let Some(usage) = event.get("usage") {
                    self.counts.take(dialect, usage);
                }
                Seen::Other
            }
            (Dialect::Messages, "content_block_delta") => Seen::Content,
            (Dialect::Messages, "message_stop" | "error") => Seen::End,
            (Dialect::Responses, "response.completed" | "response.incomplete" | "response.failed") => {
                if let Some(usage) = event.pointer("/response/usage").filter(|u| u.is_object()) {
                    self.counts.take(dialect, usage);
                }
                Seen::End
            }
            (Dialect::Responses, "error") => Seen::End,
            (Dialect::Responses, kind) if kind.ends_with(".delta") => Seen::Content,
            _ => Seen::Other,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.counts.usage()
    }
}

/// Token counts as the APIs report them, each seen or not.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Responses: all prompt tokens; Messages: those neither read from nor written to the cache.
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
    output: Option<u64>,
    /// Anthropic's convention: `input` leaves the cache's tokens out.
    input_excludes_cache: bool,
}

impl Counts {
    fn take(&mut self, dialect: Dialect, usage: &Value) {
        let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64);
        let names: [(&mut Option<u64>, &str); 4] = match dialect {
            Dialect::Messages => [
                (&mut self.input, "/input_tokens"),
                (&mut self.cache_read, "/cache_read_input_tokens"),
                (&mut self.cache_write, "/cache_creation_input_tokens"),
                (&mut self.output, "/output_tokens"),
            ],
            _ => [
                (&mut self.input, "/input_tokens"),
                (&mut self.cache_read, "/input_tokens_details/cached_tokens"),
                (&mut self.cache_write, "/input_tokens_details/cache_write_tokens"),
                (&mut self.output, "/output_tokens"),
            ],
        };
        for (slot, pointer) in names {
            if let Some(value) = count(pointer) {
                *slot = Some(value);
            }
        }
        self.input_excludes_cache = dialect == Dialect::Messages;
    }

    fn usage(&self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let (input, read, write) =
            (self.input.unwrap_or(0), self.cache_read.unwrap_or(0), self.cache_write.unwrap_or(0));
        let prompt_tokens =
            if self.input_excludes_cache { input.saturating_add(read).saturating_add(write) } else { input };
        Some(Usage {
            prompt_tokens,
            completion_tokens: self.output.unwrap_or(0),
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: read, cache_write_tokens: write }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn details(usage: &Usage) -> (u64, u64, u64, u64) {
        (usage.prompt_tokens, usage.cached_tokens(), usage.cache_write_tokens(), usage.completion_tokens)
    }

    #[test]
    fn messages_input_excludes_the_cache_and_responses_input_includes_it() {
        let message = json!({"usage": {"input_tokens": 20, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 50, "output_tokens": 7}});
        let usage = of_answer(Dialect::Messages, &message).unwrap();
        assert_eq!(details(&usage), (170, 100, 50, 7));
        let response = json!({"usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
            "output_tokens": 7, "total_tokens": 37}});
        let usage = of_answer(Dialect::Responses, &response).unwrap();
        assert_eq!(details(&usage), (30, 10, 0, 7));
        assert_eq!(of_answer(Dialect::Responses, &json!({"usage": null})), None);
    }

    #[test]
    fn a_messages_stream_adds_message_starts_input_to_message_deltas_output() {
        let mut stream = StreamUsage::default();
        let events = [
            (
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 20,
                "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50, "output_tokens": 1}}}),
                Seen::Other,
            ),
            (json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}), Seen::Content),
            (json!({"type": "message_delta", "usage": {"output_tokens": 5}}), Seen::Other),
            (json!({"type": "message_delta", "usage": {"output_tokens": 7}}), Seen::Other),
            (json!({"type": "message_stop"}), Seen::End),
        ];
        for (event, seen) in events {
            assert_eq!(stream.event(Dialect::Messages, event.to_string().as_bytes()), seen, "{event}");
        }
        // Output counts are cumulative: the last, not their sum.
        assert_eq!(details(&stream.usage().unwrap()), (170, 100, 50, 7));
    }

    #[test]
    fn a_responses_stream_reports_usage_at_its_completion_only() {
        let mut stream = StreamUsage::default();
        let delta = json!({"type": "response.output_text.delta", "delta": "Hi", "sequence_number": 3});
        assert_eq!(stream.event(Dialect::Responses, delta.to_string().as_bytes()), Seen::Content);
        assert_eq!(stream.usage(), None);
        let done = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 12,
            "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 9}}});
        assert_eq!(stream.event(Dialect::Responses, done.to_string().as_bytes()), Seen::End);
        assert_eq!(details(&stream.usage().unwrap()), (12, 4, 0, 9));
        assert_eq!(StreamUsage::default().event(Dialect::Responses, b"not json"), Seen::Other);
    }
}
