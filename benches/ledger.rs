//! The ledger round trip of one request on each store: `reserve` (awaited, as dispatch does)
//! then `settle` (fire-and-forget, as the meter does), with a `flush` at the end of each
//! batch so that the settlements' own cost is in the figure too (SQLite's group commit,
//! Redis's script round trip). `cargo bench --bench ledger`.
//!
//! Redis: a `redis-server` of its own on a free port (`--save '' --appendonly no`), then a
//! Redis Cluster of three such primaries (`redis-cli --cluster create`), or a printed note and
//! no figure when the binaries are not installed.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tollgate::config::Config;
use tollgate::cost::Usd;
use tollgate::ledger::{Budgets, Ledger, RequestRecord, Reserve};
use tollgate::metrics::Metrics;

const BATCHES: usize = 9;
const NOW: i64 = 1_795_867_200;

fn config(ledger: &str) -> Config {
    let text = format!(
        "[ledger]\n{ledger}\n\n[[backends]]\nname = \"sim\"\nsimulate = {{ ttft_ms = 1 }}\nmodel = \"sim\"\nquality = 0.5\n\
         pricing = {{ input_per_mtok = 1, output_per_mtok = 1 }}\n\n\
         [[users]]\nname = \"bench\"\nkey_sha256 = \"{}\"\nbudget_usd = 1000000\n",
        "cd".repeat(32)
    );
    match Config::parse(&text, "bench.toml", &|_: &str| None) {
        Ok(config) => config,
        Err(e) => panic!("bench config: {e}"),
    }
}

fn record() -> RequestRecord {
    RequestRecord {
        at_ms: NOW * 1000,
        user: "bench".into(),
        route: "auto".into(),
        backend: "sim".into(),
        reason: "cost-first".into(),
        prompt_tokens: 20,
        completion_tokens: 30,
        cost: Usd::from_pico(40),
        status: 200,
        latency_ms: 3,
        request_id: tollgate::telemetry::RequestId::from_stored("0123456789abcdef0123456789abcdef"),
    }
}

async fn round_trips(ledger: &Arc<dyn Ledger>, config: &Config, n: u32) {
    let budgets = Budgets::of_user(&config.users[0]);
    for _ in 0..n {
        match ledger.reserve(&budgets, Usd::from_pico(50), NOW).await {
            Ok(Reserve::Reserved { id, .. }) => ledger.settle(&budgets, id, Usd::from_pico(50), record(), NOW),
            other => panic!("reserve: {other:?}"),
        }
    }
    if let Err(e) = ledger.flush().await {
        panic!("flush: {e}");
    }
}

#[expect(clippy::disallowed_methods, reason = "a benchmark measures wall time on purpose")]
async fn measure(name: &str, ledger: Arc<dyn Ledger>, config: &Config, iterations: u32) {
    // `cargo test --all-targets` runs benches without `--bench`: one pass proves they work.
    if !std::env::args().any(|a| a == "--bench") {
        round_trips(&ledger, config, 3).await;
        return;
    }
    round_trips(&ledger, config, iterations / 10).await;
    let mut per_op = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let start = std::time::Instant::now();
        round_trips(&ledger, config, iterations).await;
        per_op.push(start.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    per_op.sort_by(f64::total_cmp);
    println!("{name:<44} {:>10.0} ns/op (median of {BATCHES} batches of {iterations})", per_op[BATCHES / 2]);
}

fn open(config: &Config) -> Arc<dyn Ledger> {
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(e) => panic!("metrics: {e}"),
    };
    match tollgate::ledger::open(&config.ledger, &metrics) {
        Ok((ledger, _)) => ledger,
        Err(e) => panic!("ledger: {e}"),
    }
}

struct RedisChild(Child);

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free port, answering; `None` when it is not installed.
fn start_redis() -> Option<(RedisChild, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let child = RedisChild(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> Option<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Some(port);
        }
    }
    None
}

/// A Redis Cluster of three primaries (no replicas) in `dir`, answering; `None` when
/// `redis-server` or `redis-cli` is missing or the cluster does not form.
fn start_cluster(dir: &std::path::Path) -> Option<(Vec<RedisChild>, Vec<u16>)> {
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let port = free_cluster_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.join(format!("nodes-{port}.conf")))
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        children.push(RedisChild(child));
        if !(0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            return None;
        }
        ports.push(port);
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !created.success() {
        return None;
    }
    let ok = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "CLUSTER", "INFO"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        })
    });
    ok.then_some((children, ports))
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => panic!("runtime: {e}"),
    };
    runtime.block_on(async {
        let memory = config("backend = \"memory\"");
        measure("ledger round trip: memory", open(&memory), &memory, 200_000).await;

        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("bench.db");
        let sqlite = config(&format!("backend = \"sqlite\"\npath = \"{}\"", path.display()));
        measure("ledger round trip: sqlite", open(&sqlite), &sqlite, 50_000).await;

        match start_redis() {
            Some((_child, port)) => {
                let redis = config(&format!("backend = \"redis\"\nurl = \"redis://127.0.0.1:{port}\""));
                measure("ledger round trip: redis (localhost)", open(&redis), &redis, 5_000).await;
            }
            None => println!("ledger round trip: redis skipped: redis-server is not installed"),
        }
        match start_cluster(dir.path()) {
            Some((_children, ports)) => {
                let nodes = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect::<Vec<_>>().join(", ");
                let cluster = config(&format!("backend = \"redis\"\ncluster = [{nodes}]"));
                measure("ledger round trip: redis cluster, 3 primaries", open(&cluster), &cluster, 5_000).await;
            }
            None => println!("ledger round trip: redis cluster skipped: redis-server or redis-cli missing"),
        }
    });
}
