#!/usr/bin/env python3
"""The dashboard's admin JSON endpoints on a large SQLite ledger (docs/PERFORMANCE.md, "Dashboard").

A ledger file with N API users (`tenant_users`, one key each, three plans, a fifth of them in
teams) and M request records spread over the last 29 days (inside the default 30-day retention),
skewed over the users (a user's rank is N * u^3 for uniform u: the heaviest holds ~2% of the
records, the top 1% of users ~20%), over three backends; `spend`, `hourly_user` and
`hourly_backend` are summed from those records with `INSERT ... SELECT ... GROUP BY`, as the
gateway's own rollup query does, and `ledger_meta.spend_through` marks every record folded in.

The schema is the gateway's: the file is first created by starting the release binary on it
(ledger, rollup and tenant tables), then filled with Python's sqlite3 (the records by a
recursive CTE, deterministic: the same file at every generation). It is cached under
target/bench-dashboard/ and reused while its parameters match, it is under --max-age-hours old
(the defaults' windows, last 48 hours and this month, stay full) and the UTC month has not
turned.

Then one gateway on 127.0.0.1 serves the file, and each endpoint is timed as wall time per
request on one keep-alive connection, the endpoints interleaved round by round (--warmup rounds
dropped, --samples rounds kept), with the gateway's own CPU per request (all its threads'
/proc/<pid>/task/*/schedstat). Ratios are against `GET /admin/usage/<heaviest user>`, a point
read through the same admin path, measured in the same rounds; each endpoint's first answer
after the start is shown apart. Also: start to ready with the file, a sorted page asked after 6 s
without requests and the gateway's CPU in the 3 s after it (a kept order's rebuild), RSS after
the run and its peak, and the statements the slow answers run, timed alone with Python's sqlite3
against the same file. --profile PATH records `perf` over 8 answers of PATH.

    cargo build --release --bin tollgate
    python3 benches/dashboard/run.py [--users 100000] [--records 10000000] [--samples 20]
    python3 benches/dashboard/run.py --users 1000 --records 100000      # a quick run

Writes target/bench-dashboard/{table.md,results.json} beside the cached file.
"""

import argparse
import calendar
import datetime
import hashlib
import http.client
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "load"))
from harness import free_port, status_kib  # noqa: E402

ADMIN_KEY = "tg-dashboard-bench-admin-key"
# Bump when the generated data changes: a cached file of another version is regenerated.
GENERATOR_VERSION = 2
TARGET_MS = 200.0
SPAN_DAYS = 29
SEED = 20261206

BACKENDS = ("mock-premium", "mock-mid", "mock-cpu")
# (name, price per month, budget per month, share of users in %, premium share of its requests in %)
PLANS = (("starter", 5.0, 10.0, 70, 35), ("pro", 20.0, 50.0, 25, 60), ("scale", 100.0, 400.0, 5, 80))

CONFIG = """
[server]
admin_key_env = "TOLLGATE_ADMIN_KEY"

[ledger]
backend = "sqlite"
path = "{ledger}"

# Nothing listens there: the benchmark reads the ledger, it proxies nothing.
[[backends]]
name = "mock-premium"
tier = "quality"
base_url = "http://127.0.0.1:9/v1"
model = "mock-model"
quality = 0.9
context_window = 131072
pricing = {{ input_per_mtok = 0.60, output_per_mtok = 2.40 }}

[[backends]]
name = "mock-mid"
tier = "standard"
base_url = "http://127.0.0.1:9/v1"
model = "mock-mid"
quality = 0.6
context_window = 32768
pricing = {{ input_per_mtok = 0.15, output_per_mtok = 0.60 }}

[[backends]]
name = "mock-cpu"
tier = "economy"
base_url = "http://127.0.0.1:9/v1"
model = "mock-small"
quality = 0.35
context_window = 8192
pricing = {{ hourly_usd = 0.12 }}

[[routes]]
model = "auto"
backends = ["mock-premium", "mock-mid", "mock-cpu"]
{plans}
"""

PLAN = """
[[plans]]
name = "{name}"
price_usd = {price}
policy = "quality-first"
budget_usd = {budget}
budget_period = "month"
"""


