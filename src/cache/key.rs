//! What a cached answer is filed under: a keyed hash (HMAC-SHA256 with the deployment's
//! secret, so keys cannot be forged or probed) over
//!
//! 1. the scope and its principal: `user` and the user's name, `team` and the team's name
//!    (a user on no team: its own name), or `global`;
//! 2. the endpoint and the model asked for (a route's alias or a pinned backend's name);
//! 3. the canonical request: every top-level member but `model`, `stream`, `stream_options`,
//!    `user`, `metadata` and `store` (transport and bookkeeping, not the answer), `null`
//!    read as absent, the API's defaults filled in where the client left them out
//!    (`temperature` 1, `top_p` 1, `n` 1, `presence_penalty` 0, `frequency_penalty` 0,
//!    `logprobs` false, `parallel_tool_calls` true; `encoding_format` "float" for
//!    embeddings), `max_completion_tokens` read as `max_tokens`, objects' keys sorted and
//!    numbers written one way (`1.0` as `1`).
//!
//! An omitted `temperature` is 1, not 0: a gateway that read it as 0 replayed random samples
//! as if they were deterministic.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use hmac::{Hmac, Mac};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use sha2::Sha256;
use smallvec::SmallVec;

use crate::config::{CacheScope, Cacheable};
use crate::request::{Endpoint, ProxyRequest};

/// Members that do not change the answer.
const IGNORED: [&str; 6] = ["model", "stream", "stream_options", "user", "metadata", "store"];

/// A cache key: the HMAC of what the module's documentation lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

/// Whether `request` may be served from or stored in the cache under `mode`.
pub fn is_cacheable(request: &ProxyRequest, mode: Cacheable) -> bool {
    if request.endpoint == Endpoint::Embeddings || mode == Cacheable::All {
        return true;
    }
    let member = |name: &str| request.members().find(|(n, _)| *n == name).map(|(_, raw)| raw);
    // Read in place, no tree built: a temperature of any number equal to 0, a seed of anything
    // but `null`.
    let temperature_zero = member("temperature").and_then(|raw| serde_json::from_slice::<f64>(raw).ok()) == Some(0.0);
    let seeded =
        member("seed").is_some_and(|raw| matches!(serde_json::from_slice::<Option<IgnoredAny>>(raw), Ok(Some(_))));
    temperature_zero || seeded
}

/// Defaults of the API filled in where the client left a member out: name and JSON text.
const DEFAULTS: [(&str, &str); 6] = [
    ("temperature", "1"),
    ("top_p", "1"),
    ("n", "1"),
    ("presence_penalty", "0"),
    ("frequency_penalty", "0"),
    ("logprobs", "false"),
];
const EMBEDDINGS_DEFAULTS: [(&str, &str); 1] = [("encoding_format", "\"float\"")];
const TOOLS_DEFAULTS: [(&str, &str); 1] = [("parallel_tool_calls", "true")];

/// The request's canonical JSON (see the module's documentation).
///
/// Written from the members' text with no tree built: each member's `"name":value` goes to
/// the end of the output, then [`join_sorted`] puts them in name order. The bytes are those of
/// the `serde_json::Value` map this used to build and serialise (cache entries already stored
/// are keyed by them): the escapes and numbers are serde_json's own.
pub fn canonical(request: &ProxyRequest) -> Vec<u8> {
    // The members' pieces, then the object joined from them: about twice the body.
    let mut out = Vec::with_capacity(2 * request.body_len() + 192);
    let mut members: SmallVec<[(&str, Range<usize>); 16]> = SmallVec::new();
    for (name, raw) in request.members() {
        if IGNORED.contains(&name) {
            continue;
        }
        let name = if name == "max_completion_tokens" { "max_tokens" } else { name };
        let start = out.len();
        write(&mut out, name);
        out.push(b':');
        let value = out.len();
        // The body was checked as strict JSON when it was parsed: this fails on nothing.
        let written = Canonical(&mut out).deserialize(&mut serde_json::Deserializer::from_slice(raw));
        if written.is_err() || out[value..] == *b"null" {
            out.truncate(start);
            continue;
        }
        if name == "max_tokens" {
            // Given both ways, the later one counts (as when a map took both).
            members.retain(|(n, _)| *n != name);
        }
        members.push((name, start..out.len()));
    }
    let has = |members: &[(&str, Range<usize>)], name: &str| members.iter().any(|(n, _)| *n == name);
    let tools = request.endpoint == Endpoint::ChatCompletions && has(&members, "tools");
    let defaults: &[(&str, &str)] =
        if request.endpoint == Endpoint::Embeddings { &EMBEDDINGS_DEFAULTS } else { &DEFAULTS };
    let tools_defaults: &[(&str, &str)] = if tools { &TOOLS_DEFAULTS } else { &[] };
    for &(name, value) in defaults.iter().chain(tools_defaults) {
        if !has(&members, name) {
            let start = out.len();
            write(&mut out, name);
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            members.push((name, start..out.len()));
        }
    }
    join_sorted(&mut out, 0, &mut members);
    out
}

