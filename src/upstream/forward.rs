//! The request a backend receives: the client's JSON with `model` rewritten and usage asked
//! for, the backend's own key, and nothing of the client's credentials.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::Full;
use serde_json::{Map, Value};

use crate::request::{Endpoint, ProxyRequest};

/// The JSON sent upstream. Every field but `model` and `stream_options.include_usage` is the
/// client's, untouched (tools, response_format, logprobs, seed...).
/// `with_logprobs`: a cascade's first call asks for log-probabilities to judge the answer.
pub fn upstream_body(request: &ProxyRequest, backend_model: &str, with_logprobs: bool) -> Bytes {
    let mut body = request.body.clone();
    body.insert("model".into(), Value::String(backend_model.to_owned()));
    if with_logprobs {
        let value =
            if request.endpoint == crate::request::Endpoint::Completions { Value::from(1) } else { Value::Bool(true) };
        body.entry("logprobs").or_insert(value);
    }
    if request.stream {
        // Usage makes the cost exact; the client still sees the usage chunk only if it asked.
        match body.get_mut("stream_options") {
            Some(Value::Object(options)) => {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            _ => {
                let mut options = Map::new();
                options.insert("include_usage".into(), Value::Bool(true));
                body.insert("stream_options".into(), Value::Object(options));
            }
        }
    }
    // Serialising a `Map` of `Value`s cannot fail (string keys, no custom serialisers).
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
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
    }
}
