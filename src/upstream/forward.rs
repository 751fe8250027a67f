//! The request a backend receives: the client's JSON with `model` rewritten and usage asked
//! for, the backend's own key, and nothing of the client's credentials.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
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

/// Where a backend's requests go, prepared once per config load: the path of each endpoint
/// under `base_url`, the `Host` header and the backend's own key.
#[derive(Debug)]
pub struct Destination {
    chat_completions: Uri,
    completions: Uri,
    embeddings: Uri,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
}

impl Destination {
    /// Also returns scheme://authority, what the connector dials.
    pub fn new(base_url: &str, authorization: Option<HeaderValue>) -> Result<(Self, Uri), String> {
        let invalid = |e: &dyn std::fmt::Display| format!("its base_url is not a valid URL: {e}");
        let url: Uri = base_url.parse().map_err(|e| invalid(&e))?;
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err("its base_url needs a scheme and a host".into());
        };
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| invalid(&e))?;
        let prefix = url.path().trim_end_matches('/');
        let path = |endpoint: Endpoint| -> Result<Uri, String> {
            format!("{prefix}{}", endpoint.path()).parse().map_err(|e| invalid(&e))
        };
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(&e))?;
        let destination = Self {
            chat_completions: path(Endpoint::ChatCompletions)?,
            completions: path(Endpoint::Completions)?,
            embeddings: path(Endpoint::Embeddings)?,
            host,
            authorization,
        };
        Ok((destination, origin))
    }

    /// The HTTP request for `endpoint`, in origin form.
    pub fn request(&self, endpoint: Endpoint, body: Bytes) -> Request<Full<Bytes>> {
        let uri = match endpoint {
            Endpoint::ChatCompletions => &self.chat_completions,
            Endpoint::Completions => &self.completions,
            Endpoint::Embeddings => &self.embeddings,
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
        headers.insert(header::USER_AGENT, HeaderValue::from_static(concat!("tollgate/", env!("CARGO_PKG_VERSION"))));
        if let Some(value) = &self.authorization {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        request
    }
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

    #[test]
    fn requests_go_to_the_endpoint_under_the_base_url_path_with_host_and_key() {
        let key = HeaderValue::from_static("Bearer sk-backend");
        let (destination, origin) = Destination::new("https://api.example.com:8443/openai/v1", Some(key)).unwrap();
        assert_eq!(origin.to_string(), "https://api.example.com:8443/");
        let request = destination.request(Endpoint::ChatCompletions, Bytes::from_static(b"{}"));
        assert_eq!(request.uri().to_string(), "/openai/v1/chat/completions");
        assert_eq!(request.headers()[header::HOST], "api.example.com:8443");
        assert_eq!(request.headers()[header::AUTHORIZATION], "Bearer sk-backend");
        let (destination, origin) = Destination::new("http://127.0.0.1:9000", None).unwrap();
        assert_eq!(origin.to_string(), "http://127.0.0.1:9000/");
        let request = destination.request(Endpoint::Embeddings, Bytes::new());
        assert_eq!(request.uri().to_string(), "/embeddings");
        assert!(request.headers().get(header::AUTHORIZATION).is_none());
    }
}
