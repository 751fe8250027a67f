"""The same totals everywhere: after known traffic through a real gateway (simulated backends,
SQLite ledger), the dashboard's JSON (overview today/month, spend over time, backends), the
users table (/admin/usage), `tollgate report` and a /metrics scrape all say what the gateway
metered request by request (its x-tollgate-cost-usd headers).

Run by scripts/test.sh: TOLLGATE_BIN names the built binary.
"""

import hashlib
import json
import os
import subprocess
import tempfile
import unittest
import urllib.error
import urllib.request

from gateway import Gateway

ADMIN_KEY = "tg-numbers-agree-admin-key"
CONFIG_USER_KEYS = {"ann": "tg-agree-ann", "bob": "tg-agree-bob"}
API_USERS = {"cat": "pro", "dan": "free"}
# (user, requests, streamed?)
TRAFFIC = [("ann", 4, False), ("bob", 3, True), ("cat", 3, False), ("dan", 2, True)]
# USD per million (prompt, completion) tokens, as the config below prices them.
PRICES = {"sim-premium": (0.60, 2.40), "sim-cpu": (0.02, 0.05)}


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def config(ledger_path):
    return f"""
[server]
listen = "127.0.0.1:0"
admin_key_env = "TOLLGATE_AGREE_ADMIN_KEY"

[ledger]
backend = "sqlite"
path = "{ledger_path}"

[[backends]]
name = "sim-premium"
tier = "quality"
simulate = {{ ttft_ms = 2, tokens_per_s = 5000, quality_text = "Premium answer from the big model." }}
model = "sim-premium-70b"
quality = 0.9
pricing = {{ input_per_mtok = 0.60, output_per_mtok = 2.40 }}

[[backends]]
name = "sim-cpu"
tier = "economy"
simulate = {{ ttft_ms = 2, tokens_per_s = 5000, quality_text = "Cheap answer from the small model." }}
model = "sim-cpu-135m"
quality = 0.35
pricing = {{ input_per_mtok = 0.02, output_per_mtok = 0.05 }}

[[routes]]
model = "auto"
backends = ["sim-premium", "sim-cpu"]

[[plans]]
name = "pro"
price_usd = 20
policy = "quality-first"
budget_usd = 100
budget_period = "month"

[[plans]]
name = "free"
price_usd = 0
policy = "cost-first"
budget_usd = 1
budget_period = "day"

[[users]]
name = "ann"
key_sha256 = "{sha256(CONFIG_USER_KEYS["ann"])}"
plan = "pro"

[[users]]
name = "bob"
key_sha256 = "{sha256(CONFIG_USER_KEYS["bob"])}"
plan = "free"
"""


