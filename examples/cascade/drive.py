"""Drives the cascade demo: each prompt through Tollgate (cost-first user, route `auto`), and
the same prompt straight to llama-server with logprobs for its confidence. Prints a table and
the cost against always-premium. Python stdlib only."""

import json
import sys
import urllib.request

gateway, llama, admin_key, threshold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
PREMIUM_IN, PREMIUM_OUT = 2.50, 10.00  # config.toml's premium prices, USD per million tokens


def post(url, body, key=None):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(response.headers), json.load(response)


def confidence(prompt):
    body = {"messages": [SYSTEM, {"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0,
            "logprobs": True}
    _, answer = post(f"{llama}/v1/chat/completions", body)
    choice = answer["choices"][0]
    values = [t["logprob"] for t in (choice.get("logprobs") or {}).get("content") or []]
    mean = sum(values) / len(values) if values else float("nan")
    return mean, choice.get("finish_reason")


rows, cost, premium = [], 0.0, 0.0
for line in open(sys.argv[5]):
    kind, prompt = line.rstrip("\n").split("\t", 1)
    mean, finish = confidence(prompt)
    headers, answer = post(f"{gateway}/v1/chat/completions",
                           {"model": "auto", "messages": [SYSTEM, {"role": "user", "content": prompt}],
                            "max_tokens": 32, "temperature": 0}, "tg-demo-cost-key")
    usage = answer.get("usage", {})
    request_cost = float(headers.get("x-tollgate-cost-usd", "0"))
    always_premium = (usage.get("prompt_tokens", 0) * PREMIUM_IN + usage.get("completion_tokens", 0) * PREMIUM_OUT) / 1e6
    cost += request_cost
    premium += always_premium
    rows.append((kind, f"{mean:.3f}", finish, headers.get("x-tollgate-backend"), headers.get("x-tollgate-reason"),
                 f"{request_cost:.9f}", prompt[:48]))

print(f"threshold {threshold} (mean token log-probability)")
print(f"{'kind':<5} {'conf':>7} {'finish':<7} {'backend':<12} {'reason':<21} {'cost usd':>12}  prompt")
for r in rows:
    print(f"{r[0]:<5} {r[1]:>7} {r[2]:<7} {r[3]:<12} {r[4]:<21} {r[5]:>12}  {r[6]}")
escalated = sum(1 for r in rows if r[4] == "escalated:confidence")
print(f"escalated {escalated}/{len(rows)}; cost ${cost:.6f} vs always-premium ${premium:.6f} "
      f"({100 * cost / premium:.1f}% of it)" if premium else "no premium baseline")
