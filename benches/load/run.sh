#!/usr/bin/env bash
# The load harness: Tollgate beside the mock upstream directly, nginx and the LiteLLM proxy, in
# one run on 127.0.0.1 (see docs/PERFORMANCE.md). Not part of CI: it takes minutes and wants a
# machine that is not busy with anything else.
#
#   benches/load/run.sh [--runs 3] [--duration 4] [--hold 1000] [--targets direct,nginx,litellm,tollgate]
#
# Installs what it lacks: nginx and (for 1,000 open streams) nothing else from Debian; LiteLLM
# (pinned) and matplotlib in their own venv under ~/.cache/tollgate (TOLLGATE_CACHE).
# Measures Tollgate's profile-guided build (scripts/build-pgo.sh) and its plain release build.
# Writes benches/load/out/{table.md,results.json,performance.png}.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
fi
cache="${TOLLGATE_CACHE:-$HOME/.cache/tollgate}"
venv="$cache/load-venv"
# litellm 1.108.7 is the newest that installs from the package index reachable here (shared FACTS.md).
if [ ! -x "$venv/bin/litellm" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]==1.108.7' matplotlib
fi

target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin tollgate --example mock_upstream --example load_client --example bare_proxy
# The build the targets are measured on (the plain one above runs beside it as tollgate-plain).
scripts/build-pgo.sh

# 1,000 client sockets, as many proxied ones and their upstream connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "$venv/bin/python" benches/load/harness.py --bin-dir "$target/release" --litellm "$venv/bin/litellm" \
  --tollgate "$target/pgo/release/tollgate" --tollgate-plain "$target/release/tollgate" "$@"
