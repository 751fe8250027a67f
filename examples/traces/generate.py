#!/usr/bin/env python3
"""Writes month.jsonl: a synthetic month (March 2026, UTC) of traffic for three kinds of tenant.

Deterministic (fixed seed, stdlib only): running it again gives the same file byte for byte.

- acme:   a steady enterprise, quality-first; office hours on weekdays, a trickle at weekends;
          long prompts; about one request in five asks for premium quality (min_quality 0.85).
- rocket: a bursty startup; a handful of requests most days, a launch burst on three days.
- free:   a free tier (all free users share one key); many short requests, every day.

Usage: python3 examples/traces/generate.py > examples/traces/month.jsonl
"""

import json
import random
import sys
from datetime import datetime, timedelta, timezone

START = datetime(2026, 3, 1, tzinfo=timezone.utc)
DAYS = 31
rng = random.Random(20260301)


def at(day, hour_low, hour_high):
    seconds = rng.randint(int(hour_low * 3600), int(hour_high * 3600) - 1)
    return START + timedelta(days=day, seconds=seconds)


def sized(mean, spread, low):
    return max(low, int(rng.gauss(mean, spread)))


def requests():
    for day in range(DAYS):
        weekday = (START + timedelta(days=day)).weekday() < 5
        # acme: ~45 requests per weekday in office hours, ~8 at weekends.
        for _ in range(rng.randint(38, 52) if weekday else rng.randint(5, 10)):
            record = {"t": at(day, 8, 18), "user": "acme", "prompt_tokens": sized(1200, 400, 100),
                      "completion_tokens": sized(350, 120, 20)}
            if rng.random() < 0.2:
                record["min_quality"] = 0.85
            yield record
        # rocket: quiet days, and a launch burst on days 9-10 and 20 (around the clock).
        burst = day in (9, 10, 20)
        for _ in range(rng.randint(120, 160) if burst else rng.randint(3, 9)):
            yield {"t": at(day, 0, 24), "user": "rocket", "prompt_tokens": sized(600, 250, 50),
                   "completion_tokens": sized(480, 150, 20)}
        # free: short requests all day.
        for _ in range(rng.randint(20, 30)):
            yield {"t": at(day, 0, 24), "user": "free", "prompt_tokens": sized(300, 100, 20),
                   "completion_tokens": sized(200, 80, 10)}


def main():
    records = sorted(requests(), key=lambda r: r["t"])
    for r in records:
        line = {"t": r["t"].strftime("%Y-%m-%dT%H:%M:%SZ"), "user": r["user"], "model": "auto",
                "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"]}
        if "min_quality" in r:
            line["min_quality"] = r["min_quality"]
        sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
