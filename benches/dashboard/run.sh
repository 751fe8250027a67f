#!/usr/bin/env bash
# The dashboard's admin JSON endpoints on a large SQLite ledger (docs/PERFORMANCE.md,
# "Dashboard"): 100,000 API users and 10,000,000 request records, generated once (about three
# minutes, ~2.4 GB under target/bench-dashboard/, reused for a day) and served by the release
# gateway on 127.0.0.1. Not part of CI.
#
#   benches/dashboard/run.sh [--users 100000] [--records 10000000] [--samples 20] [--profile PATH]
#   benches/dashboard/run.sh --users 1000 --records 100000      # a quick run
#
# Writes target/bench-dashboard/{table.md,results.json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin tollgate
exec python3 benches/dashboard/run.py --bin-dir "$target/release" "$@"
