//! Real `redis-server` children on free ports, and real `tollgate serve` processes: the parts
//! the scale-out tests run against. Every child is killed when its handle drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` of our own. Without persistence unless started with `persistent`.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Persistence directory (AOF on) — kept across a kill and a restart.
    dir: Option<tempfile::TempDir>,
    /// The working directory otherwise: a replica writes the snapshot it syncs from there,
    /// and a later server started in the same place would load it.
    scratch: tempfile::TempDir,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// `redis-server --port <free> --save '' --appendonly no`: hermetic, nothing on disk.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (`--requirepass`, ...).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// On `port`, with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self { port, child: None, dir: None, scratch: tempfile::tempdir().unwrap(), extra };
        server.spawn();
        server
    }

    /// With persistence (`appendonly yes`) in a temporary directory. `appendfsync always`:
    /// with `everysec` Redis may answer before it has written a command to the AOF (while a
    /// background fsync is slow), so a SIGKILL could lose acknowledged spend and make an exact
    /// count flaky; see the README.
    pub fn persistent() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let mut server = Self { port: free_port(), child: None, dir: Some(dir), scratch, extra: Vec::new() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match &self.dir {
            Some(dir) => {
                command.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"]).arg(dir.path());
            }
            None => {
                command.args(["--appendonly", "no", "--dir"]).arg(self.scratch.path());
            }
        }
        command.args(&self.extra);
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for this test: apt-get install redis-server (.ci/run does)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut answer = [0u8; 7];
        // `-NOAUTH` also proves it is up (a server with `--requirepass`).
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && matches!(answer[0], b'+' | b'-')
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// On the same port (and directory, when persistent).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of our own on 127.0.0.1: `primaries` primaries with a replica each, quick
/// to fail over (`cluster-node-timeout 1000`), behind `password`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    password: String,
    _dir: tempfile::TempDir,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub fn start(primaries: usize, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<RedisServer> = (0..primaries * 2)
            .map(|_| {
                let port = free_cluster_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let conf = conf.to_str().unwrap();
                let log = dir.path().join(format!("redis-{port}.log"));
                let log = log.to_str().unwrap();
                // No 5 s wait before a replica's first sync: a replica that never synced
                // cannot take over.
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf,
                    "--cluster-node-timeout",
                    "1000",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--logfile",
                    log,
                ];
                let auth = ["--requirepass", password, "--masterauth", password];
                RedisServer::start_on(port, &[&args[..], &auth[..]].concat())
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = Command::new("redis-cli")
            .args(["-a", password, "--no-auth-warning", "--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is needed for this test (Debian's redis-tools, with redis-server)");
        let cluster = Self { nodes, password: password.to_owned(), _dir: dir };
        if !created.status.success() {
            let known: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| format!("{}: {}", n.port, cluster.cli(n.port, &["CLUSTER", "NODES"])))
                .collect();
            panic!("redis-cli --cluster create: {}\n{known:?}", String::from_utf8_lossy(&created.stdout));
        }
        for _ in 0..400 {
            let ok = cluster.nodes.iter().all(|n| {
                let replication = cluster.cli(n.port, &["INFO", "replication"]);
                cluster.cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && (replication.contains("role:master") || replication.contains("master_link_status:up"))
            });
            if ok {
                return cluster;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    /// `redis-cli` against the node on `port`: its answer as text.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-a", &self.password, "--no-auth-warning", "-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect()
    }

    /// The port of the primary that serves `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let any = self.nodes.iter().find(|n| n.child.is_some()).unwrap().port;
        let slot: u16 = self.cli(any, &["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap();
        for line in self.cli(any, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(f), Ok(t)) if f <= slot && slot <= t)
            });
            if owns {
                return fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }

    pub fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self._dir.path().join(format!("redis-{port}.log"))).unwrap_or_default()
    }

    /// SIGKILL of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap().kill();
    }
}

/// A `redis-server --sentinel` of our own, watching one master on 127.0.0.1 and quick to
/// judge it down (1 s), as a test needs.
pub struct SentinelServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl SentinelServer {
    /// Watches `master` at `127.0.0.1:<primary_port>` with `quorum`; `password` is the
    /// primary's and its replicas' (`sentinel auth-pass`).
    pub fn start(master: &str, primary_port: u16, quorum: u32, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // A sentinel rewrites its config file as it learns: it must be its own, writable one.
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n\
             sentinel auth-pass {master} {password}\n\
             sentinel down-after-milliseconds {master} 1000\n\
             sentinel failover-timeout {master} 10000\n\
             sentinel parallel-syncs {master} 1\n",
            dir.path().display()
        );
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (in sentinel mode) is needed for this test: apt-get install redis-server");
        let sentinel = Self { port, child, _dir: dir };
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return sentinel;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis sentinel on port {port} did not start");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        let url = format!("redis://{}", self.address());
        redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `tollgate serve` process on 127.0.0.1:0.
pub struct Replica {
    child: Child,
    pub addr: String,
    _dir: PathBuf,
}

impl Replica {
    /// Serves `config` (written to `dir/<name>.toml`), with the test admin key.
    pub fn start(dir: &Path, name: &str, config: &str) -> Self {
        Self::start_with_env(dir, name, config, &[])
    }

