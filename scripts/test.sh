#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust unit and integration tests, and the official
# OpenAI and Anthropic Python SDKs against a running gateway. Works on a fresh clone (creates .venv itself).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked

echo "== OpenAI and Anthropic Python SDKs"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
TOLLGATE_BIN="${CARGO_TARGET_DIR:-target}/debug/tollgate" .venv/bin/python -m unittest discover -s tests/python -p 'test_*.py' -v
echo "== all tests passed"
