//! Following requests through a real `tollgate serve` process: request ids (kept, generated,
//! echoed, sent upstream, recorded), one access log line per request on standard output with
//! what a user would look for, never a secret or a prompt; metrics that alerts watch exist
//! from the start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::process::Process;
use support::*;

const CAROL_KEY: &str = "sk-carol-tiny-budget";
const PROMPT: &str = "PROMPT-SENTINEL the secret recipe";

fn config(upstream: &Upstream, access_log: &str) -> String {
    let extra = format!(
        "[ledger]\nbackend = \"sqlite\"\npath = \"ledger.db\"\n\n\
         [[users]]\nname = \"carol\"\nkey_sha256 = \"{}\"\nbudget_usd = 0.000000001\n\n\
         [telemetry]\naccess_log = \"{access_log}\"\n",
        key_hash(CAROL_KEY)
    );
    config_for(&upstream.base_url(), &["echo", "fail"], &extra)
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn every_request_gets_an_id_and_exactly_one_access_log_line_without_secrets() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, "json")).unwrap();
    let process = Process::start(dir.path(), ENV);
    let client = reqwest::Client::new();
    let url = process.url("/v1/chat/completions");

    // (what, key, body, client id) → the status the client must get.
    let raw_body = |key: &str, body: &str, id: Option<&str>| {
        let mut request = client.post(&url).bearer_auth(key).header("content-type", "application/json");
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.body(body.to_owned())
    };
    let cases: Vec<(&str, &str, String, Option<&str>, u16)> = vec![
        ("ok", ALICE_KEY, ask("echo", false).to_string(), Some("client-id-1"), 200),
        ("stream", ALICE_KEY, ask("echo", true).to_string(), None, 200),
        ("bad key", "sk-wrong", ask("echo", false).to_string(), None, 401),
        ("bad body", ALICE_KEY, "{not json".to_owned(), Some("has space"), 400),
        ("no model", ALICE_KEY, ask("nope", false).to_string(), None, 404),
        ("budget", CAROL_KEY, ask("echo", false).to_string(), None, 429),
        ("upstream fails", ALICE_KEY, ask("fail", false).to_string(), None, 502),
    ];
    let mut ids = HashMap::new();
    for (what, key, body, id, status) in &cases {
        let response = raw_body(key, body, *id).send().await.unwrap();
        assert_eq!(response.status().as_u16(), *status, "{what}");
        let echoed = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        match id {
            Some("client-id-1") => assert_eq!(echoed, "client-id-1", "a sane client id is kept"),
            _ => assert!(is_generated_id(&echoed), "{what}: a missing or insane id is replaced: {echoed}"),
        }
        let text = response.text().await.unwrap();
        if *what == "stream" {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
        ids.insert(*what, echoed);
    }
    assert_eq!(ids.values().collect::<std::collections::HashSet<_>>().len(), cases.len(), "ids are distinct");

    // The backend saw the same ids.
    let sent: Vec<Option<String>> = upstream.seen().iter().map(|s| s.request_id.clone()).collect();
    assert_eq!(sent, vec![Some(ids["ok"].clone()), Some(ids["stream"].clone()), Some(ids["upstream fails"].clone())]);

    let lines = process.access_lines(cases.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines_after = process.access_lines(cases.len());
    assert_eq!(lines.len(), cases.len(), "one line per request:\n{}", lines_after.join("\n"));
    assert_eq!(lines_after.len(), cases.len(), "and no more");
    let by_id: HashMap<String, Value> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (v["request_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let line = |what: &str| &by_id[&ids[what]];

    let ok = line("ok");
    assert_eq!(ok["status"], 200);
    assert_eq!((ok["user"].as_str(), ok["route"].as_str()), (Some("alice"), Some("echo")));
    assert_eq!((ok["backend"].as_str(), ok["tier"].as_str()), (Some("echo"), Some("quality")));
    assert_eq!(ok["reason"], "pinned");
    assert_eq!((ok["prompt_tokens"].as_u64(), ok["completion_tokens"].as_u64()), (Some(11), Some(7)));
    // 11 × $1/Mtok + 7 × $2/Mtok, exactly.
    assert!(lines.iter().any(|l| l.contains(r#""cost_usd":0.000025,"#)), "{lines:?}");
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["error"].is_null() && ok["cache"].is_null());
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));

    let stream = line("stream");
    assert_eq!((stream["status"].as_u64(), stream["completion_tokens"].as_u64()), (Some(200), Some(7)));
    assert!(stream["ttft_ms"].as_f64().unwrap() > 0.0, "a stream has a time to first token: {stream}");
    assert!(stream["latency_ms"].as_f64().unwrap() >= stream["ttft_ms"].as_f64().unwrap());

    for (what, status, code, user, route) in [
        ("bad key", 401, "invalid_api_key", None, None),
        ("bad body", 400, "invalid_request", Some("alice"), None),
        ("no model", 404, "model_not_found", Some("alice"), Some("nope")),
        ("budget", 429, "budget_exceeded", Some("carol"), Some("echo")),
        ("upstream fails", 502, "upstream_error", Some("alice"), Some("fail")),
    ] {
        let l = line(what);
        assert_eq!(l["status"], status, "{what}: {l}");
        assert_eq!(l["error"], code, "{what}: {l}");
        assert_eq!((l["user"].as_str(), l["route"].as_str()), (user, route), "{what}: {l}");
        assert_eq!(l["cost_usd"], 0.0, "{what}: {l}");
    }

    // The ledger's records carry the ids too.
    let records: Value =
        client.get(process.url("/admin/requests")).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap();
    let recorded: Vec<&str> =
        records["data"].as_array().unwrap().iter().filter_map(|r| r["request_id"].as_str()).collect();
    for what in ["ok", "stream"] {
        assert!(recorded.contains(&ids[what].as_str()), "{what}: {records}");
    }

    let text = lines.join("\n");
    for secret in [ALICE_KEY, CAROL_KEY, ADMIN_KEY, BACKEND_KEY, "sk-wrong", &key_hash(ALICE_KEY)] {
        assert!(!text.contains(secret), "a secret ({}…) in the access log", &secret[..6]);
    }
    for content in ["PROMPT-SENTINEL", "hello from upstream"] {
        assert!(!text.contains(content), "prompt or completion text `{content}` in the access log");
    }
}

#[tokio::test]
async fn the_text_format_and_a_reload_that_turns_the_log_off() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, "text")).unwrap();
    let process = Process::start(dir.path(), ENV);
    let client = reqwest::Client::new();

    // Counters that alerts watch exist at 0 before their first event.
    let metrics = client.get(process.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (name, labels) in [
        ("tollgate_config_reloads_total", &[("result", "failure")][..]),
        ("tollgate_config_reloads_total", &[("result", "success")][..]),
        ("tollgate_rejected_requests_total", &[("code", "budget_exceeded")][..]),
        ("tollgate_rejected_requests_total", &[("code", "invalid_api_key")][..]),
        ("tollgate_access_log_dropped_total", &[][..]),
    ] {
        let series = format!(
            "{name}{}",
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect::<Vec<_>>().join(","))
            }
        );
        assert!(metrics.lines().any(|l| l == format!("{series} 0")), "`{series} 0` missing from /metrics");
    }

    let response = client
        .post(process.url("/v1/chat/completions"))
        .bearer_auth(BOB_KEY)
        .header("x-request-id", "text-1")
        .json(&ask("echo", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let lines = process.access_lines(1);
    assert_eq!(lines.len(), 1);
    let pairs: HashMap<&str, &str> = lines[0].split(' ').filter_map(|p| p.split_once('=')).collect();
    assert_eq!(pairs["request_id"], "text-1");
    assert_eq!((pairs["user"], pairs["backend"], pairs["status"]), ("bob", "echo", "200"));
    assert_eq!((pairs["prompt_tokens"], pairs["completion_tokens"], pairs["cost_usd"]), ("11", "7", "0.000025"));
    assert_eq!((pairs["ttft_ms"], pairs["error"], pairs["cache"]), ("-", "-", "-"));

    std::fs::write(dir.path().join("tollgate.toml"), config(&upstream, "off")).unwrap();
    let reload = client.post(process.url("/admin/reload")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    let response =
        client.post(process.url("/v1/chat/completions")).bearer_auth(BOB_KEY).json(&ask("echo", false)).send().await;
    assert_eq!(response.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(process.access_lines(1).len(), 1, "nothing logged once the reload turned it off");
}

#[test]
fn bad_telemetry_values_are_named_with_their_line() {
    let text = "[[backends]]\nname = \"sim\"\nsimulate = { ttft_ms = 1 }\nmodel = \"m\"\nquality = 0.5\n\
                pricing = { hourly_usd = 1 }\n\n[telemetry]\notlp_endpoint = \"ftp://collector.example:4318\"\n\
                sample_ratio = 1.5\naccess_log = \"yaml\"\nservice_name = \"tollgate\"\n";
    let no_env = |_: &str| None;
    let parse = |text: &str| tollgate::config::Config::parse(text, "t.toml", &no_env);
    let error = parse(text).unwrap_err().to_string();
    for expected in [
        "t.toml:9: telemetry.otlp_endpoint: must be an http:// or https:// URL with a host",
        "t.toml:10: telemetry.sample_ratio: must be between 0 and 1",
        "t.toml:11: telemetry.access_log: `yaml` is not an access log format",
    ] {
        assert!(error.contains(expected), "missing `{expected}` in:\n{error}");
    }
    let error = parse(&text.replace("ftp://collector.example:4318", "collector:4318")).unwrap_err().to_string();
    assert!(error.contains("t.toml:9: telemetry.otlp_endpoint: must be an http:// or https:// URL"), "{error}");
    let https = text.replace("ftp:", "https:").replace("1.5", "0.5").replace("yaml", "json");
    assert_eq!(
        parse(&https).unwrap().telemetry.otlp_endpoint.as_deref(),
        Some("https://collector.example:4318"),
        "a vendor's collector over TLS"
    );
    let fine = text
        .replace("ftp://collector.example:4318", "http://127.0.0.1:4318")
        .replace("1.5", "0.5")
        .replace("yaml", "json");
    let config = parse(&fine).unwrap();
    assert_eq!(config.telemetry.access_log, tollgate::config::AccessLogFormat::Json);
    assert_eq!(config.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
}