    /// With more environment variables.
    pub fn start_with_env(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        // TOLLGATE_BIN: a copy of the binary, when the target directory is shared with another
        // checkout that may rebuild `tollgate` while these tests run.
        let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_owned());
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1")
            .env("TEST_ADMIN_KEY", super::ADMIN_KEY)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else { panic!("tollgate exited:\n{}", said.join("\n")) };
            said.push(line.clone());
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // TOLLGATE_TEST_LOGS=1 shows the gateways' logs in the test's output.
        let show = std::env::var_os("TOLLGATE_TEST_LOGS").is_some();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if show {
                    eprintln!("gateway: {line}");
                }
            }
        });
        Self { child, addr, _dir: dir.to_owned() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One `ten_dollar_request` with `key`.
    pub async fn chat(&self, key: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ten_dollar_request())
            .send()
            .await
            .unwrap()
    }

    pub async fn usage(&self, user: &str) -> serde_json::Value {
        let response = reqwest::Client::new()
            .get(self.url(&format!("/admin/usage/{user}")))
            .bearer_auth(super::ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// An admin call with the test admin key: (status, JSON body or null).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .request(method, self.url(path))
            .bearer_auth(super::ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        super::metric_value(&text, name, &[])
    }
}

/// The `[[backends]]` and `[[routes]]` of the scale-out tests: one simulated backend that
/// answers every request with `max_tokens` tokens at $1 each (prompt free), on route `auto`.
pub fn simulated_backend() -> String {
    format!(
        "[[backends]]\nname = \"sim\"\nmodel = \"sim\"\nquality = 0.5\nmax_concurrency = 512\ntimeout_s = 10\n\
         simulate = {{ ttft_ms = 5, tokens_per_s = 2000, quality_text = \"{}\" }}\n\
         pricing = {{ input_per_mtok = 0, output_per_mtok = 1000000 }}\n\n\
         [[routes]]\nmodel = \"auto\"\nbackends = [\"sim\"]\n\n",
        "word ".repeat(40).trim_end()
    )
}

/// `account`'s spend (dollars) and requests in its current period, read straight from Redis
/// (`<prefix>{account}:spend:<start>`, whatever the start).
pub async fn redis_spend(client: &mut redis::aio::MultiplexedConnection, prefix: &str, account: &str) -> (f64, u64) {
    use redis::AsyncCommands;
    let keys: Vec<String> = client.keys(format!("{prefix}{{{account}}}:spend:*")).await.unwrap();
    let mut spent_pico = 0i64;
    let mut requests = 0u64;
    for key in keys {
        spent_pico += client.hget::<_, _, Option<i64>>(&key, "spent").await.unwrap().unwrap_or(0);
        requests += client.hget::<_, _, Option<u64>>(&key, "requests").await.unwrap().unwrap_or(0);
    }
    (spent_pico as f64 / 1e12, requests)
}

/// What a [`ten_dollar_request`] costs on [`simulated_backend`]: the estimate equals the cost.
pub const REQUEST_COST_USD: f64 = 10.0;

/// A gateway config on a Redis ledger: the test admin key, a deep wait queue, `[ledger]` with
/// `backend = "redis"` and the `ledger` lines, the [`simulated_backend`], then `rest` (plans,
/// users).
pub fn redis_gateway_config(ledger: &str, rest: &str) -> String {
    format!(
        "[server]\nadmin_key_env = \"TEST_ADMIN_KEY\"\nmax_queue = 1024\nqueue_timeout_ms = 10000\n\n\
         [ledger]\nbackend = \"redis\"\n{ledger}\n\n{}{rest}",
        simulated_backend()
    )
}

/// A chat request of 10 tokens: $10 on [`simulated_backend`].
pub fn ten_dollar_request() -> serde_json::Value {
    serde_json::json!({"model": "auto", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

/// What one request of [`load`] got: the index of the key it used, when it ended, its status
/// and its error code.
pub type Outcome = (usize, tokio::time::Instant, u16, String);

/// Chat requests (10 tokens of the simulated backend) from `workers` loops, worker `w` on
/// `replicas[w % n]` with `keys[w % k]`, 5 ms apart, until `true` is sent; every outcome.
pub fn load(
    replicas: &[Replica],
    keys: &[String],
    workers: usize,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Vec<Outcome>>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let urls: Vec<String> = replicas.iter().map(|r| r.url("/v1/chat/completions")).collect();
    let keys = keys.to_vec();
    let body = ten_dollar_request();
    let handle = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let (client, url, stopped, body) =
                    (client.clone(), urls[w % urls.len()].clone(), stopped.clone(), body.clone());
                let (index, key) = (w % keys.len(), keys[w % keys.len()].clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !*stopped.borrow() {
                        let response = client.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
                        let status = response.status().as_u16();
                        let answer: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
                        let code = answer["error"]["code"].as_str().unwrap_or_default().to_owned();
                        seen.push((index, tokio::time::Instant::now(), status, code));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    (stop, handle)
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
