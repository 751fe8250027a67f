//! Request ids: the client's `x-request-id` when it is a sane one, else one made here. The id is
//! echoed in the answer, sent upstream, written in the access log and kept in the ledger's
//! request record, so one request can be followed from the client to the backend and back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const HEADER_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client id taken as it is; a longer one is replaced. Long enough for a UUID, a
/// W3C trace id or a prefixed ULID, short enough to bound what a client makes us log and store.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// One request's id, kept as the header value it travels as: the answer's and the backend
/// request's headers share its bytes instead of formatting or copying them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's `x-request-id` if it is sane (1 to [`MAX_CLIENT_ID_BYTES`] visible ASCII
    /// characters, no spaces or quotes), else a new id.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers.get(HEADER_REQUEST_ID).and_then(|v| Self::sane(v.as_bytes())).unwrap_or_else(Self::generate)
    }

    /// An id read back from storage, if it is one.
    pub fn from_stored(text: &str) -> Option<Self> {
        Self::sane(text.as_bytes())
    }

    /// Copied: a view into the connection's read buffer would keep the whole buffer alive for
    /// as long as the id lives.
    fn sane(bytes: &[u8]) -> Option<Self> {
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_CLIENT_ID_BYTES
            && bytes.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        ok.then(|| HeaderValue::from_bytes(bytes).ok().map(Self)).flatten()
    }

    /// 32 lowercase hex digits (the shape of a W3C trace id): 64 random bits drawn once per
    /// process, then a bijective mix of a counter, so ids never repeat within a process and
    /// two replicas' ids collide only if their random halves do.
    pub fn generate() -> Self {
        static PROCESS: LazyLock<u64> = LazyLock::new(|| {
            let mut bytes = [0u8; 8];
            // Without the OS's randomness the clock still tells processes apart.
            match getrandom::getrandom(&mut bytes) {
                Ok(()) => u64::from_le_bytes(bytes),
                Err(_) => crate::clock::unix_now_ms().unsigned_abs().rotate_left(17),
            }
        });
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut hex = [0u8; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            let word = if i < 16 { *PROCESS } else { mix(n ^ *PROCESS) };
            let nibble = (word >> (60 - 4 * (i % 16))) & 0xf;
            *digit = b"0123456789abcdef"[nibble as usize];
        }
        // Hex digits are always a valid header value.
        Self(HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0")))
    }

    /// Only visible ASCII gets in, so this is the whole id.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SplitMix64's finaliser: a bijection on u64, so distinct counters give distinct ids.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_REQUEST_ID, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn a_sane_client_id_is_kept_as_it_is() {
        let id = RequestId::from_headers(&with(b"req_01HZX-abc.123:4"));
        assert_eq!(id.as_str(), "req_01HZX-abc.123:4");
        assert_eq!(id.header_value(), "req_01HZX-abc.123:4");
        assert_eq!(RequestId::from_stored(id.as_str()), Some(id));
        assert_eq!(RequestId::from_stored("two words"), None);
    }

    #[test]
    fn an_insane_client_id_is_replaced_by_a_generated_one() {
        for bad in [&b""[..], b"has space", b"quote\"d", b"back\\slash", &[b'a'; MAX_CLIENT_ID_BYTES + 1], b"tab\there"]
        {
            let id = RequestId::from_headers(&with(bad));
            assert_ne!(id.as_str().as_bytes(), bad);
            assert_eq!(id.as_str().len(), 32, "{bad:?} gave {id}");
        }
        // Non-ASCII bytes are legal in a header value, not in an id.
        let id = RequestId::from_headers(&with("é".as_bytes()));
        assert_eq!(id.as_str().len(), 32);
        let longest = [b'x'; MAX_CLIENT_ID_BYTES];
        assert_eq!(RequestId::from_headers(&with(&longest)).as_str().len(), MAX_CLIENT_ID_BYTES);
    }

    #[test]
    fn generated_ids_are_hex_trace_id_shaped_and_never_repeat() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| RequestId::generate().as_str().to_owned()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
        }
        assert_eq!(RequestId::from_headers(&HeaderMap::new()).as_str().len(), 32);
    }
}
