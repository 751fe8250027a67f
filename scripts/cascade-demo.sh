#!/usr/bin/env bash
# The confidence cascade on the real CPU model: starts llama-server (scripts/cpu-backend.sh) and
# Tollgate with examples/cascade/config.toml, sends easy and hard prompts as a cost-first user,
# and prints each answer's confidence, where it was served, and the cost against always-premium.
#   scripts/cascade-demo.sh [THRESHOLD]     (default -1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
threshold="${1:--1.0}"
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

scripts/cpu-backend.sh "$work/cpu" 9002 > "$work/cpu.out"
pids+=("$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' "$work/cpu.out" | head -1)")
cargo build --release --quiet
sed "s/threshold = -1.0/threshold = $threshold/" examples/cascade/config.toml > "$work/config.toml"
export TOLLGATE_ADMIN_KEY="demo-admin-$$"
target="${CARGO_TARGET_DIR:-target}"
NO_COLOR=1 "$target/release/tollgate" serve --config "$work/config.toml" 2> "$work/tollgate.log" &
pids+=("$!")
for _ in $(seq 100); do grep -q 'listen=' "$work/tollgate.log" && break; sleep 0.1; done
addr="$(sed -n 's/.*listen=\([0-9.:]*\).*/\1/p' "$work/tollgate.log" | head -1)"
python3 examples/cascade/drive.py "http://$addr" "http://127.0.0.1:9002" "$TOLLGATE_ADMIN_KEY" "$threshold" examples/cascade/prompts.txt
