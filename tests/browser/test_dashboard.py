"""The dashboard in a real browser: Chromium driven by Playwright against a real Tollgate process
(simulated backends), after known traffic sent through it with plain HTTP.

Run by scripts/test.sh: TOLLGATE_BIN names the built binary. Skipped when /usr/bin/chromium is
missing, unless CI is set (then it fails). Screenshots go to target/screenshots/.
"""

import hashlib
import json
import os
import sys
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from gateway import Gateway  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "screenshots")
ADMIN_KEY = "tg-dashboard-admin-key-for-the-browser-test"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
CONFIG_USER_KEYS = {"ann": "tg-dashboard-ann", "bob": "tg-dashboard-bob"}
# API users: (plan, team).
API_USERS = {"cat": ("pro", "acme"), "dan": ("free", "acme"), "eve": ("pro", None)}
# Non-streamed chat requests per user (distinct prompts: no cache hits among them).
REQUESTS = {"ann": 3, "bob": 2, "cat": 2, "dan": 1, "eve": 1}


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


CONFIG = f"""
[server]
listen = "127.0.0.1:0"
admin_key_env = "TOLLGATE_DASHBOARD_ADMIN_KEY"

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
pricing = {{ hourly_usd = 0.12 }}

[[routes]]
model = "auto"
backends = ["sim-premium", "sim-cpu"]

[[plans]]
name = "pro"
price_usd = 20
policy = "quality-first"
budget_usd = 100

[[plans]]
name = "free"
price_usd = 0
policy = "cost-first"
budget_usd = 1

[[users]]
name = "ann"
key_sha256 = "{sha256(CONFIG_USER_KEYS["ann"])}"
plan = "pro"

[[users]]
name = "bob"
key_sha256 = "{sha256(CONFIG_USER_KEYS["bob"])}"
plan = "free"

[cache]
scope = "user"
"""

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # scripts/test.sh installs it; a bare run may not have it
    sync_playwright = None


def usd(text):
    """A money figure as the page shows it ("$1,234.56", "-$0.000039") back to a float."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    return sign * float(text.lstrip("-").lstrip("$").replace(",", ""))


def close(a, b, digits=6):
    """Equal to the page's 6 significant digits."""
    return abs(a - b) <= max(abs(a), abs(b)) * 10 ** (1 - digits) / 2 + 1e-15


