"""Checks of deploy/ that need no Docker engine and no cluster (run by scripts/validate-deploy.sh).

  python scripts/validate_deploy.py TOLLGATE_BIN

Each check prints `ok - NAME` or `FAIL - NAME: why`; the last line is `N passed, N failed`.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
TOLLGATE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "tollgate")
passed, failed = [], []


def check(name):
    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failed.append(name)
            print(f"FAIL - {name}: {type(e).__name__}: {e}", flush=True)
        else:
            passed.append(name)
            print(f"ok - {name}", flush=True)
        return fn

    return wrap


def path(*parts):
    return os.path.join(DEPLOY, *parts)


def load_all(p):
    with open(p) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def documented_metrics():
    """Metric names in README.md's "Metrics" table: the names dashboards may rely on."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(tollgate_[a-z_]+)", section))


def used_metrics(text):
    names = set()
    for name in re.findall(r"\btollgate_[a-z_]+", text):
        # Histogram series are named after their family.
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


K8S_FILES = ["configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "redis.yaml"]
k8s = {}


@check("deploy/k8s: every manifest parses as YAML, with apiVersion, kind and metadata.name")
def _():
    for name in K8S_FILES + ["kustomization.yaml"]:
        docs = load_all(path("k8s", name))
        assert docs, f"{name} is empty"
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), f"{name}: {d}"
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], name
                k8s[(d["kind"], d["metadata"]["name"])] = d
    kustomization = load_all(path("k8s", "kustomization.yaml"))[0]
    assert sorted(kustomization["resources"]) == sorted(K8S_FILES), kustomization["resources"]
    want = {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert want <= {kind for kind, _ in k8s}, {kind for kind, _ in k8s}


@check("deploy/k8s: 3 gateway replicas, ready on /readyz, scraped by annotation, non-root")
def _():
    dep = k8s[("Deployment", "tollgate")]
    spec = dep["spec"]
    assert spec["replicas"] == 3, spec["replicas"]
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics", ann
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(ports["http"]) == ann["prometheus.io/port"], (ports, ann)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", c["readinessProbe"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", c["livenessProbe"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["args"][:3] == ["serve", "--config", "/etc/tollgate/tollgate.toml"], c["args"]
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/etc/tollgate" and "subPath" not in mount, "subPath mounts never see ConfigMap edits"
    (vol,) = pod["spec"]["volumes"]
    assert ("ConfigMap", vol["configMap"]["name"]) in k8s, vol
    assert ("Secret", c["envFrom"][0]["secretRef"]["name"]) in k8s, c["envFrom"]


@check("deploy/k8s: Services, HPA and PodDisruptionBudget select what exists")
def _():
    dep = k8s[("Deployment", "tollgate")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = k8s[("Service", "tollgate")]
    assert svc["spec"]["selector"].items() <= labels.items(), svc["spec"]["selector"]
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8080)
    pdb = k8s[("PodDisruptionBudget", "tollgate")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"], "a PDB that blocks every drain"
    hpa = k8s[("HorizontalPodAutoscaler", "tollgate")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tollgate" and hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    redis_dep, redis_svc = k8s[("Deployment", "tollgate-redis")], k8s[("Service", "tollgate-redis")]
    assert redis_svc["spec"]["selector"].items() <= redis_dep["spec"]["template"]["metadata"]["labels"].items()
    assert redis_svc["spec"]["ports"][0]["port"] == 6379
    # The Redis pods must not be picked by the gateway Service or its PDB.
    assert not svc["spec"]["selector"].items() <= redis_dep["spec"]["template"]["metadata"]["labels"].items()


@check("deploy/k8s: the ConfigMap's tollgate.toml equals deploy/tollgate.toml and passes `tollgate check`")
def _():
    embedded = k8s[("ConfigMap", "tollgate-config")]["data"]["tollgate.toml"]
    with open(path("tollgate.toml")) as f:
        assert embedded == f.read(), "deploy/k8s/configmap.yaml and deploy/tollgate.toml differ"
    assert re.search(r'^url = "redis://tollgate-redis:6379"$', embedded, re.M), "ledger url"
    assert re.search(r'^backend = "redis"$', embedded, re.M)
    env = {k: "dummy-value-for-check" for k in k8s[("Secret", "tollgate-secrets")]["stringData"]}
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(embedded)
    try:
        out = subprocess.run(
            [TOLLGATE, "check", f.name], env={"PATH": os.environ.get("PATH", ""), **env},
            capture_output=True, text=True, timeout=30,
        )
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every *_env the config names is provided by the Secret.
    named = set(re.findall(r'^\s*\w+_env = "(\w+)"', embedded, re.M))
    assert named <= env.keys(), named - env.keys()


@check("deploy/docker-compose.yml: parses; gateway, CPU llama.cpp, GPU vLLM, Redis, Prometheus, Grafana")
def _():
    (compose,) = load_all(path("docker-compose.yml"))
    services = compose["services"]
    assert {"tollgate", "llama-cpu", "vllm-gpu", "tollgate-redis", "prometheus", "grafana"} <= services.keys()
    for name, s in services.items():
        assert "image" in s or "build" in s, name
        for v in s.get("volumes", []):
            src = v.split(":", 1)[0]
            if src.startswith("./"):
                assert os.path.exists(path(src)), f"{name} mounts missing {src}"
    devices = services["vllm-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"], devices
    assert services["tollgate"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "./tollgate.toml:/etc/tollgate/tollgate.toml:ro" in services["tollgate"]["volumes"]
    # The config's host names are compose services.
    with open(path("tollgate.toml")) as f:
        hosts = set(re.findall(r'"(?:https?|redis)://([a-z0-9-]+):\d+', f.read()))
    assert hosts <= services.keys(), hosts - services.keys()
    for key in ("TOLLGATE_ADMIN_KEY", "VLLM_API_KEY"):
        assert "${" + key + ":?" in services["tollgate"]["environment"][key], "secrets must come from .env"


@check("deploy/Dockerfile: multi-stage, distroless runtime, non-root, binary and default config")
def _():
    with open(path("Dockerfile")) as f:
        text = f.read()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and "distroless" in froms[-1], froms
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.M):
        assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: not in the repository"
    assert "/etc/tollgate/tollgate.toml" in text and "ENTRYPOINT" in text


@check("deploy/grafana/tollgate.json: a dashboard whose panels query documented metrics")
def _():
    with open(path("grafana", "tollgate.json")) as f:
        dash = json.load(f)
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30, dash.get("schemaVersion")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    exprs = []
    for p in dash["panels"]:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= g.keys() and g["x"] + g["w"] <= 24, (p["title"], g)
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "gauge", "table", "bargauge"), p["type"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        exprs += [t["expr"] for t in p["targets"]]
    text = "\n".join(exprs)
    unknown = used_metrics(text) - documented_metrics()
    assert not unknown, f"not in README's metrics: {unknown}"
    # What the dashboard is for: cost per user and backend, tier mix, savings, budget burn,
    # idle cost, TTFT and overhead.
    for metric in ("tollgate_cost_usd_total", "tollgate_requests_total", "tollgate_savings_usd_total",
                   "tollgate_budget_remaining_usd", "tollgate_idle_cost_usd_total",
                   "tollgate_time_to_first_token_seconds_bucket", "tollgate_overhead_seconds_bucket"):
        assert metric in text, f"no panel uses {metric}"
    assert "by (tier)" in text and "by (user)" in text and "by (backend)" in text
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert set(re.findall(r"\$(\w+)", text)) - {"__rate_interval", "__range"} <= variables


@check("deploy/prometheus: alert rules use documented metrics; provisioning files parse")
def _():
    with open(path("prometheus", "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    for want in ("TollgateBudgetNearlySpent", "TollgateBackendDown", "TollgateHighErrorRate", "TollgateOverheadHigh"):
        assert want in names, names
    exprs = "\n".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    unknown = used_metrics(exprs) - documented_metrics()
    assert not unknown, f"not in README's metrics: {unknown}"
    for p in ("kubernetes.yml", "prometheus.yml"):
        cfg = load_all(path("prometheus", p))[0]
        assert any(j["job_name"] == "tollgate" for j in cfg["scrape_configs"]), p
        for rf in cfg["rule_files"]:
            assert os.path.exists(path("prometheus", rf)), rf
    for p in ("datasources/prometheus.yml", "dashboards/tollgate.yml"):
        assert load_all(path("grafana", "provisioning", p)), p


print(f"{len(passed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
