#!/usr/bin/env bash
# Validates deploy/ without a Docker engine or a cluster: Prometheus config and alert rules
# (promtool check + unit tests), the Grafana dashboard, compose and Kubernetes manifests (YAML
# and cross-references), and `tollgate check` on the config the ConfigMap carries.
#   scripts/validate-deploy.sh          (TOLLGATE_BIN: a built tollgate; default: cargo build)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${TOLLGATE_BIN:-}" ]; then
  tollgate=$TOLLGATE_BIN
else
  cargo build --locked --bin tollgate
  tollgate="${CARGO_TARGET_DIR:-target}/debug/tollgate"
fi

echo "== promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
# deploy/prometheus/kubernetes.yml uses kubernetes_sd_configs, which Debian's promtool is built
# without: validate_deploy.py parses it and checks its rule files instead.

echo "== manifests, dashboard, config"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
.venv/bin/python scripts/validate_deploy.py "$tollgate"
