//! The request a backend receives: the client's JSON with `model` rewritten and usage asked
//! for, the backend's own key, and nothing of the client's credentials.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::Full;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::request::{Endpoint, ProxyRequest};

/// The JSON sent upstream. Every field but `model` and `stream_options.include_usage` is the
/// client's, untouched (tools, response_format, logprobs, seed...). `with_logprobs`: a
/// cascade's first call asks for log-probabilities to judge the answer.
///
/// Written straight from the validated object with the changes applied on the way: no copy of
/// the client's (possibly large) body per attempt.
pub fn upstream_body(request: &ProxyRequest, backend_model: &str, with_logprobs: bool) -> Bytes {
    let logprobs =
        with_logprobs.then(
            || {
                if request.endpoint == Endpoint::Completions {
                    Value::from(1)
                } else {
                    Value::Bool(true)
                }
            },
        );
    let outgoing = Outgoing { body: &request.body, model: backend_model, logprobs, include_usage: request.stream };
    // Serialising a validated object cannot fail: strict_json refuses the keys serde_json would
    // treat as its own.
    Bytes::from(serde_json::to_vec(&outgoing).unwrap_or_default())
}

struct Outgoing<'a> {
    body: &'a Map<String, Value>,
    model: &'a str,
    /// Added when the client did not set `logprobs` itself.
    logprobs: Option<Value>,
    /// Streams always ask for usage: it makes the cost exact; the client still sees the usage
    /// chunk only if it asked.
    include_usage: bool,
}

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.body {
            match key.as_str() {
                "model" => map.serialize_entry(key, self.model)?,
                "stream_options" if self.include_usage => map.serialize_entry(key, &WithUsage(value))?,
                _ => map.serialize_entry(key, value)?,
            }
        }
        if self.include_usage && !self.body.contains_key("stream_options") {
            map.serialize_entry("stream_options", &WithUsage(&Value::Null))?;
        }
        if let Some(logprobs) = self.logprobs.as_ref().filter(|_| !self.body.contains_key("logprobs")) {
            map.serialize_entry("logprobs", logprobs)?;
        }
        map.end()
    }
}

/// The client's `stream_options` (an object, or anything else, which is replaced) with
/// `include_usage: true`.
struct WithUsage<'a>(&'a Value);

impl Serialize for WithUsage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if let Value::Object(options) = self.0 {
            for (key, value) in options.iter().filter(|(k, _)| k.as_str() != "include_usage") {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("include_usage", &true)?;
        map.end()
    }
}

/// The HTTP request to `base_url` + the endpoint's path.
pub fn build(
    base_url: &str,
    endpoint: Endpoint,
    authorization: Option<&HeaderValue>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("{base_url}{}", endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header(header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")));
    if let Some(value) = authorization {
        builder = builder.header(header::AUTHORIZATION, value.clone());
    }
    builder.body(Full::new(body)).map_err(|e| format!("invalid upstream request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_and_asks_for_usage_keeping_other_fields() {
        let raw = br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream":true,
            "seed":7,"tools":[{"type":"function"}],"stream_options":{"foo":1}}"#;
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, raw).unwrap();
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "llama-70b", false)).unwrap();
        assert_eq!(sent["model"], "llama-70b");
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["stream_options"]["foo"], 1);
        assert_eq!(sent["seed"], 7);
        assert_eq!(sent["tools"][0]["type"], "function");
        assert_eq!(sent.as_object().unwrap().len(), 6, "nothing added but what is needed");
    }

    #[test]
    fn a_cascade_probe_asks_for_logprobs_unless_the_client_set_them() {
        let raw = br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream_options":null}"#;
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, raw).unwrap();
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "m", true)).unwrap();
        assert_eq!(sent["logprobs"], true);
        assert_eq!(sent["stream_options"], Value::Null, "not a stream: left as the client sent it");
        let raw = br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"logprobs":false}"#;
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, raw).unwrap();
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "m", true)).unwrap();
        assert_eq!(sent["logprobs"], false);
    }
}