def config_text(ledger):
    plans = "".join(PLAN.format(name=n, price=p, budget=b) for n, p, b, _, _ in PLANS)
    return CONFIG.format(ledger=ledger, plans=plans)


# ---- Time ----------------------------------------------------------------------------------

def month_start(unix):
    d = datetime.datetime.fromtimestamp(unix, datetime.timezone.utc)
    return calendar.timegm((d.year, d.month, 1, 0, 0, 0))


def month_starts_between(lo, hi):
    """The UTC month starts of every month that [lo, hi] touches, ascending."""
    out = [month_start(lo)]
    while True:
        d = datetime.datetime.fromtimestamp(out[-1], datetime.timezone.utc)
        nxt = calendar.timegm((d.year + (d.month == 12), d.month % 12 + 1, 1, 0, 0, 0))
        if nxt > hi:
            return out
        out.append(nxt)


def period_case(column, starts, scale=1):
    """SQL: the month start (Unix seconds) of `column` (Unix seconds times `scale`)."""
    arms = " ".join(f"WHEN {column} >= {s * scale} THEN {s}" for s in reversed(starts[1:]))
    return f"(CASE {arms} ELSE {starts[0]} END)"


def rfc3339(unix):
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- The gateway ---------------------------------------------------------------------------

class Gateway:
    def __init__(self, binary, config, log):
        self.port = free_port()
        self.log = open(log, "a")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config, "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "TOLLGATE_ADMIN_KEY": ADMIN_KEY, "TOLLGATE_LOG": "warn"})
        deadline = started + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited with {self.proc.returncode}: see {log}")
            try:
                if self.get("/readyz", key="")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the gateway was not ready within 600 s")
            time.sleep(0.01)
        self.start_s = time.monotonic() - started
        self.conn = None

    def get(self, path, key=ADMIN_KEY):
        """(status, body) on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def timed(self, path):
        """(seconds, status, body) on the kept connection."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        started = time.perf_counter()
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        r = self.conn.getresponse()
        body = r.read()
        return time.perf_counter() - started, r.status, body

    def cpu_ns(self):
        """On-CPU time of every thread of the process so far (ns, /proc/<pid>/task/*/schedstat)."""
        total = 0
        base = f"/proc/{self.proc.pid}/task"
        for task in os.listdir(base):
            try:
                with open(f"{base}/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return total

    def stop(self):
        if self.conn is not None:
            self.conn.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ---- Generation ----------------------------------------------------------------------------

M = 2147483647  # 2^31 - 1, prime


def rand(k):
    """SQL: a pseudo-random integer in [0, M) of the record number `i`, stream `k`: affine maps
    and squares modulo the prime M, so that every value fits SQLite's 64-bit integers."""
    a, b, c = 1103515245 + 15838 * k, 12345 + SEED + 1000003 * k, 48271 + 69621 * k
    x = f"((i * {a} + {b}) % {M})"
    y = f"({x} * {x} % {M})"
    z = f"(({y} * {c} + {k + 1}) % {M})"
    return f"({z} * {z} % {M})"


def coprime_step(n):
    """A multiplier coprime to n: rank -> (rank * step) % n spreads the heavy ranks over names."""
    return next(p for p in (7919, 104729, 1299709, 15485863, 1) if math.gcd(p, n) == 1)


def user_name(i, width):
    return f"user-{i:0{width}d}"


def user_rows(users):
    """(idx, name, plan, team, premium %) per user, deterministic."""
    width = max(6, len(str(users - 1)))
    teams = max(1, users // 100)
    out = []
    for i in range(users):
        pick = (i * 2654435761 + 97) % 100
        acc = 0
        for name, _, _, share, premium in PLANS:
            acc += share
            if pick < acc:
                plan, base_premium = name, premium
                break
        # A fifth of the users in teams of ~20.
        team = f"team-{(i // 5) % teams:04d}" if (i * 40503 + 11) % 5 == 0 else None
        # Each user's own mix around its plan's: +-15 points.
        premium = max(5, min(95, base_premium + (i * 37) % 31 - 15))
        out.append((i, user_name(i, width), plan, team, premium))
    return out


def generate(a, db, binary, work):
    """Creates the ledger file at `db` with the gateway, then fills it. Returns what it did."""
    timings = {}
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    os.makedirs(os.path.dirname(db), exist_ok=True)
    config = os.path.join(work, "tollgate.toml")
    with open(config, "w") as f:
        f.write(config_text(db))

    t = time.monotonic()
    gw = Gateway(binary, config, os.path.join(work, "gateway.log"))
    gw.stop()
    timings["schema_by_gateway_s"] = time.monotonic() - t

    now = int(time.time())
    end_ms = now * 1000
    span_ms = SPAN_DAYS * 86_400_000
    start_ms = end_ms - span_ms
    starts = month_starts_between(start_ms // 1000, now)

    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript("""
        PRAGMA journal_mode = OFF;
        PRAGMA synchronous = OFF;
        PRAGMA cache_size = -1048576;
        PRAGMA temp_store = MEMORY;
    """)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = {"spend", "requests", "ledger_meta", "hourly_user", "hourly_backend", "tenant_users",
               "tenant_teams", "tenant_keys"} - tables
    if missing:
        raise SystemExit(f"the gateway did not create {sorted(missing)} (has the schema changed?)")

    # Users, teams, keys.
    t = time.monotonic()
    users = user_rows(a.users)
    created = now - 60 * 86_400
    conn.execute("BEGIN")
    teams = sorted({u[3] for u in users if u[3]})
    conn.executemany("INSERT INTO tenant_teams (name, budget_pico, budget_period, created_at) VALUES (?, ?, 'month', ?)",
                     [(name, 500 * 10**12, created) for name in teams])
    conn.executemany(
        "INSERT INTO tenant_users (name, plan, team, overrides, metrics, created_at) VALUES (?, ?, ?, '{}', 0, ?)",
        [(name, plan, team, created + i) for i, name, plan, team, _ in users])

    def key_row(u):
        i, name = u[0], u[1]
        key = "tg-" + hashlib.sha256(f"tollgate-dashboard-bench:{i}".encode()).hexdigest()
        kid = "key_" + hashlib.sha256(f"tollgate-dashboard-bench-id:{i}".encode()).hexdigest()[:24]
        return (kid, name, hashlib.sha256(key.encode()).digest(), key[:11], created + i, kid)
    conn.executemany(
        "INSERT INTO tenant_keys (id, user, sha256, prefix, label, created_at, expires_at, revoked_at, last_used_at,"
        " budget_pico, budget_period, rpm, end_users, lineage)"
        " VALUES (?, ?, ?, ?, NULL, ?, NULL, NULL, NULL, NULL, 'month', NULL, NULL, ?)",
        (key_row(u) for u in users))
    conn.execute("CREATE TEMP TABLE bench_users (idx INTEGER PRIMARY KEY, name TEXT, pre TEXT, mid TEXT, premium INTEGER)")
    conn.executemany("INSERT INTO bench_users VALUES (?, ?, ?, ?, ?)",
                     [(i, name, f'[["{name}",', f'],["~team:{team}",' if team else None, premium)
                      for i, name, _, team, premium in users])
    conn.execute("COMMIT")
    timings["users_s"] = time.monotonic() - t

    # Records, in time order (rowid order is time order, as the writer appends them).
    step = coprime_step(a.users)
    ps = period_case("at_ms", starts, scale=1000)
    insert = f"""
        WITH RECURSIVE seq(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < ?),
        r AS MATERIALIZED (
            SELECT i, {start_ms} + (i * {span_ms}) / {a.records} AS at_ms,
                   {rand(0)} * 1.0 / {M} AS u, {rand(1)} % 100 AS pb, {rand(2)} AS h2, {rand(3)} AS h3,
                   {rand(4)} % 1000 AS st, {rand(5)} AS h5, {rand(6)} AS h6
            FROM seq),
        j AS (
            SELECT r.*, b.name, b.pre, b.mid,
                   CASE WHEN r.pb < b.premium THEN 0 WHEN r.pb < b.premium + (100 - b.premium) * 2 / 3 THEN 1
                        ELSE 2 END AS bk,
                   30 + r.h2 % 2400 AS prompt,
                   CASE WHEN r.st < 965 THEN 200 WHEN r.st < 975 THEN 499 WHEN r.st < 990 THEN 502 ELSE 429 END
                        AS status
            FROM r JOIN bench_users b ON b.idx = (MIN(CAST({a.users} * r.u * r.u * r.u AS INTEGER), {a.users - 1})
                                                 * {step}) % {a.users})
        INSERT INTO requests (at_ms, user, route, backend, reason, prompt_tokens, completion_tokens, cost_pico, status,
                              latency_ms, levels, request_id)
        SELECT at_ms, name, 'auto',
               CASE bk WHEN 0 THEN 'mock-premium' WHEN 1 THEN 'mock-mid' ELSE 'mock-cpu' END,
               CASE bk WHEN 0 THEN 'quality-first' WHEN 1 THEN 'cost-first'
                       ELSE CASE WHEN h6 % 4 = 0 THEN 'fallback:mock-premium' ELSE 'spill' END END,
               prompt,
               CASE WHEN status IN (429, 502) THEN 0 ELSE 5 + h3 % 900 END,
               CASE WHEN status IN (429, 502) THEN 0
                    WHEN bk = 0 THEN prompt * 600000 + (5 + h3 % 900) * 2400000
                    WHEN bk = 1 THEN prompt * 150000 + (5 + h3 % 900) * 600000
                    ELSE (prompt + 5 + h3 % 900) * 30000 END,
               status,
               CASE bk WHEN 0 THEN 300 + h5 % 4000 WHEN 1 THEN 150 + h5 % 2000 ELSE 600 + h5 % 8000 END,
               pre || {ps} || CASE WHEN mid IS NULL THEN ']]' ELSE mid || {ps} || ']]' END,
               printf('%08x%08x%016x', h5, h6, i)
        FROM j"""
    t = time.monotonic()
    chunk = 1_000_000
    for lo in range(0, a.records, chunk):
        conn.execute("BEGIN")
        conn.execute(insert, (lo, min(lo + chunk, a.records)))
        conn.execute("COMMIT")
        done = min(lo + chunk, a.records)
        print(f"  records: {done:,} / {a.records:,} ({time.monotonic() - t:.0f} s)", flush=True)
    timings["records_s"] = time.monotonic() - t

    # Rollups: the statement the gateway's own migration runs (src/ledger/sqlite/spend.rs,
    # create_rollups), then the per-backend hours and the spend from the per-user hours.
    t = time.monotonic()
    sums = ("COUNT(*), SUM(status >= 400), SUM(cost_pico), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(latency_ms)")
    hour = "(at_ms / 1000 / 3600) * 3600"
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO hourly_user SELECT user, {hour} AS h, backend, {sums} FROM requests "
                 f"GROUP BY user, h, backend")
    timings["hourly_user_s"] = time.monotonic() - t
    conn.execute("INSERT INTO hourly_backend SELECT hour, backend, SUM(requests), SUM(errors), SUM(spent_pico), "
                 "SUM(prompt_tokens), SUM(completion_tokens), SUM(latency_ms) FROM hourly_user GROUP BY hour, backend")
    hp = period_case("hour", starts)
    conn.execute(f"INSERT INTO spend SELECT user, {hp} AS p, backend, SUM(spent_pico), SUM(requests), "
                 f"SUM(prompt_tokens), SUM(completion_tokens) FROM hourly_user GROUP BY user, p, backend")
    conn.execute("INSERT INTO spend SELECT '~team:' || u.team, s.period_start, s.backend, SUM(s.spent_pico), "
                 "SUM(s.requests), SUM(s.prompt_tokens), SUM(s.completion_tokens) "
                 "FROM spend s JOIN tenant_users u ON u.name = s.user WHERE u.team IS NOT NULL "
                 "GROUP BY u.team, s.period_start, s.backend")
    conn.execute("UPDATE ledger_meta SET value = (SELECT COALESCE(MAX(rowid), 0) FROM requests) "
                 "WHERE name = 'spend_through'")
    conn.execute("COMMIT")
    timings["rollups_and_spend_s"] = time.monotonic() - t

    counts = {name: conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
              for name in ("requests", "hourly_user", "hourly_backend", "spend", "tenant_users", "tenant_teams",
                           "tenant_keys")}
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return {"generated_at": now, "month_start": month_start(now), "span_days": SPAN_DAYS, "timings": timings,
            "rows": counts}


def cached_file(a, binary, work):
    """The cached ledger file for these parameters, generated when missing or stale."""
    os.makedirs(a.cache_dir, exist_ok=True)
    db = os.path.join(a.cache_dir, f"ledger-u{a.users}-r{a.records}.db")
    meta_path = db + ".json"
    params = {"users": a.users, "records": a.records, "version": GENERATOR_VERSION}
    now = time.time()
    if os.path.exists(db) and os.path.exists(meta_path) and not a.regenerate:
        with open(meta_path) as f:
            meta = json.load(f)
        age_h = (now - meta["generated_at"]) / 3600
        if meta.get("params") == params and age_h <= a.max_age_hours and meta["month_start"] == month_start(int(now)):
            print(f"reusing {db} (generated {age_h:.1f} h ago in {meta['generation_s']:.0f} s)", flush=True)
            return db, meta, False
        print(f"regenerating {db}: parameters, age ({age_h:.1f} h) or month changed", flush=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    need = a.records * 320 + a.users * 600 + (1 << 30)
    free = shutil.disk_usage(a.cache_dir).free
    if free < need:
        raise SystemExit(f"{free / 2**30:.1f} GiB free under {a.cache_dir}, ~{need / 2**30:.1f} GiB needed")
    print(f"generating {a.users:,} users and {a.records:,} records into {db} ...", flush=True)
    started = time.monotonic()
    meta = generate(a, db, binary, work)
    meta["generation_s"] = time.monotonic() - started
    meta["params"] = params
    meta["file_mib"] = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s)) / 2**20
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"generated in {meta['generation_s']:.0f} s: {meta['rows']}, {meta['file_mib']:.0f} MiB", flush=True)
    return db, meta, True


