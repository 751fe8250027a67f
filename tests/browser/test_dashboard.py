"""The dashboard in a real browser: Chromium driven by Playwright against a real Tollgate process
(simulated backends), after known traffic sent through it with plain HTTP.

Run by scripts/test.sh: TOLLGATE_BIN names the built binary. Skipped when /usr/bin/chromium is
missing, unless CI is set (then it fails). Screenshots go to target/screenshots/.
"""

import hashlib
import json
import os
import re
import sys
import unittest
from datetime import datetime, timezone
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


def first_usd(text, after=""):
    """The first money figure in `text` (a chart's tooltip), or the first one `after` follows."""
    match = re.search(r"(-?\$[\d,.]+)" + re.escape(after), text)
    assert match, (text, after)
    return usd(match.group(1))


def bucket_start(moment, bucket):
    """The RFC 3339 start of the UTC hour or day `moment` falls in, as the API writes it."""
    start = moment.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        start = start.replace(hour=0)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ")


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
            cls.sign_in(cls.context, cls.gateway)
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

    @staticmethod
    def sign_in(context, gateway):
        """Signs `context` in to `gateway`'s dashboard with the login form."""
        page = context.new_page()
        page.goto(gateway.origin + "/dashboard")
        page.fill("input[name=key]", ADMIN_KEY)
        with page.expect_navigation():
            page.click("button[type=submit]")
        page.close()

    # ---- plain HTTP ----

    @classmethod
    def call(cls, method, path, body=None, key=None, headers=None, gateway=None):
        """(status, headers, body bytes) of one request to `gateway` (the seeded one by
        default), errors included."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request((gateway or cls.gateway).origin + path, data=data, method=method)
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
    def admin(cls, method, path, body=None, gateway=None):
        status, _, read = cls.call(method, path, body, key=ADMIN_KEY, gateway=gateway)
        if status >= 300:
            raise AssertionError(f"{method} {path}: {status} {read!r}")
        return json.loads(read) if read else None

    @classmethod
    def seed(cls):
        """API users on a team, then known non-streamed traffic; keeps the costs the gateway
        reported (`cls.costs`, with when each was metered in `cls.metered`), a cache hit, and
        two refusals."""
        cls.admin("POST", "/admin/teams", {"name": "acme"})
        keys = dict(CONFIG_USER_KEYS)
        for name, (plan, team) in API_USERS.items():
            cls.admin("POST", "/admin/users", {"name": name, "plan": plan, "team": team})
            keys[name] = cls.admin("POST", f"/admin/users/{name}/keys", {"label": "browser test"})["key"]
        cls.keys = keys
        cls.costs, cls.metered = [], []
        for user, n in REQUESTS.items():
            for i in range(n):
                cls.metered_chat(user, f"Question {i} from {user}", max_tokens=20 + 10 * i)
        # The same deterministic question twice: the second is a cache hit, $0.
        for expected in ("miss", "hit"):
            headers = cls.metered_chat("ann", "Cache me", temperature=0)
            assert headers["x-tollgate-cache"] == expected, dict(headers)
        assert cls.chat("tg-not-a-key", "Hello")[0] == 401
        assert cls.chat(keys["eve"], "Hello", model="no-such-model")[0] == 404

    @classmethod
    def metered_chat(cls, user, content, **fields):
        """One chat request as `user` that must succeed; keeps its metered cost and the times
        around it. Returns its headers."""
        before = datetime.now(timezone.utc)
        status, headers, read = cls.chat(cls.keys[user], content, **fields)
        assert status == 200, read
        cost = float(headers["x-tollgate-cost-usd"])
        cls.costs.append(cost)
        cls.metered.append((before, datetime.now(timezone.utc), cost))
        return headers

    def metered_by(self, bucket):
        """The metered costs summed by UTC hour or day; None when a request straddled two."""
        sums = {}
        for before, after, cost in self.metered:
            start = bucket_start(after, bucket)
            if bucket_start(before, bucket) != start:
                return None
            sums[start] = sums.get(start, 0.0) + cost
        return sums

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

    def open(self, path="/dashboard", context=None, gateway=None):
        """A page of `context` (the signed-in one by default) at `path` of `gateway` (the seeded
        one by default), its data loaded; its console errors and page errors collected in
        `page.problems`."""
        page = (context or self.context).new_page()
        page.problems = []
        page.on("console", lambda m: m.type in ("error", "warning") and page.problems.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
        page.goto((gateway or self.gateway).origin + path)
        if page.locator("#users").count():
            self.settled(page)
        self.addCleanup(page.close)
        return page

    def settled(self, page):
        for part in ("#overview", "#spend-panel", "#backends", "#users"):
            page.wait_for_selector(f"{part}[aria-busy=false]", state="attached")

    def column(self, page, table, header):
        """The cells of `table`'s column headed `header` (its lowest header cell, a grouped
        header's rows and spans laid out), as one locator."""
        grid = {}
        for r, row in enumerate(page.locator(f"{table} thead tr").all()):
            c = 0
            for th in row.locator("th").all():
                while (r, c) in grid:
                    c += 1
                rows, cols = (int(th.get_attribute(a) or 1) for a in ("rowspan", "colspan"))
                for dr in range(rows):
                    for dc in range(cols):
                        grid[(r + dr, c + dc)] = th.inner_text().strip()
                c += cols
        last = max(r for r, _ in grid)
        index = [grid[(last, c)] for c in range(max(c for _, c in grid) + 1)].index(header) + 1
        return page.locator(f"{table} tbody tr td:nth-child({index})")

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
        reasons = page.locator("#reasons .bar-label").all_inner_texts()
        self.assertEqual(set(reasons), {r["reason"] for r in overview["reasons"]})
        self.assertEqual(set(page.locator("#statuses .bar-label").all_inner_texts()), set(overview["requests"]["by_status"]))
        # Today and this month, from the ledger's rollups: every metered request (the cache's
        # hit too), unless the seeding straddled a UTC midnight.
        for card, span in (("today", overview["today"]), ("month", overview["month"])):
            self.assertTrue(close(usd(page.locator(f"#{card}-spend").inner_text()), span["spend_usd"]), (card, span))
            self.assertIn(f"{span['requests']} requests", page.locator(f"#{card}-sub").inner_text())
            self.assertIn("UTC", page.locator(f"#{card}-sub").inner_text())
        if self.metered_by("day") is not None:
            self.assertTrue(close(overview["today"]["spend_usd"], sent), overview["today"])
            self.assertEqual(overview["today"]["requests"], len(self.costs))
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
        names = [n.strip() for n in self.column(page, "#users-table", "User").all_inner_texts()]
        dans_margin = self.column(page, "#users-table", "Margin").nth(names.index("dan"))
        self.assertIn("negative", dans_margin.get_attribute("class"), "a free user's margin is negative: red")
        for name, row in rows.items():
            self.assertEqual(row["Premium share"], "—" if ledger[name]["premium_share"] is None
                             else f"{100 * ledger[name]['premium_share']:.1f}%", name)
            self.assertTrue(close(usd(row["Projection"]), ledger[name]["projection_usd"], 3), (name, row))
        page.select_option("#sort", "spent")
        self.settled(page)
        by_spend = self.rows(page)
        spends = [usd(r["Spent"]) for r in by_spend.values()]
        self.assertEqual(set(by_spend), set(REQUESTS))
        self.assertEqual(spends, sorted(spends, reverse=True), by_spend)
        self.assertCleanConsole(page)

    def test_users_sort_by_margin_and_requests_either_way(self):
        ledger = self.ledger()
        page = self.open()

        def sort_by(header):
            page.click(f"#users-table thead th button:text-is('{header}')")
            self.settled(page)
            return list(self.rows(page))

        # A margin's first click: the losses first.
        names = sort_by("Margin")
        margins = [ledger[n]["margin_usd"] for n in names]
        self.assertEqual(names[0], min(ledger, key=lambda n: ledger[n]["margin_usd"]), names)
        self.assertEqual(margins, sorted(margins), names)
        self.assertEqual(page.locator("#users-table th[data-sort=margin]").get_attribute("aria-sort"), "ascending")
        self.assertIn("sort=margin&order=asc", page.url)
        # Requests: the busiest first, then, clicked again, the quietest.
        names = sort_by("Requests")
        requests = [ledger[n]["requests"] for n in names]
        self.assertEqual(names[0], max(ledger, key=lambda n: ledger[n]["requests"]), names)
        self.assertEqual(requests, sorted(requests, reverse=True), names)
        self.assertEqual(page.locator("#users-table th[data-sort=requests]").get_attribute("aria-sort"), "descending")
        names = sort_by("Requests")
        self.assertEqual([ledger[n]["requests"] for n in names], sorted(requests), names)
        # The controls say the same, and the note says where the users without a figure go.
        self.assertEqual(page.locator("#sort").input_value(), "requests")
        self.assertEqual(page.locator("#order").input_value(), "asc")
        page.select_option("#sort", "premium_share")
        self.settled(page)
        page.select_option("#order", "desc")
        self.settled(page)
        shares = [ledger[n]["premium_share"] for n in self.rows(page)]
        self.assertEqual(shares, sorted(shares, reverse=True), shares)
        self.assertTrue(page.locator("#sort-note").is_visible())
        page.select_option("#sort", "name")
        self.settled(page)
        self.assertTrue(page.locator("#order").is_disabled(), "a name has one order")
        self.assertTrue(page.locator("#sort-note").is_hidden())
        self.assertEqual(list(self.rows(page)), sorted(REQUESTS))
        self.assertCleanConsole(page)

    def test_the_spend_chart_shows_the_metered_costs(self):
        page = self.open()
        answer = self.admin("GET", "/admin/dashboard/spend")
        self.assertEqual(answer["timezone"], "UTC")
        bars = page.locator("#spend-chart g.bucket")
        self.assertEqual(bars.count(), len(answer["points"]), "a bar per hour of the 48")
        self.assertEqual(len(answer["points"]), 48)
        # The current hour is the last bar; its tooltip has what was metered in it.
        current = bucket_start(datetime.now(timezone.utc), "hour")
        last = bars.last
        if last.get_attribute("data-start") != current:  # the hour turned since the page loaded
            page = self.open()
            last = page.locator("#spend-chart g.bucket").last
        self.assertEqual(last.get_attribute("data-start"), current)
        by_hour = self.metered_by("hour")
        if by_hour is not None:
            for hour, spent in by_hour.items():
                title = page.locator(f'#spend-chart g.bucket[data-start="{hour}"] > title').text_content()
                self.assertTrue(close(first_usd(title), spent), (title, spent))
                self.assertIn("UTC", title)
            title = last.locator("title").text_content()
            self.assertTrue(close(first_usd(title), by_hour.get(current, 0.0)), (title, by_hour))
            if by_hour.get(current):
                self.assertGreaterEqual(last.locator("rect.bar-premium, rect.bar-rest").count(), 1, "drawn")
        # The window's totals: every metered cost, every metered request (the cache's hit too).
        self.assertTrue(close(usd(page.locator("#spend-total").inner_text()), sum(self.costs)))
        self.assertEqual(int(page.locator("#spend-requests").inner_text()), len(self.costs))
        tooltips = sum(first_usd(t) for t in page.locator("#spend-chart g.bucket > title").all_text_contents())
        self.assertTrue(close(tooltips, sum(self.costs), 5), (tooltips, sum(self.costs)))
        self.assertIn("UTC", page.locator("#spend-window").inner_text())
        ticks = page.locator("#spend-chart text.tick-label").all_text_contents()
        self.assertTrue(any(re.fullmatch(r"\d\d:00", t) for t in ticks), ticks)
        self.assertTrue(any(t.startswith("$") and usd(t) >= max(p["spend_usd"] for p in answer["points"]) for t in ticks),
                        ("the money axis reaches the highest bar", ticks))
        # Pointing at a bar shows its figures under the chart.
        last.hover()
        self.assertIn(last.locator("title").text_content().split("\n")[0], page.locator("#spend-readout").inner_text())
        # 31 days, daily: today's bar has today's metered spend.
        page.click("#spend-daily")
        self.settled(page)
        self.assertEqual(page.locator("#spend-daily").get_attribute("aria-pressed"), "true")
        self.assertEqual(page.locator("#spend-chart g.bucket").count(), 31)
        by_day = self.metered_by("day")
        if by_day is not None:
            for day, spent in by_day.items():
                title = page.locator(f'#spend-chart g.bucket[data-start="{day}"] > title').text_content()
                self.assertTrue(close(first_usd(title), spent), (title, spent))
        self.assertTrue(close(usd(page.locator("#spend-total").inner_text()), sum(self.costs)))
        self.assertEqual(page.locator("#spend-peak-label").inner_text(), "Busiest day")
        os.makedirs(SCREENSHOTS, exist_ok=True)
        page.locator("#spend-panel").screenshot(path=os.path.join(SCREENSHOTS, "dashboard-spend-daily.png"))
        self.assertCleanConsole(page)

    def test_the_backends_table_lists_every_backend_with_its_traffic(self):
        page = self.open()
        ledger = self.ledger()
        served = {}
        for u in ledger.values():
            for name, b in u["by_backend"].items():
                served[name] = served.get(name, 0) + b["requests"]
        table = "#backends-table"
        names = [n.split()[0] for n in self.column(page, table, "Backend").all_inner_texts()]
        self.assertEqual(names, ["sim-premium", "sim-cpu", "All"], "every configured backend, then all")
        tiers = page.locator(f"{table} tbody td .tag").all_inner_texts()
        self.assertEqual(tiers, ["quality", "economy"])
        requests = [int(r.replace(",", "")) for r in self.column(page, table, "Requests").all_inner_texts()]
        self.assertEqual(dict(zip(names, requests)), {**served, "All": len(self.costs)})
        self.assertEqual(self.column(page, table, "Health").all_inner_texts()[:2], ["up", "up"])
        self.assertEqual(self.column(page, table, "Errors").all_inner_texts(), ["0", "0", "0"])
        spends = [usd(t) for t in self.column(page, table, "Spend").all_inner_texts()]
        self.assertTrue(close(spends[-1], sum(self.costs)), spends)
        answer = self.admin("GET", "/admin/dashboard/backends")
        for header, field, quantile in (("Latency p50", "latency_seconds", "p50"), ("p90", "latency_seconds", "p90"),
                                        ("p99", "latency_seconds", "p99")):
            shown = self.column(page, table, header).all_inner_texts()[:2]
            self.assertTrue(all(re.fullmatch(r"[\d,.]+ ms", t) for t in shown), (header, shown))
            for text, b in zip(shown, answer["backends"]):
                self.assertAlmostEqual(float(text[:-3].replace(",", "")), 1000 * b[field][quantile], delta=0.051)
        self.assertEqual(self.column(page, table, "Utilisation").all_inner_texts()[:2][0], "—", "per token: none")
        self.assertRegex(self.column(page, table, "Utilisation").all_inner_texts()[1], r"^(<0\.1|\d+\.\d)%$")
        self.assertRegex(self.column(page, table, "Idle cost").all_inner_texts()[1], r"^\$")
        self.assertIn("UTC", page.locator("#backends-scope").inner_text())
        self.assertCleanConsole(page)

    def test_pages_of_two_show_every_user_once_forth_and_back(self):
        for sort, order in (("name", ""), ("spent", ""), ("margin", "asc"), ("requests", "desc"), ("projection", "asc")):
            with self.subTest(sort=sort, order=order):
                page = self.open(f"/dashboard?limit=2&sort={sort}" + (f"&order={order}" if order else ""))
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
        # The period chart: the month so far by day, the last day's "so far" is the spend.
        spend = self.admin("GET", f"/admin/dashboard/spend?user={name}&bucket=day&from={usage['period_start']}")
        bands = page.locator("#user-chart g.bucket")
        self.assertEqual(bands.count(), len(spend["points"]))
        self.assertTrue(close(first_usd(bands.last.locator("title").text_content(), " so far"), usage["spent_usd"]))
        for part in ("polyline.spent-line", "line.budget-line", "line.pace-line"):
            self.assertEqual(page.locator(f"#user-chart {part}").count(), 1, part)
        self.assertIn("UTC", page.locator("#user-chart-title").inner_text())
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

    def test_a_gateway_without_traffic_shows_its_empty_states(self):
        gateway = Gateway(CONFIG, {"TOLLGATE_DASHBOARD_ADMIN_KEY": ADMIN_KEY})
        self.addCleanup(gateway.stop)
        context = self.browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        self.addCleanup(context.close)
        self.sign_in(context, gateway)
        page = self.open(context=context, gateway=gateway)
        for figure in ("#today-spend", "#month-spend", "#spend", "#spend-total"):
            self.assertEqual(page.locator(figure).inner_text(), "$0.00", figure)
        self.assertEqual(page.locator("#spend-chart text.chart-empty").text_content(), "No spend in this window.")
        self.assertEqual(page.locator("#spend-chart g.bucket").count(), 48)
        self.assertEqual(page.locator("#spend-chart rect.bar-rest, #spend-chart rect.bar-premium").count(), 0)
        self.assertEqual(page.locator("#spend-peak").inner_text(), "—")
        self.assertEqual(page.locator("#reasons .empty").inner_text(), "No requests yet.")
        names = [n.split()[0] for n in self.column(page, "#backends-table", "Backend").all_inner_texts()]
        self.assertEqual(names, ["sim-premium", "sim-cpu", "All"])
        self.assertEqual(self.column(page, "#backends-table", "Requests").all_inner_texts(), ["0", "0", "0"])
        self.assertEqual(self.column(page, "#backends-table", "Latency p50").all_inner_texts(), ["—", "—", ""])
        self.assertEqual(list(self.rows(page)), ["ann", "bob"], "the config users, with nothing spent")
        os.makedirs(SCREENSHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SCREENSHOTS, "dashboard-empty.png"), full_page=True)
        page.click("#spend-daily")
        self.settled(page)
        self.assertEqual(page.locator("#spend-chart text.chart-empty").text_content(), "No spend in this window.")
        self.assertCleanConsole(page)
        self.user_view(page, "ann")
        start = self.admin("GET", "/admin/usage/ann", gateway=gateway)["period_start"]
        spend = self.admin("GET", f"/admin/dashboard/spend?user=ann&bucket=day&from={start}", gateway=gateway)
        self.assertEqual(page.locator("#user-chart g.bucket").count(), len(spend["points"]))
        self.assertEqual(spend["totals"]["requests"], 0)
        self.assertEqual(page.locator("#user-chart line.pace-line").count(), 1)
        page.screenshot(path=os.path.join(SCREENSHOTS, "dashboard-empty-user.png"), full_page=True)
        # A config user's keys are a 404 the page expects: an answer, not a script error.
        self.assertFalse([p for p in page.problems if "pageerror" in p or "Content Security" in p], page.problems)

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
