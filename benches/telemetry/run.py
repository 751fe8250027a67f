#!/usr/bin/env python3
"""What the access log and OTLP traces cost (docs/PERFORMANCE.md, "Traces and the access log").

Starts one mock upstream (which is also the OTLP/HTTP sink: it takes `POST /v1/traces` and
discards the spans) and one gateway per variant, same config but `[telemetry]`, all on
127.0.0.1, then measures c=64 JSON chat requests over 10 users in alternating rounds of one run:

- `off`: no access log, no traces (the default);
- `json`: the JSON access log on (to a file, as a container's stdout would be);
- `traces`: OTLP traces at `sample_ratio = 1.0`, access log off;
- `both`: traces at 1.0 and the JSON access log;
- `before` (with `--before BIN`): another build, e.g. the commit before request ids existed.

Prints RPS and CPU per request per variant with ratios to `off`, and each gateway's telemetry
counters (lines written, spans exported, export failures) so that a variant that silently did
nothing shows.

    cargo build --release --bin tollgate --example mock_upstream --example load_client
    python3 benches/telemetry/run.py --bin-dir target/release [--rounds 5] [--duration 4]
"""

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

USERS = 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, what):
    for _ in range(500):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"{what} was not ready")


def config(ledger, upstream, telemetry):
    users = "".join(
        f'[[users]]\nname = "user-{i}"\nkey_sha256 = "{hashlib.sha256(f"tg-bench-user-{i}".encode()).hexdigest()}"\n'
        f'budget_usd = 100000.0\n\n'
        for i in range(USERS))
    return f"""[server]
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

[[routes]]
model = "auto"
backends = ["mock-premium", "mock-cpu"]

{users}
[telemetry]
{telemetry}
"""


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--before", help="another tollgate binary to measure beside (variant `before`)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="tollgate-telemetry-")
    procs = {}
    try:
        mock_port = free_port()
        upstream = f"http://127.0.0.1:{mock_port}"
        procs["mock"] = subprocess.Popen([f"{a.bin_dir}/examples/mock_upstream", "--listen", f"127.0.0.1:{mock_port}"],
                                         stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        keys = f"{tmp}/keys"
        with open(keys, "w") as f:
            f.write("".join(f"tg-bench-user-{i}\n" for i in range(USERS)))
        otlp = f'otlp_endpoint = "{upstream}"\nsample_ratio = 1.0\n'
        variants = {
            "off": 'access_log = "off"',
            "json": 'access_log = "json"',
            "traces": 'access_log = "off"\n' + otlp,
            "both": 'access_log = "json"\n' + otlp,
        }
        binaries = {name: f"{a.bin_dir}/tollgate" for name in variants}
        if a.before:
            variants["before"] = None
            binaries["before"] = a.before
        ports = {}
        for name, telemetry in variants.items():
            text = config(f"{tmp}/{name}.db", upstream, telemetry or "")
            if telemetry is None:  # an older build may not know [telemetry]
                text = text.replace("[telemetry]\n", "")
            path = f"{tmp}/{name}.toml"
            with open(path, "w") as f:
                f.write(text)
            ports[name] = free_port()
            procs[name] = subprocess.Popen(
                [binaries[name], "serve", "--config", path, "--listen", f"127.0.0.1:{ports[name]}"],
                stdout=open(f"{tmp}/{name}.stdout", "w"), stderr=open(f"{tmp}/{name}.stderr", "w"),
                env={**os.environ, "TOLLGATE_LOG": "warn"})
        for name in variants:
            wait_ready(ports[name], name)

        def load(name, duration):
            before = cpu_seconds(procs[name].pid)
            out = subprocess.run([f"{a.bin_dir}/examples/load_client", "--url",
                                  f"http://127.0.0.1:{ports[name]}/v1/chat/completions", "--keys-file", keys,
                                  "--concurrency", "64", "--duration-s", str(duration), "--warmup-s", "0",
                                  "--threads", "1"], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout)
            result["cpu_us"] = (cpu_seconds(procs[name].pid) - before) / max(result["all"], 1) * 1e6
            return result

        for name in variants:
            load(name, 1)
        rounds = {name: [] for name in variants}
        for r in range(a.rounds):
            for name in variants:
                rounds[name].append(load(name, a.duration))
            print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[n][-1]['rps']:.0f} RPS" for n in variants), flush=True)
        time.sleep(2.5)  # the last lines and spans out
        base = statistics.median(x["rps"] for x in rounds["off"])
        print("\n| variant | RPS ÷ off | rounds | CPU µs/request | p99 ms | lines written | spans exported | export failures |")
        print("|---|---|---|---|---|---|---|---|")
        for name in variants:
            rps = statistics.median(x["rps"] for x in rounds[name])
            ratios = ", ".join(f"{x['rps'] / o['rps']:.2f}" for x, o in zip(rounds[name], rounds["off"]))
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/metrics").read().decode()
            value = lambda metric: next((l.split()[-1] for l in metrics.splitlines() if l.startswith(metric + " ")), "-")
            lines = sum(1 for _ in open(f"{tmp}/{name}.stdout"))
            print(f"| {name} | {rps / base:.3f} | {ratios} | {statistics.median(x['cpu_us'] for x in rounds[name]):.1f} | "
                  f"{statistics.median(x['p99_ms'] for x in rounds[name]):.2f} | {lines} | "
                  f"{value('tollgate_trace_spans_exported_total')} | {value('tollgate_trace_export_failures_total')} |")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()


if __name__ == "__main__":
    main()
