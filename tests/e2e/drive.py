"""End to end with real parts: the official OpenAI (and Anthropic) Python SDKs against a running Tollgate that
routes between a real llama.cpp CPU backend and a premium backend (config/local-cpu.toml).

Run by scripts/e2e-real.sh, which starts everything and passes, in the environment:
  TOLLGATE_URL      http://127.0.0.1:PORT (the gateway)
  LLAMA_URL         http://127.0.0.1:PORT (llama-server, for the direct-call comparison)
  ADMIN_KEY         the gateway's admin key
  PROMETHEUS_URL    a Prometheus scraping the gateway (phase `prometheus`)
  FIGURES           where to write the measured figures (JSON)
  HOURLY_USD, INPUT_PER_MTOK, OUTPUT_PER_MTOK   the prices in the config under test

  python drive.py traffic      # SDK checks + figures
  python drive.py prometheus   # what Prometheus scraped, rules and dashboard queries

Every check prints `ok - NAME` or `FAIL - NAME: why`; the last line is `N passed, N failed`.
"""

import json
import os
import re
import statistics
import sys
import threading
import time
import traceback

import urllib.error
import urllib.parse
import urllib.request

import openai
from openai import OpenAI

TOLLGATE = os.environ["TOLLGATE_URL"]
ADMIN_KEY = os.environ["ADMIN_KEY"]
QUALITY_KEY = "tg-local-quality-key"
COST_KEY = "tg-local-cost-key"
CPU, PREMIUM = "cpu-smollm2", "premium"
HOURLY_USD = float(os.environ.get("HOURLY_USD", "0.10"))
INPUT_PER_MTOK = float(os.environ.get("INPUT_PER_MTOK", "0.60"))
OUTPUT_PER_MTOK = float(os.environ.get("OUTPUT_PER_MTOK", "2.40"))
# SmolLM2 needs a short system message of its own (see config/local-cpu.toml).
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

passed, failed = [], []


