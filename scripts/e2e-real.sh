#!/usr/bin/env bash
# End to end with real parts only: a real llama.cpp CPU backend (scripts/cpu-backend.sh), the
# Tollgate release binary with config/local-cpu.toml, the official OpenAI Python SDK and npm
# package as clients, and a real Prometheus scraping Tollgate with the shipped alert rules.
#
#   scripts/e2e-real.sh          # prints the figures it measured at the end
#
# Everything it starts is stopped by PID on exit; the whole run is bounded by E2E_TIMEOUT_S
# (default 1500 s, the llama.cpp build from nothing included). Logs are kept on failure (the
# directory is printed). Environment: TOLLGATE_BIN (skip the cargo build), TOLLGATE_CACHE (see
# scripts/cpu-backend.sh), E2E_TIMEOUT_S, LATENCY_RUNS (default 9).
set -euo pipefail

if [ -z "${TOLLGATE_E2E_BOUNDED:-}" ]; then
  export TOLLGATE_E2E_BOUNDED=1
  exec timeout -k 15 "${E2E_TIMEOUT_S:-1500}" "$0" "$@"
fi

cd "$(dirname "$0")/.."
root=$(pwd)
started=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e.XXXXXX")
pids=()
ok=0

cleanup() {
  local code=$?
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ "$ok" = 1 ]; then
    rm -rf "$work"
  else
    echo "== e2e-real FAILED (exit $code) after $((SECONDS - started)) s; logs kept in $work" >&2
    for log in "$work"/*.log "$work"/cpu/*.log; do
      [ -f "$log" ] || continue
      echo "-- last lines of $log" >&2
      tail -n 25 "$log" >&2
    done
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

step() { echo "== $* ($((SECONDS - started)) s)"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until FILE has a line matching REGEX; print the first match's group 1 (sed -E syntax).
wait_for_log() {
  local file=$1 regex=$2 pid=$3 tries=${4:-300} found
  for _ in $(seq 1 "$tries"); do
    found=$(sed -E 's/\x1b\[[0-9;]*m//g' "$file" 2>/dev/null | sed -nE "s/.*$regex.*/\\1/p" | head -n1)
    if [ -n "$found" ]; then echo "$found"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "process $pid exited; see $file" >&2; return 1; }
    sleep 0.1
  done
  echo "timed out waiting for /$regex/ in $file" >&2
  return 1
}

# --- the gateway binary (release: the latency figure is about the real thing) ---------------
if [ -n "${TOLLGATE_BIN:-}" ]; then
  tollgate=$TOLLGATE_BIN
else
  step "cargo build --release"
  cargo build --release --locked --bin tollgate
  tollgate="${CARGO_TARGET_DIR:-$root/target}/release/tollgate"
fi
[ -x "$tollgate" ] || { echo "no tollgate binary at $tollgate" >&2; exit 1; }

# --- clients ------------------------------------------------------------------------------
step "clients: OpenAI Python SDK (.venv) and openai npm package"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error >"$work/npm.log" 2>&1)

# --- the real CPU backend -------------------------------------------------------------------
step "CPU backend: llama.cpp llama-server + SmolLM2-135M (builds it if not cached)"
backend_start=$SECONDS
scripts/cpu-backend.sh "$work/cpu" | tee "$work/cpu-backend.out"
read -r llama_pid llama_port < "$work/cpu/llama-server.pid"
pids+=("$llama_pid")
echo "   CPU backend ready in $((SECONDS - backend_start)) s: pid $llama_pid, port $llama_port"

# --- Tollgate with config/local-cpu.toml pointed at that port --------------------------------
step "Tollgate"
config="$work/tollgate.toml"
sed -E "s#^base_url = \"http://127\\.0\\.0\\.1:9002/v1\"#base_url = \"http://127.0.0.1:$llama_port/v1\"#" \
  config/local-cpu.toml >"$config"
