//! The request a backend receives: the client's JSON with `model` rewritten and usage asked
//! for, the backend's own key, and nothing of the client's credentials.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use serde_json::{Map, Value};

use crate::apis::Dialect;
use crate::config::Api;
use crate::request::{Endpoint, ProxyRequest};
use crate::secret::Secret;

/// The JSON sent upstream: the client's bytes, member by member, with `model` set to the
/// backend's, streams asking for usage (`stream_options.include_usage`: it makes the cost exact;
/// the client still sees the usage chunk only if it asked), a clamped `max_tokens`, and for a
/// cascade's first call (`with_logprobs`) log-probabilities to judge the answer by, unless the
/// client set `logprobs` itself. Every other member (tools, response_format, seed...) goes as
/// the client wrote it.
pub fn upstream_body(request: &ProxyRequest, backend_model: &str, with_logprobs: bool) -> Bytes {
    let clamped = request.clamped_field().zip(request.max_tokens);
    let mut out = Json { bytes: Vec::with_capacity(request.body_len() + backend_model.len() + 64), first: true };
    out.bytes.push(b'{');
    let (mut has_stream_options, mut has_logprobs, mut has_clamped) = (false, false, false);
    for (key, raw) in request.members() {
        match key {
            "model" => out.member(key, &backend_model),
            "stream_options" if request.stream => {
                has_stream_options = true;
                if request.client_wants_usage {
                    out.member(key, &Raw(raw));
                } else {
                    out.member(key, &with_usage(request.member_value(key)));
                }
            }
            _ => match clamped {
                Some((field, tokens)) if key == field => {
                    has_clamped = true;
                    out.member(key, &tokens);
                }
                _ => {
                    has_logprobs |= key == "logprobs";
                    out.member(key, &Raw(raw));
                }
            },
        }
    }
    if request.stream && !has_stream_options {
        out.member("stream_options", &with_usage(None));
    }
    if with_logprobs && !has_logprobs {
        match request.endpoint {
            Endpoint::Completions => out.member("logprobs", &1),
            _ => out.member("logprobs", &true),
        }
    }
    if let Some((field, tokens)) = clamped.filter(|_| !has_clamped) {
        out.member(field, &tokens);
    }
    out.bytes.push(b'}');
    Bytes::from(out.bytes)
}

/// An object being written member by member.
struct Json {
    bytes: Vec<u8>,
    first: bool,
}

impl Json {
    fn member(&mut self, key: &str, value: &dyn WriteJson) {
        if !std::mem::take(&mut self.first) {
            self.bytes.push(b',');
        }
        key.write(&mut self.bytes);
        self.bytes.push(b':');
        value.write(&mut self.bytes);
    }
}

trait WriteJson {
    fn write(&self, out: &mut Vec<u8>);
}

/// JSON text as the client wrote it (already checked).
struct Raw<'a>(&'a [u8]);

impl WriteJson for Raw<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0);
    }
}

/// Anything serde writes: strings (escaped), numbers, `stream_options`.
impl<T: serde::Serialize> WriteJson for T {
    fn write(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail, nor can these values (no non-string map keys).
        let _ = serde_json::to_writer(out, self);
    }
}

/// The client's `stream_options` (an object; `null` or absent is replaced) with
/// `include_usage: true`.
fn with_usage(options: Option<Value>) -> Map<String, Value> {
    let mut options = match options {
        Some(Value::Object(options)) => options,
        _ => Map::new(),
    };
    options.insert("include_usage".to_owned(), Value::Bool(true));
    options
}

/// Where a backend's requests go, prepared once per config load: the path of each endpoint
/// under `base_url`, the `Host` header and the backend's own key (as a bearer token, or for
/// an Anthropic backend as `x-api-key` with the `anthropic-version` it speaks).
#[derive(Debug)]
pub struct Destination {
    chat_completions: Uri,
    completions: Uri,
    embeddings: Uri,
    /// The client APIs a backend may serve itself (`native_apis`).
    responses: Uri,
    messages: Uri,
    host: HeaderValue,
    credentials: Option<(HeaderName, HeaderValue)>,
    api: Api,
}

