//! Any bytes as a client body, on every endpoint: a 4xx or a valid request, never a panic. A
//! request that validates re-serialises to JSON that parses back to the same object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::request::{Endpoint, ProxyRequest};

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
        if let Ok(request) = ProxyRequest::parse(endpoint, data) {
            let text = serde_json::to_vec(&request.body).expect("a parsed object serialises");
            let again: serde_json::Value = serde_json::from_slice(&text).expect("and parses back");
            assert_eq!(again, serde_json::Value::Object(request.body));
        }
    }
});
