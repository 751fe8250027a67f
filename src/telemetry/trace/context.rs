//! W3C Trace Context: the `traceparent` a client sends is read, the one each upstream attempt
//! gets is written, and new trace and span ids are drawn. Parent-based sampling: a client's
//! sampled flag decides; a new trace is sampled when its id falls under `sample_ratio`, as
//! OpenTelemetry's `TraceIdRatioBased` does, so that every hop of a trace decides alike.

use std::cell::Cell;

use http::{HeaderMap, HeaderValue};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

const SAMPLED: u8 = 0x01;
/// The longest `tracestate` forwarded (the W3C limit for 32 entries is 512 characters).
const MAX_TRACESTATE_BYTES: usize = 512;

/// What a client's headers say about the trace the request belongs to.
#[derive(Debug, Clone)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
    pub tracestate: Option<HeaderValue>,
    /// The client's `traceparent` as it came, forwarded when this hop records nothing.
    pub header: HeaderValue,
}

impl Parent {
    /// A valid `traceparent` (version `00`, or a later one read as `00` by its first four
    /// fields, as the spec asks), else `None`: a malformed one starts a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let header = headers.get("traceparent")?;
        let bytes = header.as_bytes();
        let exact = bytes.len() == 55;
        if bytes.len() < 55 || (!exact && bytes.get(55) != Some(&b'-')) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let version = hex_array::<1>(&bytes[0..2])?[0];
        // ff is forbidden; version 00 has exactly four fields.
        if version == 0xff || (version == 0 && !exact) {
            return None;
        }
        let trace_id = hex_array::<16>(&bytes[3..35])?;
        let span_id = hex_array::<8>(&bytes[36..52])?;
        let flags = hex_array::<1>(&bytes[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let tracestate = headers
            .get("tracestate")
            .filter(|v| {
                !v.is_empty() && v.len() <= MAX_TRACESTATE_BYTES && headers.get_all("tracestate").iter().count() == 1
            })
            .cloned();
        Some(Self { trace_id, span_id, flags, tracestate, header: header.clone() })
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// Lowercase hex digits only, as the spec requires.
fn hex_array<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    let mut text = [b'-'; 55];
    text[..2].copy_from_slice(b"00");
    write_hex(&mut text[3..35], trace_id);
    write_hex(&mut text[36..52], span_id);
    text[53..].copy_from_slice(if sampled { b"01" } else { b"00" });
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("00-0-0-00"))
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

/// Decides whether a new trace (no parent) is sampled: the low 63 bits of its id against
/// `sample_ratio` of the range, OpenTelemetry's `TraceIdRatioBased`.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    below: u64,
    always: bool,
}

impl Sampler {
    pub fn new(ratio: f64) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        // The cast saturates; 1.0 samples everything whatever the id.
        Self { below: (ratio * (1u64 << 63) as f64) as u64, always: ratio >= 1.0 }
    }

    pub fn samples(&self, trace_id: &TraceId) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.always || (u64::from_be_bytes(low) >> 1) < self.below
    }
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// Per thread: the OS's randomness, mixed with the thread so two threads never share a stream.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    let random = match getrandom::getrandom(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => crate::clock::unix_now_ms().unsigned_abs(),
    };
    let here = &bytes as *const _ as u64;
    super::super::request_id::mix(random ^ here.rotate_left(32))
}

/// 64 random bits (SplitMix64 on a per-thread state): ids need to be unique, not secret.
fn next() -> u64 {
    STATE.with(|state| {
        let n = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(n);
        super::super::request_id::mix(n)
    })
}

pub fn new_trace_id() -> TraceId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next().to_be_bytes());
    id[8..].copy_from_slice(&next().to_be_bytes());
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

pub fn new_span_id() -> SpanId {
    let id = next().max(1);
    id.to_be_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_with_its_tracestate() {
        let parent = Parent::from_headers(&headers(&[("traceparent", GOOD), ("tracestate", "vendor=abc")])).unwrap();
        assert_eq!(parent.trace_id, hex_array::<16>(b"4bf92f3577b34da6a3ce929d0e0e4736").unwrap());
        assert_eq!(parent.span_id, hex_array::<8>(b"00f067aa0ba902b7").unwrap());
        assert!(parent.sampled());
        assert_eq!(parent.tracestate.unwrap(), "vendor=abc");
        assert_eq!(parent.header, GOOD);
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!Parent::from_headers(&headers(&[("traceparent", &unsampled)])).unwrap().sampled());
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(Parent::from_headers(&headers(&[("traceparent", bad)])).is_none(), "{bad}");
        }
        // A later version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(Parent::from_headers(&headers(&[("traceparent", future)])).is_some());
        // Two tracestate headers are not merged; the state is dropped, the trace kept.
        let two = headers(&[("traceparent", GOOD), ("tracestate", "a=1"), ("tracestate", "b=2")]);
        assert!(Parent::from_headers(&two).unwrap().tracestate.is_none());
    }

    #[test]
    fn written_traceparents_read_back() {
        let (trace, span) = (new_trace_id(), new_span_id());
        for sampled in [true, false] {
            let value = traceparent(&trace, &span, sampled);
            let parent = Parent::from_headers(&headers(&[("traceparent", value.to_str().unwrap())])).unwrap();
            assert_eq!((parent.trace_id, parent.span_id, parent.sampled()), (trace, span, sampled));
        }
    }

    #[test]
    fn the_ratio_samples_about_its_share_of_new_traces() {
        let never = Sampler::new(0.0);
        let always = Sampler::new(1.0);
        let quarter = Sampler::new(0.25);
        let ids: Vec<TraceId> = (0..20_000).map(|_| new_trace_id()).collect();
        assert!(ids.iter().all(|id| always.samples(id) && !never.samples(id)));
        let share = ids.iter().filter(|id| quarter.samples(id)).count() as f64 / ids.len() as f64;
        assert!((0.23..0.27).contains(&share), "{share}");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
