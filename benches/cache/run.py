#!/usr/bin/env python3
"""What a response-cache hit costs and serves (docs/PERFORMANCE.md, "Response cache").

One mock upstream, nginx proxying to it, and two gateways with the same config (routing over
two backends, a budget on the SQLite ledger, metering): `through` without `[cache]` (every
request goes to the backend: the miss path) and `hit` with `[cache] cacheable = "all"`, where
the load client's repeated body is answered from the cache after its first request. All on
127.0.0.1, measured in alternating rounds of one run at c=1 and c=64, JSON and SSE.

    cargo build --release --bin tollgate --example mock_upstream --example load_client
    python3 benches/cache/run.py --bin-dir target/release [--rounds 3] [--duration 4]

`--memory`: instead, fills a memory store bounded at 1 GiB with 2 KiB answers (every request a
different question, so every one a miss that is stored) to 1.5x its bound, and prints the
gateway's RSS and `tollgate_cache_bytes` as it goes: what the bound holds to.

    python3 benches/cache/run.py --bin-dir target/release --memory
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("harness", os.path.join(HERE, "..", "load", "harness.py"))
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)

CELLS = [("json", 1), ("json", 64), ("sse", 1), ("sse", 64)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--memory", action="store_true", help="measure the memory store's RSS at its bound instead")
    a = p.parse_args()
    if a.memory:
        return memory(a)
    tmp = tempfile.mkdtemp(prefix="tollgate-cache-bench-")
    procs = {}
    ports = {name: harness.free_port() for name in ("mock", "nginx", "through", "hit")}
    try:
        procs["mock"] = subprocess.Popen([f"{a.bin_dir}/examples/mock_upstream", "--chunks", "32",
                                          "--listen", f"127.0.0.1:{ports['mock']}"], stdout=subprocess.DEVNULL)
        harness.wait_port(ports["mock"], 10, "mock")
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(harness.NGINX_CONF.format(tmp=tmp, port=ports["nginx"], upstream=ports["mock"]))
        procs["nginx"] = subprocess.Popen([a.nginx, "-p", tmp, "-c", conf, "-g", "daemon off;"], start_new_session=True)
        harness.wait_port(ports["nginx"], 10, "nginx")
        import hashlib
        key_sha256 = hashlib.sha256(harness.TOLLGATE_KEY.encode()).hexdigest()
        upstream = f"http://127.0.0.1:{ports['mock']}"
        for name, extra in (("through", ""), ("hit", '\n[cache]\ncacheable = "all"\nscope = "user"\n')):
            path = os.path.join(tmp, f"{name}.toml")
            with open(path, "w") as f:
                f.write(harness.TOLLGATE_CONF.format(ledger=os.path.join(tmp, f"{name}.db"), upstream=upstream,
                                                     slow=upstream, key_sha256=key_sha256) + extra)
            procs[name] = subprocess.Popen(
                [f"{a.bin_dir}/tollgate", "serve", "--config", path, "--listen", f"127.0.0.1:{ports[name]}"],
                env={**os.environ, "TOLLGATE_ADMIN_KEY": harness.ADMIN_KEY, "TOLLGATE_LOG": "warn"})
            harness.wait_http(f"http://127.0.0.1:{ports[name]}/readyz", 20, what=name)

        def load(target, kind, concurrency, duration, warmup=0.5):
            port = ports[target]
            argv = [f"{a.bin_dir}/examples/load_client", "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
                    "--concurrency", str(concurrency), "--duration-s", str(duration), "--warmup-s", str(warmup)]
            if target in ("through", "hit"):
                argv += ["--key", harness.TOLLGATE_KEY]
            if kind == "sse":
                argv.append("--stream")
            before = harness.cpu_seconds(procs[target].pid) if target != "nginx" else None
            out = subprocess.run(argv, capture_output=True, text=True, check=True)
            result = __import__("json").loads(out.stdout)
            if before is not None:
                result["cpu_us"] = (harness.cpu_seconds(procs[target].pid) - before) / max(result["all"], 1) * 1e6
            return result

        targets = ["mock", "nginx", "through", "hit"]
        results = {(t, c): [] for t in targets for c in CELLS}
        for r in range(a.rounds):
            for cell in CELLS:
                for t in targets:
                    results[(t, cell)].append(load(t, cell[0], cell[1], a.duration))
            print(f"round {r + 1} done", flush=True)
        print("\n| cell | target | RPS | p50 ms | p99 ms | added p50 µs (vs direct) | RPS ÷ nginx | CPU µs/req |")
        print("|---|---|---|---|---|---|---|---|")
        for cell in CELLS:
            med = {t: {k: statistics.median(x[k] for x in results[(t, cell)]) for k in ("rps", "p50_ms", "p99_ms")}
                   for t in targets}
            for t in targets:
                m = med[t]
                cpu = [x["cpu_us"] for x in results[(t, cell)] if "cpu_us" in x]
                label = {"mock": "direct", "through": "tollgate (backend)", "hit": "tollgate (cache hit)"}.get(t, t)
                added = "–" if t == "mock" else f"{(m['p50_ms'] - med['mock']['p50_ms']) * 1000:.0f}"
                print(f"| {cell[0]} c={cell[1]} | {label} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                      f"{added} | {m['rps'] / med['nginx']['rps']:.2f} | "
                      f"{statistics.median(cpu) if cpu else float('nan'):.1f} |")
        import urllib.request
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['hit']}/metrics").read().decode()
        hits = harness.metric_sum(metrics, "tollgate_cache_requests_total", 'result="hit"')
        misses = harness.metric_sum(metrics, "tollgate_cache_requests_total", 'result="miss"')
        print(f"\ncache: {hits:.0f} hits, {misses:.0f} misses")
    finally:
        for name, proc in procs.items():
            if name == "nginx":
                try:
                    os.killpg(proc.pid, 15)
                except ProcessLookupError:
                    pass
            else:
                proc.terminate()
        for proc in procs.values():
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def memory(a):
    """RSS of a gateway whose memory store is filled to 1.5x its 1 GiB bound."""
    import hashlib
    import json
    import urllib.request
    bound = 1 << 30
    tmp = tempfile.mkdtemp(prefix="tollgate-cache-memory-")
    procs = {}
    try:
        mock_port, port = harness.free_port(), harness.free_port()
        procs["mock"] = subprocess.Popen([f"{a.bin_dir}/examples/mock_upstream", "--answer-bytes", "2048",
                                          "--listen", f"127.0.0.1:{mock_port}"], stdout=subprocess.DEVNULL)
        harness.wait_port(mock_port, 10, "mock")
        upstream = f"http://127.0.0.1:{mock_port}"
        path = os.path.join(tmp, "memory.toml")
        with open(path, "w") as f:
            f.write(harness.TOLLGATE_CONF.format(
                ledger=os.path.join(tmp, "memory.db"), upstream=upstream, slow=upstream,
                key_sha256=hashlib.sha256(harness.TOLLGATE_KEY.encode()).hexdigest()))
            f.write(f'\n[cache]\ncacheable = "all"\nmax_bytes = {bound}\n')
        procs["gateway"] = subprocess.Popen(
            [f"{a.bin_dir}/tollgate", "serve", "--config", path, "--listen", f"127.0.0.1:{port}"],
            env={**os.environ, "TOLLGATE_ADMIN_KEY": harness.ADMIN_KEY, "TOLLGATE_LOG": "warn"})
        harness.wait_http(f"http://127.0.0.1:{port}/readyz", 20, what="gateway")
        pid = procs["gateway"].pid
        start_kib = harness.status_kib(pid, "VmRSS")
        print(f"RSS at start: {start_kib / 1024:.0f} MiB")
        print("| requests stored | cache_bytes MiB | RSS MiB | RSS ÷ bound |")
        print("|---|---|---|---|")
        loader = subprocess.Popen(
            [f"{a.bin_dir}/examples/load_client", "--url", f"http://127.0.0.1:{port}/v1/chat/completions",
             "--key", harness.TOLLGATE_KEY, "--unique", "--concurrency", "64", "--duration-s", "600", "--warmup-s", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        peak = 0
        while True:
            time.sleep(5)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            stored = harness.metric_sum(metrics, "tollgate_cache_requests_total", 'result="miss"')
            held = harness.metric_sum(metrics, "tollgate_cache_bytes")
            rss = harness.status_kib(pid, "VmRSS") * 1024
            peak = max(peak, rss)
            print(f"| {stored:.0f} | {held / 2**20:.0f} | {rss / 2**20:.0f} | {rss / bound:.2f} |", flush=True)
            # Filled to 1.5x the bound's worth of answers (~2.3 KiB weighed each).
            if stored * 2300 > 1.5 * bound:
                break
        loader.terminate()
        loader.wait()
        print(f"\npeak RSS {peak / 2**20:.0f} MiB = {peak / bound:.2f}x the 1 GiB bound "
              f"(start {start_kib / 1024:.0f} MiB)")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