/// Appends `value` as serde_json writes it (what serialising the `Value` wrote).
fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing scalars into a `Vec` cannot fail.
    let _ = serde_json::to_writer(out, value);
}

/// Appends a string serde_json read without escapes (lent from the text): as it would write
/// it, for it escapes only quotes, backslashes and control characters, which a JSON string
/// holds only escaped. Skips scanning it again.
fn write_unescaped(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Replaces the `"name":value` pieces in `out` from `start` on, at `members`, with the object
/// of them in name order. The object is appended after the pieces and then moved over them:
/// no second buffer. Names are unique (strict JSON) and ordered as `String`s are, as the
/// `BTreeMap` of the `Value` was.
fn join_sorted<N: AsRef<str>>(out: &mut Vec<u8>, start: usize, members: &mut [(N, Range<usize>)]) {
    members.sort_unstable_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
    let end = out.len();
    out.push(b'{');
    for (i, (_, piece)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_within(piece.clone());
    }
    out.push(b'}');
    out.copy_within(end.., start);
    out.truncate(start + out.len() - end);
}

/// Writes the canonical form of the JSON value it reads: keys sorted, an integral float (below
/// 9e15, where it is exact as an integer) as the integer, the rest as serde_json writes it.
struct Canonical<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        write(self.0, &v);
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        write(self.0, &v);
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        write(self.0, &v);
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            write(self.0, &(v as i64));
        } else {
            write(self.0, &v);
        }
        Ok(())
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        write_unescaped(self.0, v);
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write(self.0, v);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        // A comma after each element, the last one then taken back: whether another element
        // follows is only known by reading it. No element's text ends in a comma.
        while seq.next_element_seed(Canonical(&mut *self.0))?.is_some() {
            self.0.push(b',');
        }
        if self.0.last() == Some(&b',') {
            self.0.pop();
        }
        self.0.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let start = self.0.len();
        let mut members: SmallVec<[(Cow<'de, str>, Range<usize>); 8]> = SmallVec::new();
        while let Some(Name(name)) = map.next_key()? {
            let piece = self.0.len();
            match &name {
                Cow::Borrowed(name) => write_unescaped(self.0, name),
                Cow::Owned(name) => write(self.0, name.as_str()),
            }
            self.0.push(b':');
            map.next_value_seed(Canonical(&mut *self.0))?;
            members.push((name, piece..self.0.len()));
        }
        join_sorted(self.0, start, &mut members);
        Ok(())
    }
}

/// An object's key, decoded: borrowed from the text unless it had escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;

        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }

        deserializer.deserialize_str(NameVisitor)
    }
}

