#!/usr/bin/env python3
"""The tenants-at-scale benchmark (benches/scale/run.sh; results in docs/PERFORMANCE.md).

For each store (SQLite, Redis): a gateway whose store holds N API users with one key each
("scale") beside a gateway with 10 config users and no API users ("base"), same config
otherwise, same mock upstream, measured in alternating rounds of one run:

- start to ready, idle RSS and /metrics size with N users stored;
- a key's first request against the same keys once cached (c=1, p50/p99);
- RPS at c=64 over 10,000 distinct API keys against RPS over the 10 config users' keys;
- the same load with and without a flood of 10,000 unknown keys per second beside it, and the
  store lookups the flood caused (`tollgate_principal_cache_total{result="miss"}`);
- 10,000 users and keys created through the admin API, then listed page by page;
- `tollgate report` (table and JSON) over every user stored (SQLite: the CLI reads the file).
"""

import argparse
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "load"))
from harness import cpu_seconds, free_port, status_kib, wait_port  # noqa: E402

ADMIN_KEY = "tg-scale-bench-admin-key"
HOT_KEYS = 10_000
FRESH_KEYS = 20_000

CONFIG = """
[server]
admin_key_env = "TOLLGATE_ADMIN_KEY"
max_connections = 8192
max_queue = 4096

{ledger}

[[backends]]
name = "mock-premium"
tier = "quality"
base_url = "{upstream}/v1"
model = "mock-model"
quality = 0.9
context_window = 131072
max_concurrency = 2048
pricing = {{ input_per_mtok = 0.60, output_per_mtok = 2.40 }}

[[backends]]
name = "mock-cpu"
tier = "economy"
base_url = "{upstream}/v1"
model = "mock-small"
quality = 0.35
context_window = 8192
max_concurrency = 2048
pricing = {{ hourly_usd = 0.12 }}

[[routes]]
model = "auto"
backends = ["mock-premium", "mock-cpu"]

# The API users' plan: the same limits as the config users below.
[[plans]]
name = "basic"
price_usd = 5.0
policy = "quality-first"
budget_usd = 100000.0
budget_period = "month"

[[plans]]
name = "api"
price_usd = 5.0
policy = "quality-first"
budget_usd = 100000.0
budget_period = "month"
{users}
"""

CONFIG_USER = """
[[users]]
name = "config-{i}"
key_sha256 = "{sha}"
policy = "quality-first"
budget_usd = 100000.0
budget_period = "month"
"""


def bench_key(i):
    """User i's key, as seed_tenants derives it."""
    return "tg-" + hashlib.sha256(f"tollgate-scale-bench:{i}".encode()).hexdigest()


def config_key(i):
    return f"tg-scale-config-user-{i}"


class Run:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="tollgate-scale-")
        self.procs = {}
        self.bins = args.bin_dir

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name):
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, name, ledger, users):
        text = CONFIG.format(ledger=ledger, upstream=self.upstream, users=users)
        return self.write(f"{name}.toml", text)

    def gateway(self, name, config):
        """Starts a gateway; returns (port, seconds from spawn to ready)."""
        port = free_port()
        started = time.monotonic()
        self.start(name, [f"{self.bins}/tollgate", "serve", "--config", config, "--listen", f"127.0.0.1:{port}"],
                   env={"TOLLGATE_ADMIN_KEY": ADMIN_KEY, "TOLLGATE_LOG": "warn"})
        deadline = started + 120
        while time.monotonic() < deadline:
            try:
                if get(port, "/readyz", key="")[0] == 200:
                    return port, time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.01)
        raise SystemExit(f"{name} was not ready within 120 s")

    def load(self, port, keys_file, concurrency, duration, extra=()):
        argv = [f"{self.bins}/examples/load_client", "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
                "--keys-file", keys_file, "--concurrency", str(concurrency), "--duration-s", str(duration),
                "--warmup-s", "0", "--threads", "1", *extra]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
        return json.loads(out.stdout)

    def load_with_cpu(self, name, port, keys_file, concurrency, duration, extra=()):
        pid = self.procs[name].pid
        before = cpu_seconds(pid)
        result = self.load(port, keys_file, concurrency, duration, extra)
        used = cpu_seconds(pid) - before
        result["cpu_us_per_req"] = used / result["all"] * 1e6 if result["all"] else float("nan")
        return result


