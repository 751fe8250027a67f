#!/usr/bin/env python3
"""The load harness: one run measures the same workload through (1) the mock upstream directly,
(2) nginx as a plain reverse proxy, (3) the LiteLLM proxy and (4) Tollgate with routing, budgets
(SQLite ledger), metering and metrics on: the profile-guided release build (scripts/build-pgo.sh)
and, as `tollgate-plain`, the plain `cargo build --release` one. Started by benches/load/run.sh,
which builds and installs what it needs; see docs/PERFORMANCE.md.

Everything listens on 127.0.0.1. Every client run is bounded in time (load_client stops at the
end of its window plus a grace); every server is stopped at exit.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CELLS = [("json", 1), ("json", 64), ("sse", 1), ("sse", 64)]
TARGETS = ["direct", "nginx", "hyper", "litellm", "tollgate", "tollgate-plain"]
# The same gateway twice: the build measured against the targets and the plain release build.
TOLLGATES = ("tollgate", "tollgate-plain")
TOLLGATE_KEY = "tg-load-harness-key"
ADMIN_KEY = "tg-load-harness-admin"
LITELLM_KEY = "sk-load-harness-master"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout, headers=None, what=""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception as e:  # noqa: BLE001 - any failure means "not up yet"
            last = e
        time.sleep(0.25)
    raise SystemExit(f"{what or url} did not come up within {timeout}s: {last}")


def wait_port(port, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {timeout}s")


def tree(pid):
    """pid and all its descendants (nginx workers, LiteLLM's worker processes)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    """utime + stime of the process tree, from /proc/<pid>/stat."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / CLK_TCK


def status_kib(pid, key):
    """Sum over the process tree of a /proc/<pid>/status field (VmRSS, VmHWM), in KiB."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


class Stack:
    """The servers of one harness run, stopped on exit whatever happens."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="tollgate-load-")
        self.procs = {}
        self.ports = {}

    def start(self, name, argv, env=None, log=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w") if log is None else log
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def stop(self):
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def up(self):
        a, bins = self.args, self.args.bin_dir
        for name in ("mock", "slow", "nginx", "hyper", "litellm") + TOLLGATES:
            self.ports[name] = free_port()
        mock = [f"{bins}/examples/mock_upstream", "--chunks", "32", "--latency-ms", str(a.latency_ms)]
        self.start("mock", mock + ["--listen", f"127.0.0.1:{self.ports['mock']}"])
        # The 1,000-open-streams run needs streams that stay open: 32 chunks 100 ms apart.
        self.start("slow", mock + ["--listen", f"127.0.0.1:{self.ports['slow']}", "--chunk-gap-us", "100000"])
        wait_port(self.ports["mock"], 10, "mock upstream")
        wait_port(self.ports["slow"], 10, "slow mock upstream")
        upstream = f"http://127.0.0.1:{self.ports['mock']}"

        if "nginx" in a.targets:
            conf = os.path.join(self.tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=self.tmp, port=self.ports["nginx"], upstream=self.ports["mock"]))
            self.start("nginx", [a.nginx, "-p", self.tmp, "-c", conf, "-g", "daemon off;"])
            wait_port(self.ports["nginx"], 10, "nginx")

        if "hyper" in a.targets:
            # The stack's floor: the same crates as Tollgate, proxying and nothing else.
            self.start("hyper", [f"{bins}/examples/bare_proxy", "--listen", f"127.0.0.1:{self.ports['hyper']}",
                                 "--upstream", f"127.0.0.1:{self.ports['mock']}"])
            wait_port(self.ports["hyper"], 10, "bare hyper proxy")

        if "litellm" in a.targets:
            conf = os.path.join(self.tmp, "litellm.yaml")
            with open(conf, "w") as f:
                f.write(LITELLM_CONF.format(upstream=upstream, key=LITELLM_KEY))
            env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
            self.start(
                "litellm",
                [a.litellm, "--config", conf, "--host", "127.0.0.1", "--port", str(self.ports["litellm"]),
                 "--num_workers", "2"],
                env=env,
            )
            wait_http(f"http://127.0.0.1:{self.ports['litellm']}/health/liveliness", 180, what="LiteLLM")

        key_sha256 = hashlib.sha256(TOLLGATE_KEY.encode()).hexdigest()
        binaries = {"tollgate": a.tollgate, "tollgate-plain": a.tollgate_plain}
        for name, binary in binaries.items():
            if name not in a.targets:
                continue
            conf = os.path.join(self.tmp, f"{name}.toml")
            with open(conf, "w") as f:
                f.write(TOLLGATE_CONF.format(
                    ledger=os.path.join(self.tmp, f"{name}.db"), upstream=upstream,
                    slow=f"http://127.0.0.1:{self.ports['slow']}", key_sha256=key_sha256))
            self.start(
                name,
                [binary, "serve", "--config", conf, "--listen", f"127.0.0.1:{self.ports[name]}"],
                env={"TOLLGATE_ADMIN_KEY": ADMIN_KEY, "TOLLGATE_LOG": "warn"},
            )
            wait_http(f"http://127.0.0.1:{self.ports[name]}/readyz", 20, what=name)

    def url(self, target):
        port = {"direct": self.ports["mock"]}.get(target) or self.ports[target]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def key(self, target):
        return TOLLGATE_KEY if target in TOLLGATES else {"litellm": LITELLM_KEY}.get(target)

    def pid(self, target):
        return self.procs["mock" if target == "direct" else target].pid


NGINX_CONF = """
worker_processes 2;
user root;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    # nginx closes a client connection after 1,000 requests by default; the load client
    # keeps its connections, as the other targets allow.
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream mock {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Streams go through as they come, as a gateway must pass them.
            proxy_buffering off;
        }}
    }}
}}
"""

LITELLM_CONF = """
model_list:
  - model_name: auto
    litellm_params:
      model: openai/mock-model
      api_base: {upstream}/v1
      api_key: mock
general_settings:
  master_key: {key}
litellm_settings:
  telemetry: false
"""

# Routing (two candidates, quality-first), a budget on the SQLite ledger, metering, metrics:
# the product's work, switched on.
TOLLGATE_CONF = """
[server]
admin_key_env = "TOLLGATE_ADMIN_KEY"
max_connections = 8192
max_queue = 4096

[ledger]
backend = "sqlite"
path = "{ledger}"

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

[[backends]]
name = "mock-slow"
tier = "quality"
base_url = "{slow}/v1"
model = "mock-model"
quality = 0.9
max_concurrency = 2048
pricing = {{ input_per_mtok = 0.60, output_per_mtok = 2.40 }}

[[routes]]
model = "auto"
backends = ["mock-premium", "mock-cpu"]

[[routes]]
model = "slow"
backends = ["mock-slow"]

[[users]]
name = "load"
key_sha256 = "{key_sha256}"
policy = "quality-first"
budget_usd = 100000.0
budget_period = "day"
"""


def client(stack, target, kind, concurrency, duration, warmup, extra=()):
    argv = [f"{stack.args.bin_dir}/examples/load_client", "--url", stack.url(target), "--concurrency",
            str(concurrency), "--duration-s", str(duration), "--warmup-s", str(warmup)]
    if stack.key(target):
        argv += ["--key", stack.key(target)]
    if kind == "sse":
        argv.append("--stream")
    argv += list(extra)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 90, check=True)
    return json.loads(out.stdout)


