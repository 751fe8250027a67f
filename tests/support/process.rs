//! A real `tollgate serve` process on 127.0.0.1:0, its stderr (the log) kept for inspection.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Process {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Standard output's lines: the access log.
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `tollgate serve --config tollgate.toml` in `dir` with `env` added.
    pub fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(["serve", "--config", "tollgate.toml", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let out_sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in out_lines.map_while(Result::ok) {
                out_sink.lock().unwrap().push(line);
            }
        });
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = loop {
            let line = lines.next().expect("tollgate exited before listening").unwrap();
            log.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, addr, log, stdout }
    }

    /// The access log's lines so far, once at least `want` are there (waits up to 5 s: the
    /// log is written in batches).
    pub fn access_lines(&self, want: usize) -> Vec<String> {
        for _ in 0..250 {
            let lines = self.stdout.lock().unwrap().clone();
            if lines.len() >= want {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stdout.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `signal` (e.g. "TERM") and waits up to `limit` for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        let step = Duration::from_millis(20);
        for _ in 0..=limit.as_millis() / step.as_millis() {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(step);
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