class NumbersAgree(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.ledger_path = os.path.join(cls.dir.name, "ledger.db")
        cls.config_path = os.path.join(cls.dir.name, "tollgate.toml")
        with open(cls.config_path, "w") as f:
            f.write(config(cls.ledger_path))
        cls.gateway = Gateway(config(cls.ledger_path), {"TOLLGATE_AGREE_ADMIN_KEY": ADMIN_KEY})
        try:
            cls.seed()
        except BaseException:
            cls.gateway.stop()
            cls.dir.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.gateway.stop()
        cls.dir.cleanup()

    @classmethod
    def call(cls, method, path, body=None, key=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(cls.gateway.origin + path, data=data, method=method)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    @classmethod
    def admin(cls, path, method="GET", body=None):
        status, _, read = cls.call(method, path, body, key=ADMIN_KEY)
        if status >= 300:
            raise AssertionError(f"{method} {path}: {status} {read!r}")
        return json.loads(read) if read else None

    @classmethod
    def seed(cls):
        keys = dict(CONFIG_USER_KEYS)
        for name, plan in API_USERS.items():
            cls.admin("/admin/users", "POST", {"name": name, "plan": plan})
            keys[name] = cls.admin(f"/admin/users/{name}/keys", "POST", {"label": "agree"})["key"]
        cls.cost = {}
        cls.requests = {}
        cls.by_backend = {}
        for user, n, streamed in TRAFFIC:
            for i in range(n):
                body = {
                    "model": "auto",
                    "messages": [{"role": "user", "content": f"Question {i} from {user}"}],
                    "max_tokens": 16 + 8 * i,
                }
                if streamed:
                    body.update(stream=True, stream_options={"include_usage": True})
                status, headers, read = cls.call("POST", "/v1/chat/completions", body, key=keys[user])
                assert status == 200, read
                backend = headers["x-tollgate-backend"]
                cost = cls.priced(backend, cls.usage_of(read, streamed))
                if not streamed:
                    # A stream's header is its reserved estimate; a whole answer's is its cost.
                    assert abs(cost - float(headers["x-tollgate-cost-usd"])) < 1e-12, (cost, dict(headers))
                cls.cost[user] = cls.cost.get(user, 0.0) + cost
                cls.requests[user] = cls.requests.get(user, 0) + 1
                spent, count = cls.by_backend.get(backend, (0.0, 0))
                cls.by_backend[backend] = (spent + cost, count + 1)
        # A refusal is no request through a backend and costs nothing anywhere.
        assert cls.call("POST", "/v1/chat/completions", {"model": "auto", "messages": []}, key="tg-bad")[0] == 401
        cls.total = sum(cls.cost.values())
        cls.total_requests = sum(cls.requests.values())
        assert cls.total > 0 and set(cls.by_backend) == {"sim-premium", "sim-cpu"}, cls.by_backend

    @staticmethod
    def usage_of(body, streamed):
        """The answer's usage: the body's, or the stream's usage chunk's."""
        if not streamed:
            return json.loads(body)["usage"]
        for line in body.decode().splitlines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: "):]).get("usage")
                if usage:
                    return usage
        raise AssertionError(f"no usage chunk in {body[-300:]!r}")

    @staticmethod
    def priced(backend, usage):
        prompt, completion = PRICES[backend]
        return (usage["prompt_tokens"] * prompt + usage["completion_tokens"] * completion) / 1e6

    def assertMoney(self, got, expected, what):
        # The headers carry 10 significant digits; sums of a dozen agree far below a micro-cent.
        self.assertAlmostEqual(got, expected, delta=1e-9, msg=what)

    def test_the_dashboard_overview_says_what_was_metered(self):
        overview = self.admin("/admin/dashboard/overview")
        for span in ("today", "month"):
            self.assertMoney(overview[span]["spend_usd"], self.total, f"overview {span}")
            self.assertEqual(overview[span]["requests"], self.total_requests, span)
            premium_cost, premium_requests = self.by_backend["sim-premium"]
            self.assertMoney(overview[span]["premium_spend_usd"], premium_cost, f"{span} premium")
            self.assertEqual(overview[span]["premium_requests"], premium_requests)
        # Since this replica started (metrics): the same, as it started before the traffic.
        self.assertMoney(overview["spend_usd"], self.total, "overview since start")
        self.assertEqual(overview["requests"]["total"], self.total_requests)

    def test_spend_over_time_sums_to_what_was_metered_hourly_daily_and_per_user(self):
        for query in ("", "?bucket=day"):
            spend = self.admin("/admin/dashboard/spend" + query)
            self.assertEqual(spend["timezone"], "UTC")
            self.assertMoney(spend["totals"]["spend_usd"], self.total, f"spend{query} totals")
            self.assertMoney(sum(p["spend_usd"] for p in spend["points"]), self.total, f"spend{query} points")
            self.assertEqual(sum(p["requests"] for p in spend["points"]), self.total_requests)
        for user, cost in self.cost.items():
            spend = self.admin(f"/admin/dashboard/spend?user={user}")
            self.assertMoney(spend["totals"]["spend_usd"], cost, f"{user}'s spend over time")
            self.assertEqual(spend["totals"]["requests"], self.requests[user])

    def test_backends_say_what_each_backend_was_metered(self):
        backends = {b["name"]: b for b in self.admin("/admin/dashboard/backends")["backends"]}
        for name, (cost, count) in self.by_backend.items():
            self.assertMoney(backends[name]["last_24h"]["spend_usd"], cost, f"{name} last 24 h")
            self.assertEqual(backends[name]["last_24h"]["requests"], count)
            self.assertMoney(backends[name]["spend_usd"], cost, f"{name} since start")
            self.assertEqual(backends[name]["requests"], count)
            self.assertEqual(backends[name]["latency_seconds"]["count"], count)

    def test_the_users_table_says_what_each_user_was_metered_in_every_order(self):
        for sort in ("name", "spent", "margin", "requests", "premium_share", "projection", "budget_used"):
            rows, cursor = [], None
            while True:
                page = self.admin(f"/admin/usage?limit=3&sort={sort}" + (f"&cursor={cursor}" if cursor else ""))
                rows.extend(page["data"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            self.assertEqual(sorted(r["user"] for r in rows), sorted(self.cost), f"sort={sort}: every user once")
            for r in rows:
                self.assertMoney(r["spent_usd"], self.cost[r["user"]], f"{r['user']} sort={sort}")
                self.assertEqual(r["requests"], self.requests[r["user"]])
            self.assertMoney(sum(r["spent_usd"] for r in rows), self.total, f"users table sort={sort}")
        by_margin = self.admin("/admin/usage?sort=margin&order=asc&limit=10")["data"]
        margins = [r["margin_usd"] for r in by_margin]
        self.assertEqual(margins, sorted(margins), "margin ascending")

    def test_tollgate_report_says_what_was_metered(self):
        binary = os.environ.get("TOLLGATE_BIN", "target/debug/tollgate")
        out = subprocess.run(
            [binary, "report", "--config", self.config_path, "--json", "--since", "24h"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        report = json.loads(out.stdout)
        users = {u["user"]: u for u in report["users"]}
        for user, cost in self.cost.items():
            self.assertMoney(users[user]["cost_usd"], cost, f"report {user}")
            self.assertEqual(users[user]["requests"], self.requests[user])
            usage = self.admin(f"/admin/usage/{user}")
            self.assertMoney(users[user]["period_spend_usd"], usage["spent_usd"], f"report {user} period")
            # Projected at two moments a second or so apart: the same to a part in a thousand.
            projected = users[user]["projected_period_spend_usd"]
            self.assertAlmostEqual(projected, usage["projection_usd"], delta=projected * 1e-3, msg=f"{user} projection")
        backends = {b["backend"]: b for b in report["backends"]}
        for name, (cost, count) in self.by_backend.items():
            self.assertMoney(backends[name]["attributed_cost_usd"], cost, f"report {name}")
            self.assertEqual(backends[name]["requests"], count)

    def test_a_metrics_scrape_says_what_was_metered(self):
        status, _, read = self.call("GET", "/metrics")
        self.assertEqual(status, 200)
        plan_cost = 0.0
        for line in read.decode().splitlines():
            if line.startswith("tollgate_plan_cost_usd_total{"):
                plan_cost += float(line.rsplit(" ", 1)[1])
        self.assertMoney(plan_cost, self.total, "/metrics tollgate_plan_cost_usd_total")

    def test_bad_windows_are_refused_in_the_openai_error_shape(self):
        for query, param in (("?bucket=week", "bucket"), ("?from=yesterday", "from"), ("?user=ann&from=2020-01-01T00:00:00Z", "from")):
            status, _, read = self.call("GET", "/admin/dashboard/spend" + query, key=ADMIN_KEY)
            self.assertEqual(status, 400, query)
            error = json.loads(read)["error"]
            self.assertEqual(error["param"], param, query)
            self.assertTrue(error["message"], query)
        status, _, _ = self.call("GET", "/admin/dashboard/spend")
        self.assertEqual(status, 401, "no admin key, no data")


if __name__ == "__main__":
    unittest.main()