def measure_cell(stack, target, kind, concurrency):
    a = stack.args
    pid = stack.pid(target)
    # Slow targets get a longer window so that a run holds enough requests to count.
    duration = a.duration * (3 if target == "litellm" else 1)
    warm = client(stack, target, kind, concurrency, min(1.0, duration), 0)  # warm connections and caches
    before = cpu_seconds(pid)
    result = client(stack, target, kind, concurrency, duration, 0)
    used = cpu_seconds(pid) - before
    result["warm_all"] = warm["all"]
    result["cpu_s"] = used
    result["cpu_us_per_req"] = used / result["all"] * 1e6 if result.get("all") else float("nan")
    result["hwm_mib"] = status_kib(pid, "VmHWM") / 1024
    return result


def scrape(stack, path, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{stack.ports['tollgate']}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def metric_sum(text, name, match=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ ") and match in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def overhead_quantiles(text):
    """p50/p99 of tollgate_overhead_seconds, from its cumulative buckets (upper bounds)."""
    buckets = []
    for line in text.splitlines():
        m = re.match(r'tollgate_overhead_seconds_bucket\{.*le="([^"]+)"\} (\S+)', line)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
    merged = {}
    for le, n in buckets:
        merged[le] = merged.get(le, 0) + n
    ordered = sorted(merged.items())
    total = ordered[-1][1] if ordered else 0
    out = {}
    for q in (0.5, 0.99):
        out[q] = next((le for le, n in ordered if total and n >= q * total), float("nan"))
    return out, total


def median(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def run(args):
    stack = Stack(args)
    results = {t: {f"{k}-c{c}": [] for k, c in CELLS} for t in args.targets}
    summary = {"targets": args.targets, "runs": args.runs, "duration_s": args.duration}
    sent_to_tollgate = {"json": 0, "sse": 0}
    try:
        stack.up()
        idle_start = {t: status_kib(stack.pid(t), "VmRSS") / 1024 for t in args.targets}
        for r in range(args.runs):
            for kind, concurrency in CELLS:
                # Rotate the order so no target always runs right after the heaviest one.
                order = args.targets[r % len(args.targets):] + args.targets[: r % len(args.targets)]
                for target in order:
                    res = measure_cell(stack, target, kind, concurrency)
                    results[target][f"{kind}-c{concurrency}"].append(res)
                    print(f"run {r + 1} {kind:4} c{concurrency:<3} {target:9} rps {res['rps']:9.1f} "
                          f"p50 {res['p50_ms']:8.3f} ms p99 {res['p99_ms']:8.3f} ms cpu {res['cpu_us_per_req']:8.1f} "
                          f"us/req errors {res['errors']}", flush=True)
        # Every request that reached Tollgate (warm-ups included) must have been metered.
        metrics = scrape(stack, "/metrics")
        usage = json.loads(scrape(stack, "/admin/usage", {"Authorization": f"Bearer {ADMIN_KEY}"}))
        time.sleep(2)
        idle_after = {t: status_kib(stack.pid(t), "VmRSS") / 1024 for t in args.targets}
        hold = None
        if args.hold:
            hold = client(stack, "tollgate", "sse", 1, 0, 0,
                          ["--model", "slow", "--hold", str(args.hold), "--watch-pid", str(stack.pid("tollgate")),
                           "--hold-timeout-s", "60", "--threads", "2"])
            time.sleep(2)
            hold["idle_after_mib"] = status_kib(stack.pid("tollgate"), "VmRSS") / 1024
        metrics_after = scrape(stack, "/metrics")
        quantiles, observed = overhead_quantiles(metrics_after)
        summary["tollgate_metering"] = {
            "requests_total_200": metric_sum(metrics, "tollgate_requests_total", 'status="200"'),
            "requests_total_all": metric_sum(metrics, "tollgate_requests_total"),
            "usage_estimated_total": metric_sum(metrics, "tollgate_usage_estimated_total"),
            "admin_usage_requests": sum(u.get("requests", 0) for u in usage.get("data", [])),
            "client_completed": sum(x["all"] for cell in results.get("tollgate", {}).values() for x in cell)
            + sum(x.get("warm_all", 0) for cell in results.get("tollgate", {}).values() for x in cell),
        }
        summary["overhead_histogram"] = {"p50_le_s": quantiles[0.5], "p99_le_s": quantiles[0.99], "count": observed}
        summary["idle_start_mib"] = idle_start
        summary["idle_after_mib"] = idle_after
        summary["hold"] = hold
    finally:
        stack.stop()
    summary["results"] = results
    return summary


def table(summary):
    res = summary["results"]
    med = {t: {cell: {k: median([r[k] for r in runs]) for k in runs[0]} for cell, runs in cells.items() if runs}
           for t, cells in res.items()}
    lines = [
        "| cell | target | RPS | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req | CPU ÷ nginx | RPS ÷ nginx | RPS ÷ direct | peak RSS MiB | TTFB p50 ms | added TTFB ms | usage / [DONE] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, c in CELLS:
        cell = f"{kind}-c{c}"
        direct, nginx = med.get("direct", {}).get(cell), med.get("nginx", {}).get(cell)
        for t in summary["targets"]:
            m = med.get(t, {}).get(cell)
            if not m:
                continue
            runs = res[t][cell]
            ok_usage = sum(r["usage_ok"] for r in runs)
            ok_done = sum(r["done_ok"] for r in runs)
            n = sum(r["requests"] for r in runs)
            errors = sum(r["errors"] for r in runs)
            add = lambda k: f"{m[k] - direct[k]:+.3f}" if direct and t != "direct" else "–"  # noqa: E731
            ratio = lambda k, base: f"{m[k] / base[k]:.2f}" if base and base[k] else "–"  # noqa: E731
            ttfb = f"{m['ttfb_p50_ms']:.3f}" if kind == "sse" else "–"
            add_ttfb = add("ttfb_p50_ms") if kind == "sse" else "–"
            checks = f"{100 * ok_usage / n:.0f}% / {100 * ok_done / n:.0f}%" if n else "–"
            if errors:
                checks += f" ({errors} errors)"
            cpu_ratio = ratio("cpu_us_per_req", nginx) if t != "direct" else "–"
            lines.append(
                f"| {kind} c{c} | {t} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {add('p50_ms')} | "
                f"{add('p99_ms')} | {m['cpu_us_per_req']:.1f} | {cpu_ratio} | {ratio('rps', nginx)} | "
                f"{ratio('rps', direct)} | {m['hwm_mib']:.0f} | {ttfb} | {add_ttfb} | {checks} |"
            )
    return "\n".join(lines), med


def extras(summary, med):
    out = []
    idle = summary["idle_after_mib"]
    out.append("RSS at idle after the load (MiB): " + ", ".join(f"{t} {v:.1f}" for t, v in idle.items()))
    h = summary.get("hold")
    if h:
        out.append(
            f"Tollgate with {h['streams']} concurrent open streams: {h['opened']} opened, {h['complete']} complete "
            f"with usage and [DONE]; RSS {h['rss_all_open_kib'] / 1024:.1f} MiB with all open, peak "
            f"{h['max_rss_kib'] / 1024:.1f} MiB; {h['idle_after_mib']:.1f} MiB idle after")
    m = summary.get("tollgate_metering")
    if m:
        out.append(
            f"Tollgate metering: {m['client_completed']:.0f} requests completed by the clients, "
            f"tollgate_requests_total{{status=\"200\"}} {m['requests_total_200']:.0f}, /admin/usage requests "
            f"{m['admin_usage_requests']:.0f}, tollgate_usage_estimated_total {m['usage_estimated_total']:.0f} "
            f"(usage counted locally instead of reported): "
            + ("every request metered from reported usage" if m["client_completed"] == m["requests_total_200"]
               == m["admin_usage_requests"] and m["usage_estimated_total"] == 0 else "METERING MISMATCH"))
    o = summary.get("overhead_histogram")
    if o:
        out.append(
            f"tollgate_overhead_seconds over {o['count']:.0f} requests: p50 ≤ {o['p50_le_s'] * 1e3:.3f} ms, "
            f"p99 ≤ {o['p99_le_s'] * 1e3:.3f} ms (bucket upper bounds)")
    return out


def plot(summary, med, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in summary["targets"] if t != "direct"]
    colors = {"direct": "#999999", "nginx": "#4c9a2a", "hyper": "#9467bd", "litellm": "#c0504d", "tollgate": "#1f77b4",
              "tollgate-plain": "#aec7e8"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        ("added p50 latency, c=1 (ms, log)", lambda t, cell: med[t][cell]["p50_ms"] - med["direct"][cell]["p50_ms"],
         ["json-c1", "sse-c1"], targets, True),
        ("CPU per request, c=64 (µs, log)", lambda t, cell: med[t][cell]["cpu_us_per_req"], ["json-c64", "sse-c64"],
         targets, True),
        ("requests/s, c=64 (log)", lambda t, cell: med[t][cell]["rps"], ["json-c64", "sse-c64"],
         summary["targets"], True),
        ("added time to first SSE byte, c=1 and c=64 (ms, log)",
         lambda t, cell: med[t][cell]["ttfb_p50_ms"] - med["direct"][cell]["ttfb_p50_ms"], ["sse-c1", "sse-c64"],
         targets, True),
    ]
    for ax, (title, value, cells, ts, log) in zip(axes.flat, panels):
        width = 0.8 / len(ts)
        for i, t in enumerate(ts):
            ys = [max(value(t, c), 1e-3) for c in cells]
            xs = [j + i * width for j in range(len(cells))]
            bars = ax.bar(xs, ys, width, label=t, color=colors.get(t))
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([j + width * (len(ts) - 1) / 2 for j in range(len(cells))], cells)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Tollgate vs nginx vs LiteLLM on 127.0.0.1 (medians of {summary['runs']} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bin-dir", required=True, help="cargo's release directory (examples/)")
    p.add_argument("--tollgate", help="the Tollgate binary measured against the targets (default: BIN_DIR/tollgate)")
    p.add_argument("--tollgate-plain", help="a second Tollgate binary, measured as `tollgate-plain`")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--litellm", default="litellm")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measured client run")
    p.add_argument("--latency-ms", type=int, default=0, help="mock upstream's time to the response head")
    p.add_argument("--hold", type=int, default=1000, help="concurrent open streams for the RSS check (0: skip)")
    p.add_argument("--out", default="benches/load/out")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args()
    # SIGTERM (a timeout, a kill by pid) still stops every server this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.targets = [t for t in args.targets.split(",") if t]
    args.tollgate = args.tollgate or os.path.join(args.bin_dir, "tollgate")
    if not args.tollgate_plain and "tollgate-plain" in args.targets:
        args.targets.remove("tollgate-plain")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    os.makedirs(args.out, exist_ok=True)
    summary = run(args)
    text, med = table(summary)
    notes = extras(summary, med)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(text)
    print("\n".join(notes))
    try:
        plot(summary, med, os.path.join(args.out, "performance.png"))
        print(f"plot: {os.path.join(args.out, 'performance.png')}")
    except Exception as e:  # noqa: BLE001 - the table stands without the plot
        print(f"no plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
