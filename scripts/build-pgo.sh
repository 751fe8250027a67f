#!/usr/bin/env bash
# Tollgate's production build: a profile-guided (PGO) release build. Builds the gateway
# instrumented, runs the load harness's Tollgate cells against it (JSON and SSE, concurrency 1
# and 64, open streams, /metrics and /admin/usage; a mock upstream on 127.0.0.1, about a
# minute), then builds it again laid out for what that run executed. Same code, same features;
# docs/PERFORMANCE.md measures what it saves per request. Takes about three plain release
# builds' time.
#
#   scripts/build-pgo.sh        # -> target/pgo/release/tollgate (CARGO_TARGET_DIR respected)
#
# Needs llvm-profdata of the LLVM rustc is built on: rustup's llvm-tools component, or Debian's
# llvm-N package for the same major version (installed when neither is there).
set -euo pipefail
cd "$(dirname "$0")/.."

target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')

# A profile is read only by the LLVM major version that wrote it.
find_profdata() {
  local candidate
  for candidate in "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
    "$(command -v "llvm-profdata-$llvm_major" || true)" "$(command -v llvm-profdata || true)"; do
    if [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
      echo "$candidate"
      return
    fi
  done
}
profdata=$(find_profdata)
if [ -z "$profdata" ]; then
  rustup component add llvm-tools >/dev/null 2>&1 || true
  profdata=$(find_profdata)
fi
need_apt=()
[ -n "$profdata" ] || need_apt+=("llvm-$llvm_major")
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  profdata=$(find_profdata)
fi
if [ -z "$profdata" ]; then
  echo "build-pgo: no llvm-profdata for LLVM $llvm_major (rustup component add llvm-tools)" >&2
  exit 1
fi

# Separate target directories: RUSTFLAGS differ, and sharing one would rebuild every
# dependency back and forth with the plain release build.
training="$target/pgo-train"
profiles="$training/profiles"
rm -rf "$profiles"
mkdir -p "$profiles"

echo "== build-pgo: instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profiles" CARGO_TARGET_DIR="$training" \
  cargo build --release --locked --bin tollgate
# The harness's mock upstream and load client, plain (and shared with benches/load/run.sh).
CARGO_TARGET_DIR="$target" cargo build --release --locked --example mock_upstream --example load_client

echo "== build-pgo: training run"
# Each process writes its profile when it exits; the harness stops Tollgate with SIGTERM.
LLVM_PROFILE_FILE="$profiles/tollgate-%p-%m.profraw" python3 benches/load/harness.py \
  --bin-dir "$target/release" --tollgate "$training/release/tollgate" --targets tollgate \
  --runs 1 --duration 2 --hold 200 --out "$training/harness" >"$training/harness.log" 2>&1 ||
  { tail -n 30 "$training/harness.log" >&2; exit 1; }
# Only Tollgate's: the build scripts and proc-macros built instrumented leave theirs here too.
if ! compgen -G "$profiles/tollgate-*.profraw" >/dev/null; then
  echo "build-pgo: the training run wrote no profile (see $training/harness.log)" >&2
  exit 1
fi
"$profdata" merge -o "$training/tollgate.profdata" "$profiles"/tollgate-*.profraw

echo "== build-pgo: optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$training/tollgate.profdata" CARGO_TARGET_DIR="$target/pgo" \
  cargo build --release --locked --bin tollgate
echo "$target/pgo/release/tollgate"
