//! Any bytes as a client body, on every endpoint: a 4xx or a valid request, never a panic. A
//! request that validates goes upstream as JSON that parses, equal to the client's object but
//! for the members Tollgate sets (`model`, and `stream_options` on streams).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::request::{Endpoint, ProxyRequest};
use tollgate::upstream::upstream_body;

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
        if let Ok(request) = ProxyRequest::parse(endpoint, Bytes::copy_from_slice(data)) {
            let client: Value = serde_json::from_slice(data).expect("a validated body is JSON");
            let sent = upstream_body(&request, "fuzz-model", false);
            let Value::Object(mut sent) = serde_json::from_slice(&sent).expect("what goes upstream is JSON") else {
                panic!("what goes upstream is an object");
            };
            let Value::Object(mut client) = client else { panic!("a validated body is an object") };
            assert_eq!(sent.remove("model"), Some(Value::from("fuzz-model")));
            assert_eq!(client.remove("model"), Some(Value::from(request.model())), "the model as the client wrote it");
            if request.stream {
                let options = sent.remove("stream_options").expect("streams ask for usage");
                assert_eq!(options["include_usage"], true);
                client.remove("stream_options");
            }
            assert_eq!(sent, client);
        }
    }
});