/// The Messages API version Tollgate's translation follows.
const ANTHROPIC_VERSION: &str = "2023-06-01";

impl Destination {
    /// Also returns scheme://authority, what the connector dials.
    pub fn new(base_url: &str, api: Api, key: Option<&Secret>) -> Result<(Self, Uri), String> {
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
            let path = match (api, endpoint) {
                (Api::Anthropic, Endpoint::ChatCompletions) => "/messages",
                _ => endpoint.path(),
            };
            format!("{prefix}{path}").parse().map_err(|e| invalid(&e))
        };
        let native = |path: &str| -> Result<Uri, String> { format!("{prefix}{path}").parse().map_err(|e| invalid(&e)) };
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(&e))?;
        let credentials = match key {
            None => None,
            Some(key) => {
                let (name, value) = match api {
                    Api::OpenAi => (header::AUTHORIZATION, format!("Bearer {}", key.expose())),
                    Api::Anthropic => (HeaderName::from_static("x-api-key"), key.expose().to_owned()),
                };
                let mut value = HeaderValue::try_from(value)
                    .map_err(|_| "its API key holds characters a header cannot carry".to_owned())?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        let destination = Self {
            chat_completions: path(Endpoint::ChatCompletions)?,
            completions: path(Endpoint::Completions)?,
            embeddings: path(Endpoint::Embeddings)?,
            responses: native("/responses")?,
            messages: native("/messages")?,
            host,
            credentials,
            api,
        };
        Ok((destination, origin))
    }

    /// The HTTP request for `endpoint` (or, for a request passed through in the client's own
    /// API, that API's path), in origin form; its headers in `spare`, emptied first, when there
    /// is one.
    pub fn request(
        &self,
        endpoint: Endpoint,
        dialect: Dialect,
        body: Bytes,
        spare: Option<HeaderMap>,
    ) -> Request<Full<Bytes>> {
        let uri = match (dialect, endpoint) {
            (Dialect::Responses, _) => &self.responses,
            (Dialect::Messages, _) => &self.messages,
            (Dialect::Chat, Endpoint::ChatCompletions) => &self.chat_completions,
            (Dialect::Chat, Endpoint::Completions) => &self.completions,
            (Dialect::Chat, Endpoint::Embeddings) => &self.embeddings,
        };
        let mut request = Request::new(Full::new(body));
        if let Some(mut headers) = spare {
            headers.clear();
            *request.headers_mut() = headers;
        }
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
        headers.insert(header::USER_AGENT, HeaderValue::from_static(concat!("tollgate/", env!("CARGO_PKG_VERSION"))));
        if let Some((name, value)) = &self.credentials {
            headers.insert(name.clone(), value.clone());
        }
        if self.api == Api::Anthropic {
            headers.insert("anthropic-version", HeaderValue::from_static(ANTHROPIC_VERSION));
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
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from_static(raw)).unwrap();
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
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from_static(raw)).unwrap();
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "m", true)).unwrap();
        assert_eq!(sent["logprobs"], true);
        assert_eq!(sent["stream_options"], Value::Null, "not a stream: left as the client sent it");
        let raw = br#"{"model":"auto","messages":[{"role":"user","content":"x"}],"logprobs":false}"#;
        let request = ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from_static(raw)).unwrap();
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "m", true)).unwrap();
        assert_eq!(sent["logprobs"], false);
    }

    #[test]
    fn the_clients_bytes_go_as_written_but_for_the_members_tollgate_sets() {
        let raw = br#"{"mod\u0065l2":1, "model":"auto","messages":[{"role":"user","content":"caf\u00e9 \"x\""}],
            "temperature":1.0e0,"max_completion_tokens":900,"n":1}"#;
        let mut request = ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from_static(raw)).unwrap();
        request.set_max_tokens(50);
        let sent = upstream_body(&request, "we\"ird", false);
        let text = std::str::from_utf8(&sent).unwrap();
        assert!(text.contains(r#""temperature":1.0e0"#), "numbers as the client wrote them: {text}");
        assert!(text.contains(r#""content":"caf\u00e9 \"x\"""#), "strings as the client wrote them: {text}");
        let sent: Value = serde_json::from_str(text).unwrap();
        assert_eq!(sent["model"], "we\"ird");
        assert_eq!(sent["model2"], 1);
        assert_eq!(sent["max_completion_tokens"], 50, "clamped in the member the client used");
        assert!(sent.get("max_tokens").is_none());
        let keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6);

        let raw = br#"{"model":"auto","messages":[{"role":"user","content":"x"}]}"#;
        let mut request = ProxyRequest::parse(Endpoint::ChatCompletions, Bytes::from_static(raw)).unwrap();
        request.set_max_tokens(9);
        let sent: Value = serde_json::from_slice(&upstream_body(&request, "m", false)).unwrap();
        assert_eq!(sent["max_tokens"], 9, "added when the client set no limit");
    }

    #[test]
    fn requests_go_to_the_endpoint_under_the_base_url_path_with_host_and_key() {
        let key = Secret::new("sk-backend".to_owned());
        let (destination, origin) =
            Destination::new("https://api.example.com:8443/openai/v1", Api::OpenAi, Some(&key)).unwrap();
        assert_eq!(origin.to_string(), "https://api.example.com:8443/");
        // The client's own headers, its key among them, are dropped from the reused map.
        let mut spare = HeaderMap::new();
        spare.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-client"));
        spare.insert("x-client-secret", HeaderValue::from_static("s3cret"));
        let request =
            destination.request(Endpoint::ChatCompletions, Dialect::Chat, Bytes::from_static(b"{}"), Some(spare));
        assert_eq!(request.uri().to_string(), "/openai/v1/chat/completions");
        assert_eq!(request.headers()[header::HOST], "api.example.com:8443");
        assert_eq!(request.headers()[header::AUTHORIZATION], "Bearer sk-backend");
        assert_eq!(request.headers().get_all(header::AUTHORIZATION).iter().count(), 1);
        assert!(request.headers().get("x-client-secret").is_none());
        let (destination, origin) = Destination::new("http://127.0.0.1:9000", Api::OpenAi, None).unwrap();
        assert_eq!(origin.to_string(), "http://127.0.0.1:9000/");
        let mut spare = HeaderMap::new();
        spare.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-client"));
        let request = destination.request(Endpoint::Embeddings, Dialect::Chat, Bytes::new(), Some(spare));
        assert_eq!(request.uri().to_string(), "/embeddings");
        assert!(request.headers().get(header::AUTHORIZATION).is_none(), "no backend key: none at all");
        let request = destination.request(Endpoint::Embeddings, Dialect::Chat, Bytes::new(), None);
        assert_eq!(request.headers()[header::HOST], "127.0.0.1:9000");
    }

    #[test]
    fn an_anthropic_backend_gets_chat_at_messages_with_its_key_and_version_headers() {
        let key = Secret::new("sk-ant".to_owned());
        let (destination, _) = Destination::new("https://anthropic.example/v1/", Api::Anthropic, Some(&key)).unwrap();
        let mut spare = HeaderMap::new();
        spare.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-client"));
        let request = destination.request(Endpoint::ChatCompletions, Dialect::Chat, Bytes::new(), Some(spare));
        assert_eq!(request.uri().to_string(), "/v1/messages");
        let native = destination.request(Endpoint::ChatCompletions, Dialect::Messages, Bytes::new(), None);
        assert_eq!(native.uri().to_string(), "/v1/messages");
        assert_eq!(request.headers()["x-api-key"], "sk-ant");
        assert!(request.headers()["x-api-key"].is_sensitive(), "kept out of debug output");
        assert_eq!(request.headers()["anthropic-version"], ANTHROPIC_VERSION);
        assert!(request.headers().get(header::AUTHORIZATION).is_none(), "the client's key never goes upstream");
    }
}