def get(port, path, key=ADMIN_KEY):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def metric(text, name, labels=""):
    """Sum of the samples of `name` whose labels contain `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port):
    status, body = get(port, "/metrics")
    assert status == 200, status
    return body.decode()


def admin_create(port, users, threads, prefix):
    """Creates `users` users on plan `api` with a key each through the admin API, from `threads`
    connections; returns seconds taken and keys received."""
    names = [f"{prefix}-{i}" for i in range(users)]
    errors, keys = [], []
    lock = threading.Lock()

    def worker(slice_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
        for name in slice_:
            conn.request("POST", "/admin/users", body=json.dumps({"name": name, "plan": "api"}), headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 201:
                errors.append((name, r.status))
                continue
            conn.request("POST", f"/admin/users/{name}/keys", body="{}", headers=headers)
            r = conn.getresponse()
            body = r.read()
            if r.status != 201:
                errors.append((name, r.status))
                continue
            with lock:
                keys.append(json.loads(body)["key"])
        conn.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(names[t::threads],)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.monotonic() - started
    if errors:
        raise SystemExit(f"admin API creation failed for {len(errors)} users, e.g. {errors[:3]}")
    return seconds, keys


def admin_list(port, plan, limit):
    """Every user on `plan`, page by page; (names, pages, seconds)."""
    names, cursor, pages = [], None, 0
    started = time.monotonic()
    while True:
        path = f"/admin/users?plan={plan}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = get(port, path)
        assert status == 200, (status, body[:200])
        page = json.loads(body)
        names += [u["name"] for u in page["data"]]
        pages += 1
        cursor = page.get("next_cursor")
        if not cursor:
            return names, pages, time.monotonic() - started


def redis_stats(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "stats"], capture_output=True, text=True, check=True)
    get = lambda name: int(re.search(rf"{name}:(\d+)", out.stdout).group(1))  # noqa: E731
    stats = {k: get(k) for k in ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")}
    cpu = subprocess.run(["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True, check=True)
    seconds = sum(float(m) for m in re.findall(r"used_cpu_(?:user|sys):([\d.]+)", cpu.stdout))
    stats["cpu_us"] = seconds * 1e6
    return stats


def redis_info(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "memory"], capture_output=True, text=True, check=True)
    used = re.search(r"used_memory:(\d+)", out.stdout)
    keys = subprocess.run(["redis-cli", "-p", str(port), "DBSIZE"], capture_output=True, text=True, check=True)
    return {"used_memory_mib": int(used.group(1)) / 2**20 if used else None, "keys": int(keys.stdout.strip() or 0)}


def measure_store(run, store, report):
    a = run.args
    out = {"store": store, "users": a.users}
    if store == "sqlite":
        scale_ledger = f'[ledger]\nbackend = "sqlite"\npath = "{run.tmp}/scale.db"'
        base_ledger = f'[ledger]\nbackend = "sqlite"\npath = "{run.tmp}/base.db"'
        spread_ledger = f'[ledger]\nbackend = "sqlite"\npath = "{run.tmp}/spread.db"'
    else:
        port = free_port()
        run.start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no"])
        wait_port(port, 10, "redis-server")
        run.redis_port = port
        scale_ledger = f'[ledger]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}"\nkey_prefix = "scale:"'
        base_ledger = f'[ledger]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}"\nkey_prefix = "base:"'
        spread_ledger = f'[ledger]\nbackend = "redis"\nurl = "redis://127.0.0.1:{port}"\nkey_prefix = "spread:"'
    config_users = [CONFIG_USER.format(i=i, sha=hashlib.sha256(config_key(i).encode()).hexdigest())
                    for i in range(HOT_KEYS)]
    scale_conf = run.config(f"scale-{store}", scale_ledger, "")
    base_conf = run.config(f"base-{store}", base_ledger, "".join(config_users[:10]))
    # 10k config users: traffic as spread as the API keys', through the config's own key table.
    spread_conf = run.config(f"spread-{store}", spread_ledger, "".join(config_users))

    print(f"[{store}] seeding {a.users} users ...", flush=True)
    seed = subprocess.run([f"{run.bins}/examples/seed_tenants", "--config", scale_conf, "--users", str(a.users)],
                          capture_output=True, text=True, env={**os.environ, "TOLLGATE_ADMIN_KEY": ADMIN_KEY},
                          check=True)
    out["seed"] = json.loads(seed.stdout)
    if store == "sqlite":
        out["file_mib"] = sum(os.path.getsize(f"{run.tmp}/{f}") for f in os.listdir(run.tmp)
                              if f.startswith("scale.db")) / 2**20
    else:
        out["redis_after_seed"] = redis_info(run.redis_port)
    print(f"[{store}] seeded: {out['seed']}", flush=True)

    scale_name, base_name, spread_name = f"scale-{store}", f"base-{store}", f"spread-{store}"
    scale_port, out["start_s"] = run.gateway(scale_name, scale_conf)
    base_port, out["base_start_s"] = run.gateway(base_name, base_conf)
    spread_port, _ = run.gateway(spread_name, spread_conf)
    time.sleep(2)
    out["rss_idle_mib"] = status_kib(run.procs[scale_name].pid, "VmRSS") / 1024
    out["base_rss_idle_mib"] = status_kib(run.procs[base_name].pid, "VmRSS") / 1024
    text = scrape(scale_port)
    out["metrics_bytes"], out["metrics_lines"] = len(text.encode()), text.count("\n")

    hot = run.write("hot.keys", "\n".join(bench_key(i * (a.users // HOT_KEYS)) for i in range(HOT_KEYS)) + "\n")
    # Keys not in the hot set (odd indices): each is seen for the first time by this gateway.
    fresh = [bench_key((a.users // 2 + 2 * i + 1) % a.users) for i in range(FRESH_KEYS)]
    fresh_file = run.write(f"fresh-{store}.keys", "\n".join(fresh) + "\n")
    config_keys = run.write("config.keys", "\n".join(config_key(i) for i in range(10)) + "\n")
    spread_keys = run.write("spread.keys", "\n".join(config_key(i) for i in range(HOT_KEYS)) + "\n")

    # First sight against cached, one request at a time (bounded so that no key comes twice).
    before = metric(scrape(scale_port), "tollgate_principal_cache_total", 'result="miss"')
    rss_before = status_kib(run.procs[scale_name].pid, "VmRSS")
    first = run.load(scale_port, fresh_file, 1, a.first_sight_s)
    rss_grew = status_kib(run.procs[scale_name].pid, "VmRSS") - rss_before
    misses = metric(scrape(scale_port), "tollgate_principal_cache_total", 'result="miss"') - before
    if first["all"] >= FRESH_KEYS:
        raise SystemExit(f"first-sight pass reused keys ({first['all']} requests over {FRESH_KEYS} keys)")
    cached = run.load(scale_port, fresh_file, 1, a.first_sight_s)
    config_c1 = run.load(base_port, config_keys, 1, a.first_sight_s)
    out["first_sight"] = {"first": first, "cached": cached, "config_users": config_c1, "misses": misses,
                          "rss_bytes_per_new_principal": rss_grew * 1024 / max(first["all"], 1)}

    # Hot path: 10k API keys against 10 config users, alternating rounds.
    run.load(scale_port, hot, 64, 2)  # every hot key resolved once, connections warm
    run.load(base_port, config_keys, 64, 1)
    run.load(spread_port, spread_keys, 64, 2)
    rounds = []
    gateways = [("base", base_name, base_port, config_keys), ("scale", scale_name, scale_port, hot),
                ("spread", spread_name, spread_port, spread_keys)]
    for r in range(a.rounds):
        # Each gateway goes first, second and third in turn: this host's speed drifts within
        # seconds, and a fixed order would hand the drift to one side.
        measured = {}
        for label, name, port, keys in gateways[r % 3:] + gateways[:r % 3]:
            measured[label] = run.load_with_cpu(name, port, keys, 64, a.duration)
        b, s, sp = measured["base"], measured["scale"], measured["spread"]
        rounds.append(measured)
        print(f"[{store}] round {r + 1}: 10 config users {b['rps']:.0f} RPS, {HOT_KEYS} API keys {s['rps']:.0f} RPS "
              f"({s['rps'] / b['rps']:.3f}x), {HOT_KEYS} config users {sp['rps']:.0f} RPS", flush=True)
    run.stop(spread_name)
    out["rounds"] = rounds
    if store == "redis":
        # What a request costs Redis: commands and bytes, API keys against config users.
        for name, port, keys in (("scale", scale_port, hot), ("base", base_port, config_keys)):
            before = redis_stats(run.redis_port)
            done = run.load(port, keys, 64, a.duration)["all"]
            after = redis_stats(run.redis_port)
            out[f"redis_per_request_{name}"] = {k: (after[k] - before[k]) / done for k in after}

    # Unknown-key flood beside the known keys.
    flood_keys = run.write("flood.keys", "\n".join("tg-" + secrets.token_hex(32) for _ in range(a.flood_keys)) + "\n")
    flood_rounds = []

    def flooded_load():
        """The known keys' load beside the flood; (load, flood client's report)."""
        argv = [f"{run.bins}/examples/flood_client", "--url", f"http://127.0.0.1:{scale_port}/v1/chat/completions",
                "--keys-file", flood_keys, "--connections", "64", "--rate", str(a.flood_rate), "--expect-status",
                "401", "--duration-s", str(a.duration + 1.0)]
        flood = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        loud = run.load(scale_port, hot, 64, a.duration)
        flood_out = flood.stdout.read()
        # Reaped here for its CPU time: the flood's own share of the two cores.
        _, _, usage = os.wait4(flood.pid, 0)
        flooded = json.loads(flood_out)
        flooded["client_cpu_us_per_req"] = (usage.ru_utime + usage.ru_stime) / max(flooded["all"], 1) * 1e6
        return loud, flooded

    for r in range(a.flood_rounds):
        before = metric(scrape(scale_port), "tollgate_principal_cache_total", 'result="miss"')
        # Quiet first in even rounds, flooded first in odd ones (the host's speed drifts).
        if r % 2 == 0:
            quiet = run.load(scale_port, hot, 64, a.duration)
            loud, flooded = flooded_load()
        else:
            loud, flooded = flooded_load()
            quiet = run.load(scale_port, hot, 64, a.duration)
        misses = metric(scrape(scale_port), "tollgate_principal_cache_total", 'result="miss"') - before
        flood_rounds.append({"quiet": quiet, "flooded": loud, "flood": flooded, "misses": misses})
        print(f"[{store}] flood round {r + 1}: {quiet['rps']:.0f} RPS quiet, {loud['rps']:.0f} RPS beside "
              f"{flooded['rps']:.0f} unknown-key requests/s ({loud['rps'] / quiet['rps']:.3f}x); "
              f"{misses:.0f} store lookups; flood client {flooded['client_cpu_us_per_req']:.1f} µs/request",
              flush=True)
    out["flood"] = flood_rounds
    # What one unknown-key request costs the gateway, alone (every key already remembered).
    alone = run.load_with_cpu(scale_name, scale_port, flood_keys, 32, 2, ["--expect-status", "401"])
    out["unknown_key_cpu_us"] = alone["cpu_us_per_req"]

    out["rss_after_load_mib"] = status_kib(run.procs[scale_name].pid, "VmRSS") / 1024
    text = scrape(scale_port)
    out["metrics_bytes_after"], out["metrics_lines_after"] = len(text.encode()), text.count("\n")

    # The admin API.
    seconds, keys = admin_create(scale_port, a.admin_users, 8, f"api-{store}")
    names, pages, list_s = admin_list(scale_port, "api", 1000)
    expected = {f"api-{store}-{i}" for i in range(a.admin_users)}
    out["admin"] = {"users": a.admin_users, "create_s": seconds, "keys": len(keys), "listed": len(names),
                    "unique": len(set(names)), "exact": set(names) == expected, "pages": pages, "list_s": list_s}
    print(f"[{store}] admin: {out['admin']}", flush=True)
    if store == "redis":
        out["redis_after"] = redis_info(run.redis_port)
    # `tollgate report` over every stored user.
    out["report"] = {fmt: report_cli(run, scale_conf, fmt) for fmt in ("table", "json")}
    print(f"[{store}] report: {out['report']}", flush=True)
    run.stop(scale_name)
    run.stop(base_name)
    run.stop("redis")
    report[store] = out


def report_cli(run, config, fmt):
    """`tollgate report` (`fmt`: table or json) on `config`'s ledger: seconds, peak RSS, output size."""
    argv = [f"{run.bins}/tollgate", "report", "--config", config] + (["--json"] if fmt == "json" else [])
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    size = sum(len(chunk) for chunk in iter(lambda: proc.stdout.read(1 << 20), b""))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"tollgate report ({fmt}) failed: {status}")
    return {"seconds": time.monotonic() - started, "max_rss_mib": usage.ru_maxrss / 1024, "bytes": size}