class DashboardInABrowser(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(CHROMIUM) or sync_playwright is None:
            missing = CHROMIUM if sync_playwright else "the playwright package"
            if os.environ.get("CI"):
                raise RuntimeError(f"{missing} is required under CI")
            raise unittest.SkipTest(f"{missing} is missing: the dashboard's browser test is skipped")
        cls.gateway = Gateway(CONFIG, {"TOLLGATE_DASHBOARD_ADMIN_KEY": ADMIN_KEY})
        try:
            cls.seed()
            cls.playwright = sync_playwright().start()
            cls.browser = cls.playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            cls.context = cls.browser.new_context(viewport={"width": 1280, "height": 800})
            page = cls.context.new_page()
            page.goto(cls.gateway.origin + "/dashboard")
            page.fill("input[name=key]", ADMIN_KEY)
            with page.expect_navigation():
                page.click("button[type=submit]")
            page.close()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for closing in ("context", "browser"):
            if hasattr(cls, closing):
                getattr(cls, closing).close()
        if hasattr(cls, "playwright"):
            cls.playwright.stop()
        if hasattr(cls, "gateway"):
            cls.gateway.stop()

    # ---- plain HTTP ----

    @classmethod
    def call(cls, method, path, body=None, key=None, headers=None):
        """(status, headers, body bytes) of one request, errors included."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(cls.gateway.origin + path, data=data, method=method)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        if isinstance(body, dict):
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    @classmethod
    def admin(cls, method, path, body=None):
        status, _, read = cls.call(method, path, body, key=ADMIN_KEY)
        if status >= 300:
            raise AssertionError(f"{method} {path}: {status} {read!r}")
        return json.loads(read) if read else None

    @classmethod
    def seed(cls):
        """API users on a team, then known non-streamed traffic; keeps the costs the gateway
        reported, a cache hit, and two refusals."""
        cls.admin("POST", "/admin/teams", {"name": "acme"})
        keys = dict(CONFIG_USER_KEYS)
        for name, (plan, team) in API_USERS.items():
            cls.admin("POST", "/admin/users", {"name": name, "plan": plan, "team": team})
            keys[name] = cls.admin("POST", f"/admin/users/{name}/keys", {"label": "browser test"})["key"]
        cls.keys = keys
        cls.costs = []
        for user, n in REQUESTS.items():
            for i in range(n):
                status, headers, read = cls.chat(keys[user], f"Question {i} from {user}", max_tokens=20 + 10 * i)
                assert status == 200, read
                cls.costs.append(float(headers["x-tollgate-cost-usd"]))
        # The same deterministic question twice: the second is a cache hit, $0.
        for expected in ("miss", "hit"):
            status, headers, read = cls.chat(keys["ann"], "Cache me", temperature=0)
            assert status == 200 and headers["x-tollgate-cache"] == expected, (status, dict(headers))
            cls.costs.append(float(headers["x-tollgate-cost-usd"]))
        assert cls.chat("tg-not-a-key", "Hello")[0] == 401
        assert cls.chat(keys["eve"], "Hello", model="no-such-model")[0] == 404

    @classmethod
    def chat(cls, key, content, model="auto", **fields):
        body = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
        return cls.call("POST", "/v1/chat/completions", body, key=key)

    def ledger(self):
        """Every user's usage from /admin/usage (all pages), by name."""
        users, cursor = {}, None
        while True:
            page = self.admin("GET", "/admin/usage?limit=2" + (f"&cursor={cursor}" if cursor else ""))
            users.update({u["user"]: u for u in page["data"]})
            cursor = page["next_cursor"]
            if cursor is None:
                return users

    # ---- the browser ----

    def open(self, path="/dashboard", context=None):
        """A page of `context` (the signed-in one by default) at `path`, its data loaded; its
        console errors and page errors collected in `page.problems`."""
        page = (context or self.context).new_page()
        page.problems = []
        page.on("console", lambda m: m.type in ("error", "warning") and page.problems.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
        page.goto(self.gateway.origin + path)
        if page.locator("#users").count():
            self.settled(page)
        self.addCleanup(page.close)
        return page

    def settled(self, page):
        page.wait_for_selector("#overview[aria-busy=false]", state="attached")
        page.wait_for_selector("#users[aria-busy=false]", state="attached")

    def rows(self, page):
        """The users table as {user: {column: text}}, in the page's order."""
        headers = page.locator("#users-table thead th").all_inner_texts()
        rows = {}
        for row in page.locator("#users-table tbody tr").all():
            cells = row.locator("td").all_inner_texts()
            rows[cells[0]] = dict(zip(headers, cells))
        return rows

    def assertCleanConsole(self, page):
        self.assertEqual(page.problems, [], "no console errors, CSP violations or page errors")

    def test_without_a_session_only_the_login_form_is_served(self):
        context = self.browser.new_context()
        self.addCleanup(context.close)
        page = context.new_page()
        self.addCleanup(page.close)
        response = page.goto(self.gateway.origin + "/dashboard")
        self.assertEqual(response.status, 200)
        headers = response.headers
        self.assertEqual(headers["content-security-policy"], CSP)
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertEqual(page.locator("form[action='/dashboard/login'] input[name=key][type=password]").count(), 1)
        self.assertEqual(page.locator("#overview, #users, script").count(), 0)
        for path in ("/admin/dashboard/overview", "/admin/usage", "/dashboard/app.js", "/dashboard/app.css"):
            self.assertEqual(self.call("GET", path)[0], 401, path)

    def test_a_wrong_key_is_refused_and_never_echoed(self):
        context = self.browser.new_context()
        self.addCleanup(context.close)
        page = self.open(context=context)
        wrong = "tg-wrong-guess-0123456789"
        page.fill("input[name=key]", wrong)
        with page.expect_navigation() as navigation:
            page.click("button[type=submit]")
        self.assertEqual(navigation.value.status, 401)
        self.assertIn("not the admin key", page.locator(".error").inner_text())
        self.assertNotIn(wrong, page.content())
        self.assertEqual(page.locator("#overview").count(), 0)
        self.assertEqual(context.cookies(), [])
        self.assertFalse([p for p in page.problems if "Content Security Policy" in p], page.problems)

    def test_the_session_cookie_is_http_only_and_reads_but_never_writes(self):
        page = self.open()
        [cookie] = [c for c in self.context.cookies() if c["name"] == "tollgate_session"]
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual(cookie["sameSite"], "Strict")
        self.assertNotIn("tollgate_session", page.evaluate("document.cookie"))
        session = {"Cookie": f"tollgate_session={cookie['value']}"}
        self.assertEqual(self.call("GET", "/admin/usage", headers=session)[0], 200)
        self.assertEqual(self.call("POST", "/admin/reload", headers=session)[0], 401, "no admin write by cookie")
        bad = {"Cookie": "tollgate_session=" + "0" * 64}
        self.assertEqual(self.call("GET", "/admin/usage", headers=bad)[0], 401)
        self.assertCleanConsole(page)

    def test_the_overview_spend_is_the_requests_costs_and_the_ledgers_total(self):
        page = self.open()
        shown = usd(page.locator("#spend").inner_text())
        sent = sum(self.costs)
        ledger = sum(u["spent_usd"] for u in self.ledger().values())
        self.assertTrue(sent > 0)
        self.assertTrue(close(shown, sent), (shown, sent))
        self.assertAlmostEqual(ledger, sent, places=12)
        overview = self.admin("GET", "/admin/dashboard/overview")
        self.assertAlmostEqual(overview["spend_usd"], sent, places=12)
        self.assertEqual(overview["scope"], "since_start_this_replica")
        self.assertEqual(overview["requests"]["total"], sum(REQUESTS.values()) + 1, "the cache's miss went through")
        self.assertEqual(overview["cache"]["hits"], 1)
        self.assertEqual(overview["refusals"]["by_code"], {"invalid_api_key": 1, "model_not_found": 1})
        self.assertEqual(page.locator("#refusals").inner_text(), "2")
        self.assertIn("UTC", page.locator("#overview-scope").inner_text())
        self.assertIn("UTC", page.locator("#stamp").inner_text())
        backends = {r.locator("td").first.inner_text().split()[0] for r in page.locator("#backends tbody tr").all()}
        self.assertEqual(backends, {"sim-premium", "sim-cpu", "All"})
        reasons = page.locator("#reasons .bar-label").all_inner_texts()
        self.assertEqual(set(reasons), {r["reason"] for r in overview["reasons"]})
        self.assertCleanConsole(page)

    def test_users_show_the_ledgers_spend_and_sort_by_spend(self):
        page = self.open()
        ledger = self.ledger()
        rows = self.rows(page)
        self.assertEqual(list(rows), sorted(REQUESTS), "by name")
        for name, row in rows.items():
            self.assertTrue(close(usd(row["Spent"]), ledger[name]["spent_usd"]), (name, row, ledger[name]))
            self.assertEqual(int(row["Requests"]), ledger[name]["requests"])
        self.assertEqual(rows["bob"]["Plan"], "free")
        self.assertEqual(rows["cat"]["Team"], "acme")
        dans_margin = page.locator("#users-table tbody tr", has_text="dan").locator("td").nth(7)
        self.assertIn("negative", dans_margin.get_attribute("class"), "a free user's margin is negative: red")
        page.select_option("#sort", "spent")
        self.settled(page)
        by_spend = self.rows(page)
        spends = [usd(r["Spent"]) for r in by_spend.values()]
        self.assertEqual(set(by_spend), set(REQUESTS))
        self.assertEqual(spends, sorted(spends, reverse=True), by_spend)
        self.assertCleanConsole(page)

    def test_pages_of_two_show_every_user_once_forth_and_back(self):
        for sort in ("name", "spent"):
            with self.subTest(sort=sort):
                page = self.open(f"/dashboard?limit=2&sort={sort}")
                forth = [list(self.rows(page))]
                while page.locator("#next").is_enabled():
                    page.click("#next")
                    self.settled(page)
                    forth.append(list(self.rows(page)))
                names = [n for p in forth for n in p]
                self.assertEqual(sorted(names), sorted(REQUESTS), forth)
                self.assertTrue(all(len(p) <= 2 for p in forth), forth)
                self.assertFalse(page.locator("#next").is_enabled())
                back = [list(self.rows(page))]
                while page.locator("#prev").is_enabled():
                    page.click("#prev")
                    self.settled(page)
                    back.append(list(self.rows(page)))
                self.assertEqual(back, forth[::-1])
                self.assertEqual(page.locator("#page-label").inner_text(), "Page 1")
                self.assertCleanConsole(page)

    def test_filters_by_plan_team_and_over_price(self):
        page = self.open()
        cases = [
            ({"plan": "free"}, {"bob", "dan"}),
            ({"team": "acme"}, {"cat", "dan"}),
            ({"plan": "pro", "team": "acme"}, {"cat"}),
            ({"over_price": True}, {"bob", "dan"}),
            ({}, set(REQUESTS)),
        ]
        for filters, expected in cases:
            with self.subTest(filters=filters):
                page.fill("#filter-plan", filters.get("plan", ""))
                page.fill("#filter-team", filters.get("team", ""))
                page.set_checked("#over-price", filters.get("over_price", False))
                self.settled(page)
                page.click("#filters button[type=submit]")
                self.settled(page)
                self.assertEqual(set(self.rows(page)), expected)
        self.assertCleanConsole(page)

    def user_view(self, page, name):
        """Opens `name`'s view from its link in the users table."""
        page.click(f"#users-table tbody a[href='#user={name}']")
        page.wait_for_selector("#user:not([hidden])")
        page.wait_for_selector("#user[aria-busy=false]")
        self.assertTrue(page.locator("#users").is_hidden())

    def test_a_users_view_shows_its_spend_requests_and_keys(self):
        page = self.open()
        name = "cat"
        self.user_view(page, name)
        usage = self.admin("GET", f"/admin/usage/{name}")
        self.assertEqual(page.locator("#user-title").inner_text(), name)
        self.assertIn("pro", page.locator("#user-scope").inner_text())
        self.assertIn("acme", page.locator("#user-scope").inner_text())
        self.assertTrue(close(usd(page.locator("#user-spent").inner_text()), usage["spent_usd"]))
        self.assertTrue(page.locator("#user-meter").is_visible())
        self.assertTrue(page.locator("#user-meter-pace").is_visible(), "a monthly budget has a pace line")
        self.assertIn("at this pace", page.locator("#user-projection-sub").inner_text())
        rows = page.locator("#user-requests tbody tr")
        self.assertEqual(rows.count(), REQUESTS[name])
        costs = [usd(c) for c in page.locator("#user-requests tbody td:nth-child(5)").all_inner_texts()]
        self.assertLessEqual(abs(sum(costs) - usage["spent_usd"]), usage["spent_usd"] * 1e-5, (costs, usage))
        times = page.locator("#user-requests tbody td:first-child").all_inner_texts()
        self.assertEqual(times, sorted(times, reverse=True), "newest first")
        self.assertTrue(all(t.endswith("UTC") for t in times), times)
        records = self.admin("GET", f"/admin/requests?user={name}&limit=50")["data"]
        self.assertEqual({r["user"] for r in records}, {name})
        self.assertEqual(len(records), REQUESTS[name])
        self.assertEqual(len(self.admin("GET", f"/admin/requests?user={name}&limit=1")["data"]), 1)
        mix = page.locator("#user-spend-mix .bar-label").all_inner_texts()
        self.assertEqual({m.split()[0] for m in mix}, set(usage["by_backend"]))
        key = self.keys[name]
        [listed] = self.admin("GET", f"/admin/users/{name}/keys")["data"]
        self.assertIn(listed["prefix"], page.locator("#user-keys").inner_text())
        self.assertNotIn(key, page.content(), "the full key never reaches the page")
        self.assertEqual(page.locator("#user-keys tbody tr").count(), 1)
        page.click("text=Back to users")
        page.wait_for_selector("#user", state="hidden")
        self.assertTrue(page.locator("#users-table").is_visible())
        self.assertEqual(set(self.rows(page)), set(REQUESTS))
        self.assertCleanConsole(page)

    def test_a_config_users_view_and_an_unknown_user(self):
        page = self.open()
        self.user_view(page, "bob")
        self.assertIn("config file", page.locator("#user-keys-note").inner_text())
        self.assertEqual(page.locator("#user-requests tbody tr").count(), REQUESTS["bob"])
        self.assertTrue(page.locator("#user-margin").get_attribute("class").find("negative") >= 0, "free: red")
        page = self.open("/dashboard#user=nobody")
        page.wait_for_selector("#user[aria-busy=false]")
        self.assertIn("No user is named", page.locator("#user-error").inner_text())
        self.assertTrue(page.locator("#user-body").is_hidden())
        # The 404s the page asked for are answers, not script errors.
        self.assertFalse([p for p in page.problems if "pageerror" in p or "Content Security" in p], page.problems)

    def test_screenshots_on_a_laptop_and_a_phone(self):
        os.makedirs(SCREENSHOTS, exist_ok=True)
        for name, viewport in (("desktop", {"width": 1280, "height": 800}), ("phone", {"width": 390, "height": 844})):
            context = self.browser.new_context(
                viewport=viewport, storage_state=self.context.storage_state(), device_scale_factor=1
            )
            self.addCleanup(context.close)
            page = self.open(context=context)
            page.screenshot(path=os.path.join(SCREENSHOTS, f"dashboard-{name}.png"), full_page=True)
            page.set_checked("#over-price", True)
            self.settled(page)
            page.screenshot(path=os.path.join(SCREENSHOTS, f"dashboard-{name}-over-price.png"), full_page=True)
            page.set_checked("#over-price", False)
            self.settled(page)
            self.user_view(page, "cat")
            page.screenshot(path=os.path.join(SCREENSHOTS, f"dashboard-user-{name}.png"), full_page=True)
            if name == "phone":
                width = page.evaluate("document.documentElement.scrollWidth")
                self.assertLessEqual(width, 390, "only the tables scroll sideways, not the page")
            self.assertCleanConsole(page)
            login = self.browser.new_context(viewport=viewport)
            self.addCleanup(login.close)
            page = self.open(context=login)
            page.screenshot(path=os.path.join(SCREENSHOTS, f"login-{name}.png"), full_page=True)
            self.assertCleanConsole(page)

    def test_signing_out_ends_the_session(self):
        context = self.browser.new_context()
        self.addCleanup(context.close)
        page = self.open(context=context)
        page.fill("input[name=key]", ADMIN_KEY)
        with page.expect_navigation():
            page.click("button[type=submit]")
        self.settled(page)
        [cookie] = [c for c in context.cookies() if c["name"] == "tollgate_session"]
        with page.expect_navigation():
            page.click("text=Sign out")
        self.assertEqual(page.locator("input[name=key]").count(), 1)
        self.assertEqual(context.cookies(), [])
        session = {"Cookie": f"tollgate_session={cookie['value']}"}
        self.assertEqual(self.call("GET", "/admin/usage", headers=session)[0], 401, "the old cookie is dead")
        self.assertCleanConsole(page)


if __name__ == "__main__":
    unittest.main()
