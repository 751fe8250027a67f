#!/usr/bin/env bash
# The tenants-at-scale benchmark (docs/PERFORMANCE.md, "Tenants at scale"): a million API users
# in the SQLite store and in Redis against ten config users, in one run on 127.0.0.1. Not part
# of CI: seeding and measuring both stores takes about fifteen minutes.
#
#   benches/scale/run.sh [--stores sqlite,redis] [--users 1000000] [--rounds 9] [--duration 3]
#
# Writes benches/scale/out/{table.md,results.json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
fi
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin tollgate --example mock_upstream --example load_client --example seed_tenants --example flood_client
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 benches/scale/run.py --bin-dir "$target/release" "$@"
