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

use hmac::{Hmac, Mac};
use serde_json::{Map, Number, Value};
use sha2::Sha256;

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
    let temperature_zero = request.member_value("temperature").and_then(|t| t.as_f64()) == Some(0.0);
    let seeded = request.member_value("seed").is_some_and(|s| !s.is_null());
    temperature_zero || seeded
}

/// The request's canonical JSON (see the module's documentation).
pub fn canonical(request: &ProxyRequest) -> Vec<u8> {
    let mut members = Map::new();
    for (name, raw) in request.members() {
        if IGNORED.contains(&name) {
            continue;
        }
        // The body was checked as strict JSON when it was parsed.
        let Ok(value) = serde_json::from_slice::<Value>(raw) else { continue };
        if value.is_null() {
            continue;
        }
        let name = if name == "max_completion_tokens" { "max_tokens" } else { name };
        members.insert(name.to_owned(), normalize(value));
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
    // A map of sorted keys: `Value`'s map is ordered (no `preserve_order`).
    serde_json::to_vec(&Value::Object(members)).unwrap_or_default()
}

/// Numbers one way (an integral float as an integer), recursively.
fn normalize(value: Value) -> Value {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() && x.fract() == 0.0 && x.abs() < 9.0e15 => Value::Number(Number::from(x as i64)),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
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
    use bytes::Bytes;

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
}