/// The key of `request` for a principal in `scope` (`scope_id`: its user's or team's name).
pub fn key(secret: &[u8], scope: CacheScope, scope_id: &str, request: &ProxyRequest) -> CacheKey {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return CacheKey([0; 32]) };
    for part in [scope.label(), scope_id, request.endpoint.label(), request.model()] {
        // Lengths first: no two different tuples hash the same bytes.
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part.as_bytes());
    }
    mac.update(&canonical(request));
    CacheKey(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashSet;
    use std::fmt::Write as _;

    use bytes::Bytes;
    use proptest::prelude::*;
    use serde_json::{Map, Number, Value};

    use super::*;

    fn chat(body: &str) -> ProxyRequest {
        ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_owned())).unwrap()
    }

    fn k(body: &str) -> CacheKey {
        key(b"secret", CacheScope::User, "alice", &chat(body))
    }

    const HI: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn transport_and_spelling_do_not_change_the_key() {
        let base = k(&format!(r#"{{"model":"auto",{HI},"temperature":0}}"#));
        for same in [
            format!(r#"{{"model":"auto",{HI},"temperature":0.0}}"#),
            format!(
                r#"{{"temperature":0,{HI},"model":"auto","stream":true,"stream_options":{{"include_usage":true}}}}"#
            ),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"user":"u-1","top_p":1,"n":1,"seed":null}}"#),
            r#"{"model":"auto","messages":[{"content":"hi","role":"user"}],"temperature":0}"#.to_owned(),
        ] {
            assert_eq!(k(&same), base, "{same}");
        }
    }

    #[test]
    fn everything_that_changes_the_answer_changes_the_key() {
        let base = k(&format!(r#"{{"model":"auto",{HI},"temperature":0}}"#));
        for other in [
            format!(r#"{{"model":"premium",{HI},"temperature":0}}"#),
            format!(r#"{{"model":"auto",{HI}}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"max_tokens":5}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"stop":["x"]}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"seed":1}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"response_format":{{"type":"json_object"}}}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"tools":[]}}"#),
            format!(r#"{{"model":"auto",{HI},"temperature":0,"logprobs":true}}"#),
            r#"{"model":"auto","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#.to_owned(),
        ] {
            assert_ne!(k(&other), base, "{other}");
        }
        // An omitted temperature is the default 1, the same as an explicit 1.
        let omitted = k(&format!(r#"{{"model":"auto",{HI}}}"#));
        assert_eq!(omitted, k(&format!(r#"{{"model":"auto",{HI},"temperature":1}}"#)));
        // max_completion_tokens is max_tokens.
        assert_eq!(
            k(&format!(r#"{{"model":"auto",{HI},"max_tokens":5}}"#)),
            k(&format!(r#"{{"model":"auto",{HI},"max_completion_tokens":5}}"#))
        );
    }

    #[test]
    fn scopes_secrets_and_endpoints_separate_keys() {
        let request = chat(&format!(r#"{{"model":"auto",{HI},"temperature":0}}"#));
        let base = key(b"secret", CacheScope::User, "alice", &request);
        assert_ne!(key(b"secret", CacheScope::User, "bob", &request), base);
        assert_ne!(key(b"secret", CacheScope::Team, "alice", &request), base);
        assert_ne!(key(b"other", CacheScope::User, "alice", &request), base);
        let completion = ProxyRequest::parse(
            Endpoint::Completions,
            Bytes::from(r#"{"model":"auto","prompt":"hi","temperature":0}"#),
        )
        .unwrap();
        assert_ne!(key(b"secret", CacheScope::User, "alice", &completion), base);
    }

    #[test]
    fn deterministic_means_temperature_zero_or_a_seed() {
        let cacheable = |body: String| is_cacheable(&chat(&body), Cacheable::Deterministic);
        assert!(cacheable(format!(r#"{{"model":"a",{HI},"temperature":0}}"#)));
        assert!(cacheable(format!(r#"{{"model":"a",{HI},"seed":7}}"#)));
        assert!(!cacheable(format!(r#"{{"model":"a",{HI}}}"#)), "omitted temperature is 1");
        assert!(!cacheable(format!(r#"{{"model":"a",{HI},"temperature":0.2,"seed":null}}"#)));
        assert!(is_cacheable(&chat(&format!(r#"{{"model":"a",{HI}}}"#)), Cacheable::All));
        let embeddings =
            ProxyRequest::parse(Endpoint::Embeddings, Bytes::from(r#"{"model":"e","input":"x"}"#)).unwrap();
        assert!(is_cacheable(&embeddings, Cacheable::Deterministic));
    }

    #[test]
    fn the_canonical_form_sorts_fills_in_and_writes_numbers_one_way() {
        let request = chat(
            r#"{"model":"auto","messages":[{"role":"user","content":"h\u00e9\n"}],"max_completion_tokens":5,
                "temperature":0.0,"seed":null,"stop":["x",1.50,2.0,-0.0,1e300,null],"tools":[{"b":{},"a":[]}]}"#,
        );
        let expected = r#"{"frequency_penalty":0,"logprobs":false,"max_tokens":5,"messages":[{"content":"hé\n","role":"user"}],"n":1,"parallel_tool_calls":true,"presence_penalty":0,"stop":["x",1.5,2,0,1e+300,null],"temperature":0,"tools":[{"a":[],"b":{}}],"top_p":1}"#;
        assert_eq!(String::from_utf8(canonical(&request)).unwrap(), expected);
    }

    /// The implementation before the streaming writer, kept as the oracle: the cache entries
    /// already stored are keyed by its bytes.
    fn reference_canonical(request: &ProxyRequest) -> Vec<u8> {
        let mut members = Map::new();
        for (name, raw) in request.members() {
            if IGNORED.contains(&name) {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<Value>(raw) else { continue };
            if value.is_null() {
                continue;
            }
            let name = if name == "max_completion_tokens" { "max_tokens" } else { name };
            members.insert(name.to_owned(), reference_normalize(value));
        }
        if request.endpoint == Endpoint::Embeddings {
            members.entry("encoding_format").or_insert_with(|| Value::String("float".into()));
        }
        if request.endpoint != Endpoint::Embeddings {
            for (name, value) in [
                ("temperature", Value::from(1)),
                ("top_p", Value::from(1)),
                ("n", Value::from(1)),
                ("presence_penalty", Value::from(0)),
                ("frequency_penalty", Value::from(0)),
                ("logprobs", Value::Bool(false)),
            ] {
                members.entry(name).or_insert(value);
            }
            if request.endpoint == Endpoint::ChatCompletions && members.contains_key("tools") {
                members.entry("parallel_tool_calls").or_insert(Value::Bool(true));
            }
        }
        serde_json::to_vec(&Value::Object(members)).unwrap_or_default()
    }

    fn reference_normalize(value: Value) -> Value {
        match value {
            Value::Number(n) => match n.as_f64() {
                Some(x) if n.is_f64() && x.fract() == 0.0 && x.abs() < 9.0e15 => Value::Number(Number::from(x as i64)),
                _ => Value::Number(n),
            },
            Value::Array(items) => Value::Array(items.into_iter().map(reference_normalize).collect()),
            Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, reference_normalize(v))).collect()),
            other => other,
        }
    }

    fn reference_is_cacheable(request: &ProxyRequest, mode: Cacheable) -> bool {
        if request.endpoint == Endpoint::Embeddings || mode == Cacheable::All {
            return true;
        }
        let temperature_zero = request.member_value("temperature").and_then(|t| t.as_f64()) == Some(0.0);
        let seeded = request.member_value("seed").is_some_and(|s| !s.is_null());
        temperature_zero || seeded
    }

    /// A JSON value as generated: numbers as their text, objects' keys unique.
    #[derive(Debug, Clone)]
    enum Json {
        Null,
        Bool(bool),
        Num(String),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    /// Text heavy in what JSON escapes: quotes, backslashes, control characters, and beyond
    /// ASCII and the BMP.
    fn text() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            '"',
            '\\',
            '/',
            '\n',
            '\t',
            '\r',
            '\u{8}',
            '\u{c}',
            '\u{0}',
            '\u{1f}',
            '\u{7f}',
            'a',
            'Z',
            '\u{e9}',
            '\u{2028}',
            '\u{1f600}',
        ]);
        prop::collection::vec(prop_oneof![any::<char>(), special], 0..8).prop_map(String::from_iter)
    }

    /// Keys that sort in interesting ways against each other and the defaults' names.
    fn key_text() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "a",
            "b",
            "B",
            "",
            "a\"",
            "a\\",
            "\u{e9}",
            "\u{1f600}",
            "role",
            "content",
            "temperature",
            "top_p",
            "n",
            "seed",
            "tools",
        ]);
        prop_oneof![names.prop_map(str::to_owned), text()]
    }

    /// Numbers in their many spellings: integers to the ends of i64 and u64 and beyond, floats
    /// integral or not, around the 9e15 bound, in exponent form.
    fn number() -> impl Strategy<Value = String> {
        let finite = any::<f64>().prop_filter("finite", |x| x.is_finite());
        let literals = prop::sample::select(vec![
            "0",
            "-0",
            "0.0",
            "-0.0",
            "1.0",
            "1.50",
            "2.5",
            "0.1",
            "1e300",
            "-1e300",
            "1E2",
            "1e-2",
            "25e-1",
            "1.5e1",
            "9.0e15",
            "9e15",
            "-9e15",
            "8999999999999999.0",
            "8999999999999998.5",
            "9000000000000001",
            "1e15",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e-400",
            "5e-324",
            "1.7976931348623157e308",
            "0.30000000000000004",
        ]);
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (-1000i64..1000).prop_map(|n| n.to_string()),
            literals.prop_map(str::to_owned),
            finite.clone().prop_map(|x| format!("{x:?}")),
            finite.clone().prop_map(|x| format!("{x:e}")),
            finite.prop_map(|x| format!("{x}")),
        ]
    }

    fn unique(members: Vec<(String, Json)>) -> Vec<(String, Json)> {
        let mut seen = HashSet::new();
        members.into_iter().filter(|(k, _)| seen.insert(k.clone())).collect()
    }

    fn json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            number().prop_map(Json::Num),
            text().prop_map(Json::Str),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Arr),
                prop::collection::vec((key_text(), inner), 0..6).prop_map(|m| Json::Obj(unique(m))),
            ]
        })
    }

    /// A top-level member: one the key reads or ignores, or any other; those the request
    /// parser checks with values it accepts.
    fn member() -> impl Strategy<Value = (String, Json)> {
        let known = prop::sample::select(vec![
            "temperature",
            "top_p",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "parallel_tool_calls",
            "tools",
            "seed",
            "encoding_format",
            "user",
            "metadata",
            "store",
            "stop",
            "response_format",
            "prompt",
        ]);
        let tokens = prop_oneof![Just(Json::Null), (1u64..).prop_map(|n| Json::Num(n.to_string()))];
        let usage = Json::Obj(vec![("include_usage".into(), Json::Bool(true))]);
        prop_oneof![
            4 => (known.prop_map(str::to_owned), json()),
            2 => (key_text(), json()),
            2 => (prop::sample::select(vec!["max_tokens", "max_completion_tokens"]).prop_map(str::to_owned), tokens),
            1 => (Just("stream".to_owned()), prop_oneof![Just(Json::Null), any::<bool>().prop_map(Json::Bool)]),
            1 => (Just("stream_options".to_owned()), prop::sample::select(vec![Json::Null, usage, Json::Obj(vec![])])),
        ]
    }

    fn message() -> impl Strategy<Value = Json> {
        (text(), prop::collection::vec((key_text(), json()), 0..4), any::<prop::sample::Index>()).prop_map(
            |(role, others, at)| {
                let mut members = unique(others.into_iter().filter(|(k, _)| k != "role").collect());
                members.insert(at.index(members.len() + 1), ("role".into(), Json::Str(role)));
                Json::Obj(members)
            },
        )
    }

    /// Writes JSON in one of the many spellings of a value, drawn from a seeded generator: keys
    /// in any order, whitespace or none, and escapes where none are needed.
    struct Writer {
        out: String,
        state: u64,
        compact: bool,
    }

    impl Writer {
        fn draw(&mut self, n: u64) -> u64 {
            // splitmix64
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }

        fn space(&mut self) {
            if !self.compact {
                let space = ["", " ", "\n  ", "\t", "\r\n    "][self.draw(5) as usize];
                self.out.push_str(space);
            }
        }

        fn string(&mut self, s: &str) {
            self.out.push('"');
            for c in s.chars() {
                let short = match c {
                    '"' | '\\' | '/' => Some(c),
                    '\u{8}' => Some('b'),
                    '\u{c}' => Some('f'),
                    '\n' => Some('n'),
                    '\r' => Some('r'),
                    '\t' => Some('t'),
                    _ => None,
                };
                let must = matches!(c, '"' | '\\') || c < ' ';
                let choice = self.draw(4);
                match (short, choice) {
                    (_, 0 | 1) if !must => self.out.push(c),
                    (Some(e), 0 | 2) => {
                        self.out.push('\\');
                        self.out.push(e);
                    }
                    _ => {
                        for unit in c.encode_utf16(&mut [0; 2]) {
                            if choice == 3 {
                                write!(self.out, "\\u{unit:04X}").unwrap();
                            } else {
                                write!(self.out, "\\u{unit:04x}").unwrap();
                            }
                        }
                    }
                }
            }
            self.out.push('"');
        }

        fn value(&mut self, value: &Json) {
            match value {
                Json::Null => self.out.push_str("null"),
                Json::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
                Json::Num(n) => self.out.push_str(n),
                Json::Str(s) => self.string(s),
                Json::Arr(items) => {
                    self.out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        self.space();
                        if i > 0 {
                            self.out.push(',');
                            self.space();
                        }
                        self.value(item);
                    }
                    self.space();
                    self.out.push(']');
                }
                Json::Obj(members) => {
                    let mut order: Vec<&(String, Json)> = members.iter().collect();
                    for i in (1..order.len()).rev() {
                        let j = self.draw(i as u64 + 1) as usize;
                        order.swap(i, j);
                    }
                    self.out.push('{');
                    for (i, (key, value)) in order.into_iter().enumerate() {
                        self.space();
                        if i > 0 {
                            self.out.push(',');
                            self.space();
                        }
                        self.string(key);
                        self.space();
                        self.out.push(':');
                        self.space();
                        self.value(value);
                    }
                    self.space();
                    self.out.push('}');
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn canonical_is_byte_for_byte_the_reference(
            model in text(),
            messages in prop::collection::vec(message(), 1..4),
            input in json(),
            members in prop::collection::vec(member(), 0..12),
            seed in any::<u64>(),
            compact in any::<bool>(),
        ) {
            for endpoint in Endpoint::ALL {
                let input_field = match endpoint {
                    Endpoint::ChatCompletions => "messages",
                    Endpoint::Completions => "prompt",
                    Endpoint::Embeddings => "input",
                };
                let input = match (endpoint, &input) {
                    (Endpoint::ChatCompletions, _) => Json::Arr(messages.clone()),
                    (_, Json::Null) => Json::Str(String::new()),
                    (_, input) => input.clone(),
                };
                let others = members.iter().filter(|(name, value)| {
                    name != "model" && name != input_field
                        && !(endpoint == Endpoint::Embeddings && name == "stream" && matches!(value, Json::Bool(true)))
                });
                let body = [("model".to_owned(), Json::Str(format!("m{model}"))), (input_field.to_owned(), input)]
                    .into_iter()
                    .chain(others.cloned())
                    .collect();
                let mut writer = Writer { out: String::new(), state: seed, compact };
                writer.value(&Json::Obj(unique(body)));
                let request = ProxyRequest::parse(endpoint, Bytes::from(writer.out.clone()))
                    .unwrap_or_else(|e| panic!("{e:?}: {}", writer.out));
                prop_assert_eq!(
                    String::from_utf8(canonical(&request)).unwrap(),
                    String::from_utf8(reference_canonical(&request)).unwrap(),
                    "{}", writer.out
                );
                for mode in [Cacheable::Deterministic, Cacheable::All] {
                    prop_assert_eq!(is_cacheable(&request, mode), reference_is_cacheable(&request, mode));
                }
            }
        }
    }
}