def check(name):
    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failed.append(name)
            print(f"FAIL - {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
        else:
            passed.append(name)
            print(f"ok - {name}", flush=True)
        return fn

    return wrap


def finish():
    print(f"{len(passed)} passed, {len(failed)} failed", flush=True)
    sys.exit(1 if failed else 0)


def client(key, base=TOLLGATE + "/v1"):
    return OpenAI(base_url=base, api_key=key, max_retries=0, timeout=90)


def ask(text):
    return [SYSTEM, {"role": "user", "content": text}]


def http(method, url, headers=None, body=None):
    """(status, body text) of one plain HTTP call (the standard library: no SDK involved)."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def admin(path):
    status, text = http("GET", TOLLGATE + path, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200, (path, status, text)
    return json.loads(text)


def metric_samples(text, name):
    """`name{labels} value` lines of a Prometheus text exposition, as (labels dict, value)."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def has_words(text):
    return re.search(r"[A-Za-z]{2,}", text or "") is not None


def stream_text(stream):
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


# Results the later checks and the figures use.
seen = {"calls": []}


def traffic():
    cost, quality = client(COST_KEY), client(QUALITY_KEY)

    @check("cost-first user, non-streaming: the real CPU backend answers with text and usage")
    def _():
        raw = cost.chat.completions.with_raw_response.create(
            model="auto", messages=ask("What is the capital of France?"), max_tokens=48, temperature=0
        )
        h = raw.headers
        assert h["x-tollgate-backend"] == CPU, h["x-tollgate-backend"]
        assert h["x-tollgate-tier"] == "economy", h["x-tollgate-tier"]
        assert h["x-tollgate-reason"] == "cost-first", h["x-tollgate-reason"]
        c = raw.parse()
        text = c.choices[0].message.content
        assert has_words(text), f"no words in the CPU answer: {text!r}"
        assert c.usage.prompt_tokens > 0 and 0 < c.usage.completion_tokens <= 48, c.usage
        assert float(h["x-tollgate-cost-usd"]) > 0, h["x-tollgate-cost-usd"]
        assert 0 < float(h["x-tollgate-budget-remaining-usd"]) < 0.50, h["x-tollgate-budget-remaining-usd"]
        print(f"   CPU answer: {text.strip()[:100]!r} usage={c.usage.prompt_tokens}+{c.usage.completion_tokens}")
        seen["calls"].append(("local-cost", CPU, False, c.usage, float(h["x-tollgate-cost-usd"])))

    @check("cost-first user, streaming: the real CPU backend streams text, then the usage chunk asked for")
    def _():
        raw = cost.chat.completions.with_raw_response.create(
            model="auto",
            messages=ask("Name three fruits."),
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-tollgate-backend"] == CPU, raw.headers["x-tollgate-backend"]
        assert raw.headers["x-tollgate-reason"] == "cost-first", raw.headers["x-tollgate-reason"]
        assert raw.headers["content-type"].startswith("text/event-stream"), raw.headers["content-type"]
        text, usage = stream_text(raw.parse())
        assert has_words(text), f"no words in the streamed CPU answer: {text!r}"
        assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 48, usage
        seen["calls"].append(("local-cost", CPU, True, usage, None))

    @check("cost-first user, streaming without include_usage: no usage chunk reaches the client")
    def _():
        chunks = list(
            cost.chat.completions.create(
                model="auto", messages=ask("Say hello."), max_tokens=16, temperature=0, stream=True
            )
        )
        assert chunks and all(ch.usage is None for ch in chunks), "a usage chunk nobody asked for"
        assert has_words("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        seen["calls"].append(("local-cost", CPU, True, None, None))

    @check("quality-first user, non-streaming: premium, charged per token")
    def _():
        raw = quality.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Explain what a gateway does."), max_tokens=64
        )
        h = raw.headers
        assert h["x-tollgate-backend"] == PREMIUM and h["x-tollgate-tier"] == "quality", h["x-tollgate-backend"]
        assert h["x-tollgate-reason"] == "quality-first", h["x-tollgate-reason"]
        c = raw.parse()
        assert has_words(c.choices[0].message.content)
        want = (c.usage.prompt_tokens * INPUT_PER_MTOK + c.usage.completion_tokens * OUTPUT_PER_MTOK) / 1e6
        got = float(h["x-tollgate-cost-usd"])
        assert abs(got - want) < 1e-9, f"cost header {got} != per-token price {want}"
        seen["calls"].append(("local-quality", PREMIUM, False, c.usage, got))

    @check("quality-first user, streaming: premium, with usage")
    def _():
        raw = quality.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Explain budgets."), max_tokens=64, stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-tollgate-backend"] == PREMIUM, raw.headers["x-tollgate-backend"]
        text, usage = stream_text(raw.parse())
        assert has_words(text) and usage is not None and usage.completion_tokens > 0, (text, usage)
        seen["calls"].append(("local-quality", PREMIUM, True, usage, None))

    @check("quality-first user pinning the CPU backend by name gets it, reason `pinned`")
    def _():
        raw = quality.chat.completions.with_raw_response.create(
            model=CPU, messages=ask("What is 2 + 2?"), max_tokens=16, temperature=0
        )
        assert raw.headers["x-tollgate-backend"] == CPU, raw.headers["x-tollgate-backend"]
        assert raw.headers["x-tollgate-reason"] == "pinned", raw.headers["x-tollgate-reason"]
        c = raw.parse()
        assert has_words(c.choices[0].message.content) or re.search(r"\d", c.choices[0].message.content)
        seen["calls"].append(("local-quality", CPU, False, c.usage, float(raw.headers["x-tollgate-cost-usd"])))

    @check("cost-first user's long prompt escalates to premium: escalated:context")
    def _():
        # ~2,600 estimated tokens: more than the CPU backend's 2,048-token context.
        long_text = "Summarise the following notes in one sentence. " + " ".join(
            f"Note {i}: the meeting moved the release of component {i} to next week." for i in range(150)
        )
        raw = cost.chat.completions.with_raw_response.create(
            model="auto", messages=ask(long_text), max_tokens=64
        )
        h = raw.headers
        assert h["x-tollgate-backend"] == PREMIUM, h["x-tollgate-backend"]
        assert h["x-tollgate-reason"] == "escalated:context", h["x-tollgate-reason"]
        c = raw.parse()
        assert has_words(c.choices[0].message.content)
        assert c.usage.prompt_tokens > 2048, c.usage
        seen["calls"].append(("local-cost", PREMIUM, False, c.usage, float(h["x-tollgate-cost-usd"])))

    @check("cost-first request while the one-slot CPU backend is busy escalates: escalated:capacity")
    def _():
        first = cost.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Write a short poem about the sea."), max_tokens=96,
            temperature=0, stream=True,
        )
        assert first.headers["x-tollgate-backend"] == CPU, first.headers["x-tollgate-backend"]
        stream = first.parse()
        it = iter(stream)
        next(it)  # the CPU backend is generating now
        second = cost.chat.completions.with_raw_response.create(
            model="auto", messages=ask("Say hi."), max_tokens=16
        )
        rest = "".join(ch.choices[0].delta.content or "" for ch in it if ch.choices)
        assert second.headers["x-tollgate-backend"] == PREMIUM, second.headers["x-tollgate-backend"]
        assert second.headers["x-tollgate-reason"] == "escalated:capacity", second.headers["x-tollgate-reason"]
        assert has_words(rest), rest
        c = second.parse()
        seen["calls"].append(("local-cost", CPU, True, None, None))
        seen["calls"].append(("local-cost", PREMIUM, False, c.usage, float(second.headers["x-tollgate-cost-usd"])))

    @check("malformed JSON gets Tollgate's 400 invalid_request, never llama-server's 500")
    def _():
        status, text = http(
            "POST",
            TOLLGATE + "/v1/chat/completions",
            {"Authorization": f"Bearer {COST_KEY}", "Content-Type": "application/json"},
            b'{"model":"auto","messages":[{"role":"user","content":"hi"}',
        )
        assert status == 400, (status, text)
        assert json.loads(text)["error"]["code"] == "invalid_request", text

    @check("a wrong key is refused by the SDK with AuthenticationError (401)")
    def _():
        try:
            client("sk-wrong").chat.completions.create(model="auto", messages=ask("hi"), max_tokens=4)
        except openai.AuthenticationError as e:
            assert e.status_code == 401 and e.code == "invalid_api_key", e
        else:
            raise AssertionError("no error")

    @check("Responses API (official openai SDK) passed through to the real CPU backend, streamed and not")
    def _():
        raw = cost.responses.with_raw_response.create(
            model=CPU, instructions=SYSTEM["content"], input="Name a colour.", max_output_tokens=24, temperature=0
        )
        assert raw.headers["x-tollgate-backend"] == CPU, raw.headers["x-tollgate-backend"]
        response = raw.parse()
        assert response.object == "response" and response.status in ("completed", "incomplete"), response.status
        assert has_words(response.output_text), response.output_text
        assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 24, response.usage
        types, text, completed = [], "", None
        for event in cost.responses.create(
            model=CPU, instructions=SYSTEM["content"], input="Name a fruit.", max_output_tokens=24, stream=True
        ):
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type in ("response.completed", "response.incomplete"):
                completed = event.response
        assert types[0] == "response.created" and completed is not None, types
        assert has_words(text) and completed.output_text == text, (text, completed.output_text)
        assert completed.usage.output_tokens > 0, completed.usage

    @check("Messages API (official anthropic SDK, x-api-key) passed through to the real CPU backend, streamed and not")
    def _():
        import anthropic

        claude = anthropic.Anthropic(base_url=TOLLGATE, api_key=COST_KEY, max_retries=0, timeout=90)
        raw = claude.messages.with_raw_response.create(
            model=CPU, max_tokens=24, system=SYSTEM["content"], messages=[{"role": "user", "content": "Name a city."}]
        )
        assert raw.headers["x-tollgate-backend"] == CPU, raw.headers["x-tollgate-backend"]
        message = raw.parse()
        assert message.type == "message" and message.stop_reason in ("end_turn", "max_tokens"), message.stop_reason
        assert has_words(message.content[0].text), message.content
        assert message.usage.output_tokens > 0, message.usage
        with claude.messages.stream(
            model=CPU, max_tokens=24, system=SYSTEM["content"], messages=[{"role": "user", "content": "Name a river."}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert has_words(text) and final.content[0].text == text, (text, final.content)
        assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0, final.usage

    @check("/admin/requests: each CPU request is charged its occupied time at the hourly price")
    def _():
        records = admin("/admin/requests?limit=1000")["data"]
        cpu = [r for r in records if r["backend"] == CPU and r["status"] == 200]
        # The capacity check's streamed request shared nothing with another CPU request, so each
        # CPU request was alone in flight: its cost is hourly / 3600 × its occupied time.
        brief = [(r["user"], r["backend"], r["reason"], r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in records]
        assert len(cpu) >= 5, f"expected 5 CPU requests answered 200, records: {brief}"
        for r in cpu:
            full = HOURLY_USD / 3600 * r["latency_ms"] / 1000
            slack = HOURLY_USD / 3600 * 0.010  # 10 ms of parsing/accounting around the upstream call
            assert r["cost_usd"] > 0, r
            assert full * 0.8 - slack <= r["cost_usd"] <= full * 1.02 + slack, (
                f"{r['cost_usd']} is not hourly × occupied time ({full} for {r['latency_ms']} ms)"
            )
        seen["records"] = records

    @check("/admin/requests: SDK-reported usage equals the metered tokens, header cost equals the charge")
    def _():
        records = seen["records"]
        mine = [r for r in records if r["status"] == 200]
        for user, backend, _stream, usage, header_cost in seen["calls"]:
            if usage is None:
                continue
            match = [
                r for r in mine
                if r["user"] == user and r["backend"] == backend
                and r["prompt_tokens"] == usage.prompt_tokens and r["completion_tokens"] == usage.completion_tokens
            ]
            assert match, f"no record for {user}/{backend} with {usage}"
            if header_cost is not None:
                assert any(abs(r["cost_usd"] - header_cost) < 1e-9 for r in match), (header_cost, match)

    @check("/admin/usage: spend per user and backend is the sum of its requests")
    def _():
        usage = {u["user"]: u for u in admin("/admin/usage")["data"]}
        records = seen["records"]
        for user in ("local-cost", "local-quality"):
            rs = [r for r in records if r["user"] == user]
            u = usage[user]
            assert u["requests"] == len(rs), (user, u["requests"], len(rs))
            assert abs(u["spent_usd"] - sum(r["cost_usd"] for r in rs)) < 1e-9, (user, u)
            assert u["prompt_tokens"] == sum(r["prompt_tokens"] for r in rs), (user, u)
            assert u["reserved_usd"] == 0, u
            assert abs(u["remaining_usd"] - (u["budget_usd"] - u["spent_usd"])) < 1e-9, u
            for backend, b in u["by_backend"].items():
                mine = [r for r in rs if r["backend"] == backend]
                assert b["requests"] == len(mine) and abs(b["spent_usd"] - sum(r["cost_usd"] for r in mine)) < 1e-9
        assert set(usage["local-cost"]["by_backend"]) == {CPU, PREMIUM}, usage["local-cost"]["by_backend"]
        seen["usage"] = usage

    @check("/metrics: cost, tokens and idle cost of the real CPU backend are exported")
    def _():
        status, text = http("GET", TOLLGATE + "/metrics")
        assert status == 200, status
        cost_m = {(l["user"], l["backend"]): v for l, v in metric_samples(text, "tollgate_cost_usd_total")}
        for user, u in seen["usage"].items():
            for backend, b in u["by_backend"].items():
                assert abs(cost_m[(user, backend)] - b["spent_usd"]) < 1e-9, (user, backend, cost_m)
        idle = {l["backend"]: v for l, v in metric_samples(text, "tollgate_idle_cost_usd_total")}
        assert idle.get(CPU, 0) > 0, f"no idle cost for the hourly CPU backend: {idle}"
        up = {l["backend"]: v for l, v in metric_samples(text, "tollgate_backend_up")}
        assert up.get(CPU) == 1, up
        savings = {l["user"]: v for l, v in metric_samples(text, "tollgate_savings_usd_total")}
        assert savings.get("local-cost", 0) > 0, f"cost-first on CPU saved nothing against premium: {savings}"

    figures()


def median_ms(samples):
    return statistics.median(samples) * 1000


def figures():
    """Same prompt, direct to llama-server and through Tollgate, alternating; medians."""
    llama = os.environ["LLAMA_URL"] + "/v1"
    direct, through = client("none", llama), client(COST_KEY)
    body = dict(messages=ask("List three colors."), max_tokens=32, temperature=0, seed=7)
    runs = int(os.environ.get("LATENCY_RUNS", "9"))
    total = {"direct": [], "through": []}
    ttft = {"direct": [], "through": []}
    short = {"direct": [], "through": []}
    speeds, tokens = [], set()

    @check(f"latency: {runs} non-streaming, {runs} streaming and {2 * runs} one-token runs, direct and through Tollgate")
    def _():
        for c, kind in ((direct, "direct"), (through, "through")):  # warm the prompt cache, connections
            c.chat.completions.create(model="auto", **body)
        pairs = ((direct, "direct"), (through, "through"))
        for i in range(runs):
            # Which goes first alternates: neither side always follows the other's leftovers.
            order = pairs if i % 2 == 0 else pairs[::-1]
            for c, kind in order:
                t0 = time.perf_counter()
                raw = c.chat.completions.with_raw_response.create(model="auto", **body)
                total[kind].append(time.perf_counter() - t0)
                done = raw.parse()
                tokens.add(done.usage.completion_tokens)
                if kind == "through":
                    assert raw.headers["x-tollgate-backend"] == CPU
                else:
                    timings = json.loads(raw.http_response.text).get("timings") or {}
                    if timings.get("predicted_per_second"):
                        speeds.append(timings["predicted_per_second"])
            for c, kind in order:
                # Read each stream to its end: a stream closed early keeps llama-server's one
                # slot busy until it notices, and the next request would wait for it.
                t0, first = time.perf_counter(), None
                for chunk in c.chat.completions.create(model="auto", stream=True, **body):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                assert first is not None, f"{kind}: no content in the stream"
                ttft[kind].append(first)
        assert len(tokens) == 1, f"the same request gave different lengths: {tokens}"
        assert speeds, "llama-server reported no timings"
        # One-token answers: the generation's own jitter no longer hides the gateway's share.
        one = dict(body, max_tokens=1)
        for i in range(runs * 2):
            for c, kind in pairs if i % 2 == 0 else pairs[::-1]:
                t0 = time.perf_counter()
                c.chat.completions.create(model="auto", **one)
                short[kind].append(time.perf_counter() - t0)

    if failed:
        return
    usage = seen["usage"]
    out = {
        "cpu_tokens_per_s": statistics.median(speeds),
        "completion_tokens_per_run": tokens.pop(),
        "runs": runs,
        "direct_ms": median_ms(total["direct"]),
        "through_ms": median_ms(total["through"]),
        "added_ms": median_ms(total["through"]) - median_ms(total["direct"]),
        "direct_ttft_ms": median_ms(ttft["direct"]),
        "through_ttft_ms": median_ms(ttft["through"]),
        "added_ttft_ms": median_ms(ttft["through"]) - median_ms(ttft["direct"]),
        "direct_1tok_ms": median_ms(short["direct"]),
        "through_1tok_ms": median_ms(short["through"]),
        "added_1tok_ms": median_ms(short["through"]) - median_ms(short["direct"]),
        "cost_per_request": {},
    }
    for user in ("local-quality", "local-cost"):
        u = admin(f"/admin/usage/{user}")
        out["cost_per_request"][user] = {
            "requests": u["requests"],
            "spent_usd": u["spent_usd"],
            "per_request_usd": u["spent_usd"] / max(u["requests"], 1),
            "by_backend": {
                b: {"requests": v["requests"], "per_request_usd": v["spent_usd"] / max(v["requests"], 1)}
                for b, v in u["by_backend"].items()
            },
        }
    with open(os.environ["FIGURES"], "w") as f:
        json.dump(out, f, indent=2)


def prometheus():
    prom = os.environ["PROMETHEUS_URL"]

    def query(expr):
        status, text = http("GET", prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        body = json.loads(text)
        assert status == 200 and body["status"] == "success", (expr, status, body)
        return body["data"]["result"]

    @check("Prometheus scraped Tollgate: tollgate_cost_usd_total per user equals /admin/usage")
    def _():
        usage = {u["user"]: u["spent_usd"] for u in admin("/admin/usage")["data"]}
        deadline, got = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            got = {s["metric"]["user"]: float(s["value"][1]) for s in query("sum by (user) (tollgate_cost_usd_total)")}
            if got.keys() == usage.keys() and all(abs(got[u] - usage[u]) < 1e-9 for u in usage):
                break
            time.sleep(1)
        assert got.keys() == usage.keys(), (got, usage)
        for user, spent in usage.items():
            assert abs(got[user] - spent) < 1e-9, (user, got[user], spent)
            print(f"   prometheus: tollgate_cost_usd_total{{user={user!r}}} = {got[user]:.9f}")
        up = query('up{job="tollgate"}')
        assert up and up[0]["value"][1] == "1", up

    @check("the shipped alert rules load into Prometheus and evaluate without error")
    def _():
        deadline = time.monotonic() + 20
        while True:
            groups = json.loads(http("GET", prom + "/api/v1/rules")[1])["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r.get("health") == "ok" for r in rules):
                break
            assert time.monotonic() < deadline, [(r["name"], r.get("health"), r.get("lastError")) for r in rules]
            time.sleep(1)
        print(f"   prometheus: {len(rules)} rules healthy: {', '.join(sorted(r['name'] for r in rules))}")

    @check("every Grafana panel query runs on Prometheus; the cost panels show data")
    def _():
        with open(os.path.join(ROOT, "deploy", "grafana", "tollgate.json")) as f:
            dash = json.load(f)
        empty, ran = [], 0
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                where = f"{panel['title']} [{target['refId']}]"
                expr = (
                    target["expr"]
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace('=~"$user"', '=~".+"')
                    .replace('=~"$backend"', '=~".+"')
                )
                result = query(expr)
                ran += 1
                if not result:
                    empty.append(where)
        assert ran >= 8, ran
        for must in ("Cost per user (USD/h) [A]", "Cost by backend (USD/h) [A]", "Spend over the time range per user [A]",
                     "Tier mix (share of requests) [A]", "Idle cost over the time range per backend [A]",
                     "Time to first token (p50, p95) [A]", "Gateway overhead (p50, p99) [A]"):
            assert must not in empty, f"{must!r} shows no data: empty queries {empty}"
        print(f"   grafana: {ran} queries ran; without data in this short run: {empty or 'none'}")


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else "traffic"
    {"traffic": traffic, "prometheus": prometheus}[phase]()
    finish()