grep -q "127.0.0.1:$llama_port" "$config" || { echo "could not point the config at port $llama_port" >&2; exit 1; }
TOLLGATE_ADMIN_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
export TOLLGATE_ADMIN_KEY
"$tollgate" check "$config"
NO_COLOR=1 "$tollgate" serve --config "$config" --listen 127.0.0.1:0 >"$work/tollgate.log" 2>&1 &
tollgate_pid=$!
pids+=("$tollgate_pid")
tollgate_addr=$(wait_for_log "$work/tollgate.log" 'listen=(127\.0\.0\.1:[0-9]+)' "$tollgate_pid")
echo "   Tollgate pid $tollgate_pid on $tollgate_addr"

# --- Prometheus scraping it, with the shipped alert rules ------------------------------------
step "Prometheus"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
prom_port=$(free_port)
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: tollgate
    static_configs:
      - targets: ["$tollgate_addr"]
EOF
promtool check config "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prom-data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
pids+=("$prom_pid")
for _ in $(seq 1 100); do
  curl -fsS --max-time 1 "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1 && break
  kill -0 "$prom_pid" 2>/dev/null || { echo "prometheus exited" >&2; exit 1; }
  sleep 0.2
done
curl -fsS --max-time 2 "http://127.0.0.1:$prom_port/-/ready" >/dev/null
echo "   Prometheus pid $prom_pid on 127.0.0.1:$prom_port"

export TOLLGATE_URL="http://$tollgate_addr" LLAMA_URL="http://127.0.0.1:$llama_port"
export ADMIN_KEY=$TOLLGATE_ADMIN_KEY PROMETHEUS_URL="http://127.0.0.1:$prom_port"
export FIGURES="$work/figures.json"

# --- clients against the real stack ---------------------------------------------------------
step "OpenAI Python SDK: routing, metering, escalation, latency"
.venv/bin/python tests/e2e/drive.py traffic

step "openai npm package"
node --test --test-reporter=spec tests/e2e/drive_node.test.mjs

step "promtool check metrics on /metrics"
curl -fsS --max-time 5 "$TOLLGATE_URL/metrics" >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
echo "   promtool: /metrics is clean ($(grep -c '^tollgate_' "$work/metrics.txt") samples)"

step "Prometheus: scraped cost per user, alert rules, dashboard queries"
.venv/bin/python tests/e2e/drive.py prometheus

# --- figures ------------------------------------------------------------------------------
step "figures"
python3 - "$FIGURES" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"CPU backend (llama.cpp, SmolLM2-135M Q4_1, -t 1): {f['cpu_tokens_per_s']:.1f} tokens/s "
      f"(llama-server's own timing, median of {f['runs']} runs of {f['completion_tokens_per_run']} tokens)")
print(f"Tollgate-added latency, non-streaming: {f['added_ms']:+.2f} ms "
      f"(median {f['through_ms']:.1f} ms through Tollgate vs {f['direct_ms']:.1f} ms direct, {f['runs']} runs each)")
print(f"Tollgate-added latency, time to first token: {f['added_ttft_ms']:+.2f} ms "
      f"(median {f['through_ttft_ms']:.1f} ms vs {f['direct_ttft_ms']:.1f} ms direct)")
print(f"Tollgate-added latency, one-token answers: {f['added_1tok_ms']:+.2f} ms "
      f"(median {f['through_1tok_ms']:.1f} ms vs {f['direct_1tok_ms']:.1f} ms direct, {2 * f['runs']} runs each)")
for user, c in f["cost_per_request"].items():
    parts = ", ".join(f"{b}: {v['requests']} × ${v['per_request_usd']:.9f}" for b, v in sorted(c["by_backend"].items()))
    print(f"cost per request, {user}: ${c['per_request_usd']:.9f} over {c['requests']} requests ({parts})")
EOF
echo "e2e-real took $((SECONDS - started)) s"
ok=1