# ---- Measurement ---------------------------------------------------------------------------

def pick_users(db, month):
    """The heaviest user this month, a median one, and the plan with the most users."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute("SELECT user, SUM(requests) AS n FROM spend WHERE period_start = ? AND user NOT LIKE '~%' "
                        "GROUP BY user ORDER BY n DESC, user", (month,)).fetchall()
    plan = conn.execute("SELECT plan FROM tenant_users GROUP BY plan ORDER BY COUNT(*) DESC LIMIT 1").fetchone()[0]
    conn.close()
    return rows[0], rows[len(rows) // 2], plan


def items(body):
    try:
        doc = json.loads(body)
    except ValueError:
        return "-"
    if isinstance(doc, dict):
        for field in ("data", "points", "backends"):
            if isinstance(doc.get(field), list):
                return len(doc[field])
    return "-"


def quantile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure(gw, endpoints, samples, warmup):
    """Every endpoint once per round, in turn; the first `warmup` rounds dropped (each endpoint's
    very first answer is kept apart: what a fresh gateway's first page costs)."""
    results = {label: {"ms": [], "cpu_ms": []} for label, _ in endpoints}
    for r in range(warmup + samples):
        for label, path in endpoints:
            cpu = gw.cpu_ns()
            seconds, status, body = gw.timed(path)
            cpu = gw.cpu_ns() - cpu
            if r == 0:
                results[label]["first_ms"] = seconds * 1000
            if status != 200:
                raise SystemExit(f"{path} answered {status}: {body[:300]!r} (being written? rebuild and rerun)")
            if r >= warmup:
                results[label]["ms"].append(seconds * 1000)
                results[label]["cpu_ms"].append(cpu / 1e6)
                results[label]["bytes"] = len(body)
                results[label]["items"] = items(body)
        print(f"  round {r + 1}/{warmup + samples}{' (warm-up)' if r < warmup else ''}", flush=True)
    for label, res in results.items():
        res["median_ms"] = statistics.median(res["ms"])
        res["p90_ms"] = quantile(res["ms"], 0.9)
        res["cpu_median_ms"] = statistics.median(res["cpu_ms"])
    return results


def after_idle(gw, path, idle_s=6.0, watch_s=3.0):
    """`path` asked after `idle_s` without requests (a kept order is then stale): its answer's
    time, and the gateway's CPU in the `watch_s` after it, less the answer's own (what it does in
    the background for that request)."""
    time.sleep(idle_s)
    cpu = gw.cpu_ns()
    seconds, status, _ = gw.timed(path)
    own = gw.cpu_ns() - cpu
    time.sleep(watch_s)
    return {"path": path, "ms": seconds * 1000, "status": status,
            "background_cpu_s": (gw.cpu_ns() - cpu - own) / 1e9, "watch_s": watch_s}


def user_records(conn, user, limit):
    """What the ledger reads for `/admin/requests?user=`: the user's hours and their request counts,
    newest first, then each hour's records of that user (at most its count) until `limit`; returns
    the records found."""
    hours = conn.execute("SELECT hour, SUM(requests) FROM hourly_user WHERE user = ?1 GROUP BY hour "
                         "ORDER BY hour DESC LIMIT ?2", (user, 24 * 31)).fetchall()
    found = 0
    for hour, requests in hours:
        if found >= limit:
            break
        found += len(conn.execute(
            "SELECT at_ms, user, route, backend, reason, prompt_tokens, completion_tokens, cost_pico, status, "
            "latency_ms, request_id FROM requests WHERE at_ms >= ?1 AND at_ms < ?2 AND user = ?3 "
            "ORDER BY at_ms DESC, rowid DESC LIMIT ?4",
            (hour * 1000, (hour + 3600) * 1000, user, min(limit - found, max(requests, 1)))
        ).fetchall())
    return found


def sql_alone(db, heavy, typical, month, now, samples=5):
    """The statements behind the answers, timed alone (Python's sqlite3, read-only, same file)."""
    users = [("the heaviest", heavy), ("the median", typical)]
    day = now // 86_400 * 86_400
    hour_end = (now // 3600 + 1) * 3600
    statements = [
        ("standings: `spend` rows of today, this month, total (read_standings)",
         "SELECT user, period_start, backend, spent_pico, requests, prompt_tokens, completion_tokens FROM spend "
         "WHERE period_start IN (?1, ?2, 0) AND user NOT LIKE '~%'", (day, month)),
        ("directory: every user, 10,000 by 10,000 (SqliteDirectory::users)", None, None),
        ("hourly_backend, last 48 h", "SELECT hour, backend, requests, errors, spent_pico, prompt_tokens, "
         "completion_tokens, latency_ms FROM hourly_backend WHERE hour >= ?1 AND hour < ?2 ORDER BY hour, backend",
         (hour_end - 48 * 3600, hour_end)),
        ("hourly_user, the heaviest user, this month", "SELECT hour, backend, requests, errors, spent_pico, "
         "prompt_tokens, completion_tokens, latency_ms FROM hourly_user WHERE user = ?1 AND hour >= ?2 AND hour < ?3 "
         "ORDER BY hour, backend", (heavy, month, hour_end)),
    ]
    statements += [(f"{who} user's last 50 records: its hours from `hourly_user`, then each hour's records by "
                    f"`requests_at_user` (read_user_records)", "user-records", name) for who, name in users]
    out = []
    for label, sql, args in statements:
        times, rows = [], 0
        for _ in range(samples + 1):
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            started = time.perf_counter()
            if sql == "user-records":
                rows = user_records(conn, args, 50)
            elif sql is None:
                rows, after = 0, ""
                while True:
                    page = conn.execute(
                        "SELECT name, plan, team, overrides, metrics, created_at FROM tenant_users WHERE name > ?1 "
                        "AND (?2 IS NULL OR plan = ?2) AND (?3 IS NULL OR team = ?3) ORDER BY name LIMIT ?4",
                        (after, None, None, 10_000)).fetchall()
                    rows += len(page)
                    if len(page) < 10_000:
                        break
                    after = page[-1][0]
            else:
                rows = len(conn.execute(sql, args).fetchall())
            times.append((time.perf_counter() - started) * 1000)
            conn.close()
        out.append({"statement": label, "rows": rows, "median_ms": statistics.median(times[1:])})
    return out


def profile(gw, path, out, requests=8):
    """Samples the gateway (call graphs by DWARF) while it answers `path` `requests` times."""
    if not shutil.which("perf"):
        print("--profile: no `perf` on this machine", flush=True)
        return
    gw.timed(path)
    perf = subprocess.Popen(["perf", "record", "-F", "999", "--call-graph", "dwarf,16384", "-p", str(gw.proc.pid),
                             "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    times = [gw.timed(path)[0] * 1000 for _ in range(requests)]
    perf.send_signal(signal.SIGINT)
    perf.wait()
    report = subprocess.run(["perf", "report", "-i", out, "--children", "--sort", "symbol", "--stdio", "-g", "none"],
                            capture_output=True, text=True).stdout
    wanted = [line.rstrip()[:160] for line in report.splitlines()
              if "%" in line and ("tollgate::" in line or "sqlite3_step" in line or "drop_in_place" in line
                                  or "sort::stable::sort" in line or "_int_free" in line)]
    print(f"\nprofile of {requests} x {path} ({', '.join(f'{t:.0f}' for t in times)} ms; {out}), share of the "
          f"gateway's samples, callees included:")
    print("\n".join(wanted[:40]), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--records", type=int, default=10_000_000)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cache-dir", default=os.path.join(ROOT, "target", "bench-dashboard"))
    p.add_argument("--max-age-hours", type=float, default=24.0)
    p.add_argument("--regenerate", action="store_true", help="generate the file even if a cached one fits")
    p.add_argument("--profile", metavar="PATH",
                   help="after the rounds, `perf record` the gateway over 8 requests of PATH (e.g. "
                        "'/admin/usage?sort=spent&limit=50') and print its heaviest functions, callees included")
    a = p.parse_args()
    binary = os.path.join(a.bin_dir, "tollgate")
    if not os.path.exists(binary):
        raise SystemExit(f"no {binary}: cargo build --release --bin tollgate")
    work = tempfile.mkdtemp(prefix="tollgate-dashboard-bench-")
    gw = None
    try:
        db, meta, fresh = cached_file(a, binary, work)
        config = os.path.join(work, "bench.toml")
        with open(config, "w") as f:
            f.write(config_text(db))
        now = int(time.time())
        month = month_start(now)
        (heavy, heavy_n), (typical, typical_n), plan = pick_users(db, month)
        gw = Gateway(binary, config, os.path.join(work, "gateway.log"))
        start_s = gw.start_s
        rss_start = status_kib(gw.proc.pid, "VmRSS") / 1024
        print(f"gateway ready in {start_s:.2f} s, RSS {rss_start:.1f} MiB; heaviest user {heavy} "
              f"({heavy_n:,} requests this month), median user {typical} ({typical_n:,})", flush=True)
        from_month = rfc3339(month)
        baseline = f"GET /admin/usage/{heavy}"
        endpoints = [
            ("GET /healthz", "/healthz"),
            (baseline, f"/admin/usage/{heavy}"),
            ("GET /admin/dashboard/overview", "/admin/dashboard/overview"),
            ("GET /admin/dashboard/spend (48 h, hourly)", "/admin/dashboard/spend"),
            ("GET /admin/dashboard/spend?bucket=day (31 days)", "/admin/dashboard/spend?bucket=day"),
            ("GET /admin/dashboard/spend?user=<heaviest>&bucket=day&from=<month start>",
             f"/admin/dashboard/spend?user={heavy}&bucket=day&from={from_month}"),
            ("GET /admin/dashboard/backends", "/admin/dashboard/backends"),
            ("GET /admin/usage?limit=50 (by name)", "/admin/usage?limit=50"),
            ("GET /admin/usage?sort=spent&limit=50", "/admin/usage?sort=spent&limit=50"),
            ("GET /admin/usage?sort=margin&order=asc&limit=50", "/admin/usage?sort=margin&order=asc&limit=50"),
            ("GET /admin/usage?sort=margin&order=asc&over_price=true&limit=50",
             "/admin/usage?sort=margin&order=asc&over_price=true&limit=50"),
            (f"GET /admin/usage?sort=requests&limit=50&plan={plan}",
             f"/admin/usage?sort=requests&limit=50&plan={plan}"),
            ("GET /admin/requests?user=<heaviest>&limit=50", f"/admin/requests?user={heavy}&limit=50"),
            ("GET /admin/requests?user=<median>&limit=50", f"/admin/requests?user={typical}&limit=50"),
        ]
        results = measure(gw, endpoints, a.samples, a.warmup)
        idle = after_idle(gw, "/admin/usage?sort=spent&limit=50")
        pid = gw.proc.pid
        rss_after = status_kib(pid, "VmRSS") / 1024
        rss_peak = status_kib(pid, "VmHWM") / 1024
        if a.profile:
            profile(gw, a.profile, os.path.join(a.cache_dir, "perf.data"))
        gw.stop()
        gw = None
        alone = sql_alone(db, heavy, typical, month, now)
    finally:
        if gw is not None:
            gw.stop()
        shutil.rmtree(work, ignore_errors=True)

    base = results[baseline]["median_ms"]
    lines = [
        f"{a.users:,} API users, {meta['rows']['requests']:,} request records over {meta['span_days']} days "
        f"({meta['rows']['hourly_user']:,} `hourly_user` rows, {meta['rows']['spend']:,} `spend` rows), "
        f"{meta['file_mib']:.0f} MiB; generated in {meta['generation_s']:.0f} s"
        f"{'' if fresh else ' (cached file)'}. Heaviest user `{heavy}`: {heavy_n:,} requests this month; "
        f"median user `{typical}`: {typical_n:,}.",
        "",
        f"Medians of {a.samples} rounds after {a.warmup} warm-up rounds, every endpoint once per round on one "
        f"keep-alive connection; ratio = median ÷ the median of `{baseline}` ({base:.2f} ms) in the same rounds; "
        f"first answer = the endpoint's first request after the gateway's start (warm-up round 1).",
        "",
        "| endpoint | median ms | p90 ms | ÷ baseline | gateway CPU ms | first answer ms | items | bytes | ≤ 200 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _ in endpoints:
        r = results[label]
        ok = "yes" if r["p90_ms"] <= TARGET_MS else ("median only" if r["median_ms"] <= TARGET_MS else "**no**")
        lines.append(f"| `{label}` | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['median_ms'] / base:.1f} | "
                     f"{r['cpu_median_ms']:.2f} | {r['first_ms']:.2f} | {r['items']} | {r['bytes']:,} | {ok} |")
    lines += [
        "",
        f"Gateway: ready {start_s:.2f} s after spawn with the file; RSS {rss_start:.1f} MiB at start, "
        f"{rss_after:.1f} MiB after the run, peak {rss_peak:.1f} MiB.",
        "",
        f"`GET {idle['path']}` after 6 s without requests: answered in {idle['ms']:.1f} ms; the gateway's CPU "
        f"in the {idle['watch_s']:.0f} s after it, besides that answer's own: {idle['background_cpu_s']:.2f} s.",
        "",
        "The statements behind them, alone (Python's sqlite3 " + sqlite3.sqlite_version + ", read-only, same file, "
        "a new connection each time as the gateway opens one; median of 5):",
        "",
        "| statement | rows | median ms |",
        "|---|---|---|",
    ]
    lines += [f"| {s['statement']} | {s['rows']:,} | {s['median_ms']:.1f} |" for s in alone]
    md = "\n".join(lines) + "\n"
    os.makedirs(a.cache_dir, exist_ok=True)
    with open(os.path.join(a.cache_dir, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.cache_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "start_s": start_s, "after_idle": idle, "rss_mib": {"start": rss_start, "after": rss_after,
                   "peak": rss_peak}, "heavy": [heavy, heavy_n], "typical": [typical, typical_n],
                   "results": results, "sql_alone": alone}, f, indent=1)
    print()
    print(md)


if __name__ == "__main__":
    main()
