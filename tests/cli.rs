//! The command line: `check` on good and broken configs, `hash-key`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn tollgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args).env_remove("PREMIUM_API_KEY").env_remove("TOLLGATE_ADMIN_KEY");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

#[test]
fn check_accepts_the_shipped_configs() {
    let output = tollgate(&["check", "config/tollgate.toml"], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (2 backends, 1 routes, 2 users)"));

    let env = [("PREMIUM_API_KEY", "sk-test"), ("TOLLGATE_ADMIN_KEY", "admin-test")];
    let output = tollgate(&["check", "config/real-upstreams.toml"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Every kind of problem at once, each reported with file, line and field.
const BROKEN: &str = r#"[server]
listen = "127.0.0.1:8080"
max_body_bytes = "big"
admin_key_env = "TOLLGATE_TEST_UNSET_ADMIN"

[[backends]]
name = "gpu"
base_url = "http://127.0.0.1:9001/v1"
model = "llama"
qualty = 0.9
quality = 1.5
pricing = { input_per_mtok = -0.60, output_per_mtok = 2.40 }

[[backends]]
name = "gpu"
base_url = "http://127.0.0.1:9002/v1"
model = "small"
quality = 0.3
pricing = { input_per_mtok = 0.1, output_per_mtok = 0.2, hourly_usd = 0.12 }

[[backends]]
name = "nothing"
model = "m"
quality = 0.5
api_key_env = "TOLLGATE_TEST_UNSET_BACKEND"
pricing = {}

[[routes]]
model = "auto"
backends = ["gpu", "missing-one"]
"#;

#[test]
fn check_reports_every_problem_with_file_line_and_field() {
    let (_dir, path) = write_config(BROKEN);
    let output = tollgate(&["check", &path], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = [
        "3: server.max_body_bytes: expected a non-negative integer, found a string",
        "4: server.admin_key_env: environment variable `TOLLGATE_TEST_UNSET_ADMIN` is not set",
        "10: backends[0].qualty: unknown key `qualty` (did you mean `quality`?)",
        "11: backends[0].quality: must be between 0 and 1, got 1.5",
        "12: backends[0].pricing.input_per_mtok: cannot be negative, got -0.6",
        "15: backends[1].name: duplicate `gpu` (first at line 7)",
        "19: backends[1].pricing: set per-token prices or `hourly_usd`, not both",
        "21: backends[2].base_url: set `base_url` (a real upstream) or `simulate`",
        "25: backends[2].api_key_env: environment variable `TOLLGATE_TEST_UNSET_BACKEND` is not set",
        "26: backends[2].pricing: set per-token prices (`input_per_mtok`, `output_per_mtok`) or `hourly_usd`",
        "30: routes[0].backends: no backend is named `missing-one`",
    ];
    for line in expected {
        let full = format!("{path}:{line}");
        assert!(stderr.lines().any(|l| l == full), "missing `{full}` in:\n{stderr}");
    }
    assert!(stderr.contains(&format!("{} problem(s) found", expected.len())), "{stderr}");
    assert!(!stderr.contains("TOLLGATE_TEST_UNSET_ADMIN=") && !stderr.contains("sk-"));
}

const BROKEN_APIS: &str = r#"
[[backends]]
name = "claude"
api = "anthropic"
base_url = "http://127.0.0.1:9/v1"
native_apis = ["responses"]
model = "c"
quality = 0.9
pricing = { input_per_mtok = 3.0, output_per_mtok = 15.0, cache_write_per_mtok = 3.75 }

[[backends]]
name = "sim"
api = "anthropic"
simulate = {}
native_apis = ["completions"]
model = "s"
quality = 0.1
pricing = { hourly_usd = 0.1 }

[[backends]]
name = "odd"
api = "grpc"
base_url = "http://127.0.0.1:9/v1"
model = "o"
quality = 0.1
pricing = { hourly_usd = 0.1 }
"#;

#[test]
fn check_names_what_a_backend_cannot_speak() {
    let (_dir, path) = write_config(BROKEN_APIS);
    let output = tollgate(&["check", &path], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = [
        "6: backends[0].native_apis: an Anthropic backend does not serve the Responses API",
        "13: backends[1].api: a simulated backend speaks the OpenAI API only",
        "15: backends[1].native_apis: holds \"completions\": the APIs a backend may serve itself are \"responses\" and \"messages\"",
        "22: backends[2].api: must be \"openai\" or \"anthropic\", got \"grpc\"",
    ];
    for line in expected {
        let full = format!("{path}:{line}");
        assert!(stderr.lines().any(|l| l == full), "missing `{full}` in:\n{stderr}");
    }
    assert!(stderr.contains(&format!("{} problem(s) found", expected.len())), "{stderr}");
}

#[test]
fn check_reports_invalid_toml_with_its_line() {
    let (_dir, path) = write_config("[server]\nlisten = \"127.0.0.1:8080\"\nmax_body_bytes = \n");
    let output = tollgate(&["check", &path], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with(&format!("{path}:3: invalid TOML")), "{stderr}");
}

#[test]
fn check_reports_a_missing_file() {
    let output = tollgate(&["check", "/nonexistent/tollgate.toml"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/tollgate.toml: cannot read"));
}

#[test]
fn check_rejects_wrong_types_and_unknown_sections() {
    let text = "[sever]\nlisten = 1\n\n[[backends]]\nname = 7\nsimulate = { ttft_ms = 10 }\nmodel = \"m\"\n\
                quality = 0.5\npricing = { hourly_usd = 1 }\n\n[[users]]\nname = \"u\"\nkey_sha256 = \"abc\"\n\
                policy = \"cheapest\"\nbudget_period = \"week\"\n";
    let (_dir, path) = write_config(text);
    let stderr = String::from_utf8_lossy(&tollgate(&["check", &path], &[]).stderr).into_owned();
    for line in [
        "1: sever: unknown key `sever` (did you mean `server`?)",
        "5: backends[0].name: expected a string, found an integer",
        "13: users[0].key_sha256: must be 64 hex digits, the output of `tollgate hash-key`",
        "14: users[0].policy: `cheapest` is not one of \"quality-first\", \"cost-first\"",
        "15: users[0].budget_period: `week` is not one of \"day\", \"month\", \"total\"",
    ] {
        assert!(stderr.lines().any(|l| l == format!("{path}:{line}")), "missing `{line}` in:\n{stderr}");
    }
}

#[test]
fn check_refuses_credentials_in_a_base_url_without_echoing_them() {
    let text = "[[backends]]\nname = \"b\"\nbase_url = \"https://user:s3cret@api.example.com/v1\"\nmodel = \"m\"\n\
                quality = 0.5\npricing = { hourly_usd = 1 }\n";
    let (_dir, path) = write_config(text);
    let output = tollgate(&["check", &path], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{path}:3: backends[0].base_url: must not carry credentials (user:password@); give the backend's key with `api_key_env`"
    );
    assert!(stderr.lines().any(|l| l == expected), "missing `{expected}` in:\n{stderr}");
    assert!(!stderr.contains("s3cret"));
}

#[test]
fn hash_key_prints_the_lowercase_hex_sha256_of_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"tg-demo-quality-key\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    // printf %s tg-demo-quality-key | sha256sum
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "8eae327d4f0ad3b2bfc5dd5cd7e0d38b56a58aace19807a59dd57bee89445cf8\n"
    );
}

/// The README's first command: `tollgate serve` with no config file falls back to the embedded
/// defaults and answers a demo key within seconds.
#[test]
fn serve_without_a_config_file_answers_on_the_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut log = Vec::new();
    while addr.is_none() {
        let line = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("tollgate did not start");
        let plain: String = strip_ansi(&line);
        addr = plain.split("listen=").nth(1).map(|a| a.split_whitespace().next().unwrap().to_owned());
        log.push(plain);
    }
    assert!(log.iter().any(|l| l.contains("embedded demo defaults")), "{log:?}");
    let addr = addr.unwrap();
    let request = "{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    let response = http_post(&addr, "/v1/chat/completions", "tg-demo-cost-key", request);
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("x-tollgate-backend: sim-cpu"), "{response}");
    assert!(response.contains("Cheap answer"), "{response}");
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A minimal HTTP/1.1 POST over a plain socket (the test stays free of an async runtime).
fn http_post(addr: &str, path: &str, key: &str, body: &str) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