def median(values):
    return statistics.median(values) if values else float("nan")


def table(report):
    rows = ["| figure | target | " + " | ".join(report) + " |", "|---|---|" + "---|" * len(report)]

    def row(label, target, fmt):
        rows.append(f"| {label} | {target} | " + " | ".join(fmt(r) for r in report.values()) + " |")

    row("users stored (one key each)", "1,000,000", lambda r: f"{r['users']:,}")
    row("seeding through the store code", "-", lambda r: f"{r['seed']['seconds']:.0f} s")
    row("start to ready", "≤ 2 s", lambda r: f"{r['start_s']:.2f} s (10 config users: {r['base_start_s']:.2f} s)")
    row("RSS idle", "≤ 256 MiB", lambda r: f"{r['rss_idle_mib']:.1f} MiB (10 config users: {r['base_rss_idle_mib']:.1f})")
    row("`/metrics`", "≤ 1 MB", lambda r: f"{r['metrics_bytes'] / 1e3:.1f} kB, {r['metrics_lines']} lines; "
        f"{r['metrics_bytes_after'] / 1e3:.1f} kB after the load")

    def hot(r):
        ratios = [x["scale"]["rps"] / x["base"]["rps"] for x in r["rounds"]]
        b = median([x["base"]["rps"] for x in r["rounds"]])
        s = median([x["scale"]["rps"] for x in r["rounds"]])
        cb = median([x["base"]["cpu_us_per_req"] for x in r["rounds"]])
        cs = median([x["scale"]["cpu_us_per_req"] for x in r["rounds"]])
        return (f"{s:,.0f} vs {b:,.0f}: **{s / b:.3f}×** (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
                f"CPU/request {cs:.1f} vs {cb:.1f} µs")
    row("RPS at c=64, 10k API keys ÷ 10 config users", "≥ 0.95", hot)

    def spread(r):
        ratios = [x["scale"]["rps"] / x["spread"]["rps"] for x in r["rounds"]]
        sp = median([x["spread"]["rps"] for x in r["rounds"]])
        cs = median([x["spread"]["cpu_us_per_req"] for x in r["rounds"]])
        return (f"10k config users {sp:,.0f} RPS, {cs:.1f} µs/request; API keys ÷ them **{median(ratios):.3f}×** "
                f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    row("the same spread through the config: 10k config users", "-", spread)

    def first(r):
        f = r["first_sight"]
        return (f"p50 {f['first']['p50_ms']:.3f} / p99 {f['first']['p99_ms']:.3f} ms first; "
                f"{f['cached']['p50_ms']:.3f} / {f['cached']['p99_ms']:.3f} ms cached "
                f"(config user {f['config_users']['p50_ms']:.3f} / {f['config_users']['p99_ms']:.3f}): "
                f"**+{f['first']['p99_ms'] - f['cached']['p99_ms']:.3f} ms p99**; "
                f"{f['misses']:.0f} lookups for {f['first']['all']} keys")
    row("a key's first request, c=1", "≤ +1 ms p99", first)

    def flood(r):
        ratios = [x["flooded"]["rps"] / x["quiet"]["rps"] for x in r["flood"]]
        rate = median([x["flood"]["rps"] for x in r["flood"]])
        misses = sum(x["misses"] for x in r["flood"])
        sent = sum(x["flood"]["all"] for x in r["flood"])
        client = median([x["flood"]["client_cpu_us_per_req"] for x in r["flood"]])
        return (f"**{median(ratios):.3f}×** (rounds {', '.join(f'{x:.2f}' for x in ratios)}) beside "
                f"{rate:,.0f} unknown-key requests/s; {misses:.0f} store lookups for {sent:,} requests "
                f"over {len(r['flood'])} rounds of the same {r['flood_keys']:,} keys; the flood client's own CPU "
                f"{client:.1f} µs per request")
    row("known-key RPS under an unknown-key flood ÷ without", "≥ 0.90; ≤ 1 lookup/key/min", flood)
    row("gateway CPU per unknown-key request (401)", "-", lambda r: f"{r['unknown_key_cpu_us']:.1f} µs")
    row("create users + keys through the API (8 connections)", "10k in ≤ 10 s",
        lambda r: f"{r['admin']['users']:,} in **{r['admin']['create_s']:.2f} s**; listed in "
        f"{r['admin']['pages']} pages, {r['admin']['list_s']:.2f} s, each once: {r['admin']['exact']}")
    row("`tollgate report` over every stored user (table; `--json`)", "-",
        lambda r: "; ".join(f"{r['report'][f]['seconds']:.1f} s, {r['report'][f]['max_rss_mib']:.0f} MiB peak, "
                            f"{r['report'][f]['bytes'] / 1e6:.0f} MB out" for f in ("table", "json"))
        if "report" in r else "-")
    row("RSS after all of it", "-", lambda r: f"{r['rss_after_load_mib']:.1f} MiB")
    row("RSS growth per key first seen", "-",
        lambda r: f"{r['first_sight']['rss_bytes_per_new_principal']:,.0f} bytes")
    for r in report.values():
        for name in ("scale", "base"):
            per = r.get(f"redis_per_request_{name}")
            if per:
                rows.append(f"\nRedis per request ({'API keys' if name == 'scale' else 'config users'}): "
                            f"{per['total_commands_processed']:.2f} commands, "
                            f"{per['total_net_input_bytes']:.0f} bytes in, {per['total_net_output_bytes']:.0f} out, "
                            f"{per['cpu_us']:.1f} µs of Redis CPU.")
    for r in report.values():
        if "redis_after_seed" in r:
            rows.append(f"\nRedis after seeding: {r['redis_after_seed']['used_memory_mib']:.0f} MiB, "
                        f"{r['redis_after_seed']['keys']:,} keys; after the run: "
                        f"{r['redis_after']['used_memory_mib']:.0f} MiB, {r['redis_after']['keys']:,} keys.")
        if "file_mib" in r:
            rows.append(f"\nSQLite file after seeding: {r['file_mib']:.0f} MiB.")
    return "\n".join(rows) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--stores", default="sqlite,redis")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--first-sight-s", type=float, default=1.5)
    p.add_argument("--flood-rounds", type=int, default=6)
    p.add_argument("--flood-rate", type=int, default=10_000)
    p.add_argument("--flood-keys", type=int, default=10_000)
    p.add_argument("--admin-users", type=int, default=10_000)
    p.add_argument("--out", default="benches/scale/out")
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args()
    run = Run(a)
    report = {}
    try:
        run.upstream_port = free_port()
        run.upstream = f"http://127.0.0.1:{run.upstream_port}"
        run.start("mock", [f"{run.bins}/examples/mock_upstream", "--listen", f"127.0.0.1:{run.upstream_port}"])
        wait_port(run.upstream_port, 10, "mock upstream")
        for store in a.stores.split(","):
            measure_store(run, store, report)
            report[store]["flood_keys"] = a.flood_keys
    finally:
        run.stop_all()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = table(report)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
