#!/usr/bin/env python3
"""Same-run A/B of gateway builds on the tenants-at-scale hot path (docs/PERFORMANCE.md).

For each build: a gateway with N API users stored in SQLite (seeded once, the file copied per
build; with `--store redis`, seeded per build into one Redis, under a key prefix of its own)
and one with `run.py`'s 10 config users, all beside one mock upstream; then rounds in which
every build's two gateways take c=64 in turn. Prints per round and the medians of the ratio
(10k API keys ÷ 10 config users), of the gateway's CPU per request and, with Redis, of
Redis's.

    cargo build --release --bin tollgate --example mock_upstream --example load_client --example seed_tenants
    cp target/release/tollgate /tmp/tollgate-before   # (from the other commit)
    python3 benches/scale/ab.py --builds before=/tmp/tollgate-before,after=target/release/tollgate
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as scale  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", required=True, help="label=path,label=path,...")
    p.add_argument("--bin-dir", default="target/release", help="where mock_upstream, load_client, seed_tenants are")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--hot-keys", type=int, default=scale.HOT_KEYS, help="distinct API keys the load spreads over")
    p.add_argument("--store", choices=("sqlite", "redis"), default="sqlite",
                   help="redis: one redis-server for every gateway, each under a key prefix of its own")
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args()
    builds = dict(b.split("=", 1) for b in a.builds.split(","))
    run = scale.Run(a)
    try:
        run.upstream_port = scale.free_port()
        run.upstream = f"http://127.0.0.1:{run.upstream_port}"
        run.start("mock", [f"{a.bin_dir}/examples/mock_upstream", "--listen", f"127.0.0.1:{run.upstream_port}"])
        scale.wait_port(run.upstream_port, 10, "mock_upstream")
        if a.store == "redis":
            run.redis_port = scale.free_port()
            run.start("redis", ["redis-server", "--port", str(run.redis_port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"])
            scale.wait_port(run.redis_port, 10, "redis-server")
            ledger = lambda name: (f'[ledger]\nbackend = "redis"\nurl = "redis://127.0.0.1:{run.redis_port}"\n'  # noqa: E731
                                   f'key_prefix = "{name}:"')
        else:
            ledger = lambda name: f'[ledger]\nbackend = "sqlite"\npath = "{run.tmp}/{name}.db"'  # noqa: E731
        config_users = "".join(scale.CONFIG_USER.format(i=i, sha=hashlib.sha256(scale.config_key(i).encode()).hexdigest())
                               for i in range(10))
        def seed(name):
            conf = run.config(f"seed-{name}", ledger(name), "")
            subprocess.run([f"{a.bin_dir}/examples/seed_tenants", "--config", conf, "--users", str(a.users)],
                           capture_output=True, check=True, env={**os.environ, "TOLLGATE_ADMIN_KEY": scale.ADMIN_KEY})
        if a.store == "sqlite":
            seed("seed")
        hot = run.write("hot.keys", "\n".join(scale.bench_key(i * (a.users // a.hot_keys))
                                              for i in range(a.hot_keys)) + "\n")
        base_keys = run.write("base.keys", "\n".join(scale.config_key(i) for i in range(10)) + "\n")
        gateways = {}
        for label, binary in builds.items():
            if a.store == "redis":
                seed(f"{label}-scale")
            for f in os.listdir(run.tmp):
                if f.startswith("seed.db"):
                    shutil.copy(f"{run.tmp}/{f}", f"{run.tmp}/{label}-scale.db{f[len('seed.db'):]}")
            for side, users, keys in (("base", config_users, base_keys), ("scale", "", hot)):
                name = f"{label}-{side}"
                conf = run.config(name, ledger(name), users)
                port = scale.free_port()
                run.start(name, [binary, "serve", "--config", conf, "--listen", f"127.0.0.1:{port}"],
                          env={"TOLLGATE_ADMIN_KEY": scale.ADMIN_KEY, "TOLLGATE_LOG": "warn"})
                scale.wait_port(port, 30, name)
                run.load(port, keys, 64, 2)  # keys resolved, connections warm
                gateways[name] = (port, keys)
        ratios = {label: [] for label in builds}
        cpu = {name: [] for name in gateways}
        redis_cpu = {name: [] for name in gateways}
        for r in range(a.rounds):
            line = []
            for label in builds:
                rps = {}
                for side in ("base", "scale"):
                    name = f"{label}-{side}"
                    port, keys = gateways[name]
                    redis_before = scale.redis_stats(run.redis_port)["cpu_us"] if a.store == "redis" else 0
                    result = run.load_with_cpu(name, port, keys, 64, a.duration)
                    rps[side] = result["all"] / a.duration
                    cpu[name].append(result["cpu_us_per_req"])
                    if a.store == "redis":
                        redis_cpu[name].append((scale.redis_stats(run.redis_port)["cpu_us"] - redis_before)
                                               / max(result["all"], 1))
                ratios[label].append(rps["scale"] / rps["base"])
                line.append(f"{label} {rps['base']:.0f}/{rps['scale']:.0f} RPS ({ratios[label][-1]:.3f}), "
                            f"CPU {cpu[label + '-base'][-1]:.1f}/{cpu[label + '-scale'][-1]:.1f} µs")
            print(f"round {r + 1}: " + " | ".join(line), flush=True)
        for label in builds:
            print(f"{label}: median ratio {statistics.median(ratios[label]):.3f}; CPU/request 10 config users "
                  f"{statistics.median(cpu[label + '-base']):.1f} µs, 10k API keys "
                  f"{statistics.median(cpu[label + '-scale']):.1f} µs", flush=True)
            if a.store == "redis":
                print(f"{label}: Redis CPU/request 10 config users {statistics.median(redis_cpu[label + '-base']):.1f} µs, "
                      f"10k API keys {statistics.median(redis_cpu[label + '-scale']):.1f} µs", flush=True)
    finally:
        run.stop_all()


if __name__ == "__main__":
    main()
