#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 30 s each) with libFuzzer via cargo-fuzz.
# With FUZZ_RUNS=N it runs N inputs per target from a fixed seed instead: the same inputs on
# every machine, so a CI run cannot fail on a case nobody has seen (explore with the time mode).
# The machine has only the stable toolchain: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's
# nightly flags (sanitizer coverage, AddressSanitizer). New inputs go to a scratch corpus; the
# seeds in fuzz/corpus/ stay as committed. A crash leaves its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in request_decoder sse_scanner config_loader; do
  mkdir -p "$scratch/$target"
  if [ -n "${FUZZ_RUNS:-}" ]; then
    echo "== fuzz $target: $FUZZ_RUNS inputs from seed 1"
    budget=(-runs="$FUZZ_RUNS" -seed=1)
  else
    echo "== fuzz $target for ${seconds}s"
    budget=(-max_total_time="$seconds")
  fi
  cargo fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    "${budget[@]}" -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|stat::new_units_added|==[0-9]+==|SUMMARY|thread .* panicked)' || true
  if [ -n "$(ls -A fuzz/artifacts/"$target" 2>/dev/null)" ]; then
    echo "fuzz target $target found a failing input: fuzz/artifacts/$target" >&2
    exit 1
  fi
done
