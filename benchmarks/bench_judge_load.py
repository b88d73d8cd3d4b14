"""Load test of the HTTP step judge: many requests at high concurrency against the fake OpenAI-compatible
server (benchmarks/fake_judge_server.py, its own process) with injected faults, and an exact ledger.

    python benchmarks/bench_judge_load.py                       # 10,000 requests, 64 threads, the faults below
    python benchmarks/bench_judge_load.py --n 1000 --tag small

Faults (per POST, seeded): 5% HTTP 429 with Retry-After, 2% HTTP 500, 1% malformed replies (HTTP 200, not
the verdict JSON, billed), 1% timeouts (the server hangs past the client's timeout). Checks, for one
judge.judge() call over all requests: every request ends judged (its verdict equal to the expected one) or
unjudged and counted by cause, none lost or counted twice (verdicts = requests, unjudged = failures = sum of
the causes; POSTs counted by the client = POSTs the server saw); tokens counted = tokens the server billed
(minus replies the client had already given up on). Then reruns with judge.cache_dir: the first sends only
the requests that were unjudged (to a server without faults), the second sends 0.
Writes results/judge_load[_TAG].json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrpo.judges.base import JudgeRequest, StepVerdict  # noqa: E402
from mrpo.judges.http import HTTPJudge  # noqa: E402

FAULTS = dict(p_429=0.05, p_500=0.02, p_malformed=0.01, p_timeout=0.01)


def requests_for(n: int) -> tuple[list[JudgeRequest], list[StepVerdict]]:
    """n distinct requests (question "Q<i>", 1-6 steps) and the verdict the fake server gives each."""
    reqs, expected = [], []
    for i in range(n):
        k = 1 + i % 6
        steps = [f"Step text {i}.{j}" + (" good" if (i + j) % 2 else "") + (" helps" if (i * j) % 3 == 0 else "")
                 for j in range(k)]
        reqs.append(JudgeRequest(sample_id=f"s{i}", problem=f"Q{i}", image=None, gold_answer="left",
                                 gold_reasoning="Left.", steps=steps))
        expected.append(StepVerdict([int("good" in s) for s in steps], [int("helps" in s) for s in steps]))
    return reqs, expected


class ServerProcess:
    """The fake server in its own process (so it does not share the client's GIL)."""

    def __init__(self, **kw):
        args = [sys.executable, "-m", "benchmarks.fake_judge_server"]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}/v1"

    def ledger(self) -> dict:
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/ledger", timeout=30) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def judge_cfg(url: str, concurrency: int, cache_dir: str | None, timeout_s: float, max_retries: int) -> SimpleNamespace:
    return SimpleNamespace(kind="http", model="judge-model", base_url=url, api_key_env="MRPO_BENCH_NO_KEY",
                           max_concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries, backoff_s=0.05,
                           temperature=0.0, cache_dir=cache_dir, max_requests_per_minute=0)


def run_load(url: str, ledger, n: int, concurrency: int, cache_dir: str, timeout_s: float = 1.0,
             max_retries: int = 3) -> dict:
    """One judge.judge() over n requests; the accounting checks (see the module docstring) as a dict with
    "ok": True when every check holds. ledger(): the server's ledger."""
    reqs, expected = requests_for(n)
    judge = HTTPJudge(judge_cfg(url, concurrency, cache_dir, timeout_s, max_retries))
    t0 = time.perf_counter()
    out = judge.judge(reqs)
    wall = time.perf_counter() - t0
    time.sleep(0.1)   # replies still being written to clients that gave up
    led = ledger()
    s, u = judge.stats, judge.stats.usage.as_dict()
    judged = [i for i, v in enumerate(out) if v is not None]
    wrong = [i for i in judged if out[i] != expected[i]]
    unjudged = n - len(judged)
    causes = {c: k for c, k in s.causes.items() if k}
    ok_replies = led["ok_by_question"]
    judged_without_ok = [i for i in judged if ok_replies.get(f"Q{i}", 0) < 1]
    checks = {
        "one verdict per request": len(out) == n,
        "judged verdicts are the expected ones": not wrong,
        "unjudged = failures = sum of causes": unjudged == s.failures == sum(causes.values()),
        "requests counted once": s.requests == n and s.cache_hits == 0,
        "POSTs: client = server": u["requests"] == led["posts"],
        "POSTs = requests + retries": u["requests"] == n + s.retries,
        "every judged request had an OK reply": not judged_without_ok,
        "tokens counted <= billed": (u["prompt_tokens"] <= led["billed"].get("prompt_tokens", 0)
                                     and u["completion_tokens"] <= led["billed"].get("completion_tokens", 0)),
    }
    return {"n": n, "concurrency": concurrency, "wall_s": wall, "judged": len(judged), "unjudged": unjudged,
            "causes": causes, "retries": s.retries, "posts_client": u["requests"], "posts_server": led["posts"],
            "server_outcomes": led["outcomes"], "requests_per_s": n / wall, "posts_per_s": u["requests"] / wall,
            "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "billed_prompt_tokens": led["billed"].get("prompt_tokens", 0),
            "billed_completion_tokens": led["billed"].get("completion_tokens", 0),
            "usage_unknown": u["usage_unknown"], "gate_paused_s": judge.client.gate.paused_s,
            "late_ok_replies": sum(k - 1 for k in ok_replies.values() if k > 1),
            "checks": checks, "ok": all(checks.values())}


def rerun_with_cache(url: str, n: int, concurrency: int, cache_dir: str) -> int:
    """POSTs sent by a rerun of the same n requests with the same cache (a server without faults)."""
    reqs, expected = requests_for(n)
    judge = HTTPJudge(judge_cfg(url, concurrency, cache_dir, 5.0, 3))
    out = judge.judge(reqs)
    assert out == expected, "a rerun with the cache must judge every request"
    return judge.stats.usage.as_dict()["requests"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency-s", type=float, default=0.0, help="server latency per request")
    ap.add_argument("--retry-after", default="0.05", help="Retry-After of the 429s (seconds)")
    ap.add_argument("--timeout-s", type=float, default=1.0, help="judge.timeout_s (the server hangs 2 s)")
    ap.add_argument("--max-retries", type=int, default=3)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    faulty = ServerProcess(latency_s=a.latency_s, retry_after=a.retry_after, hang_s=2 * a.timeout_s, seed=0,
                           **FAULTS)
    clean = ServerProcess()
    try:
        with tempfile.TemporaryDirectory() as cache:
            result = run_load(faulty.url, faulty.ledger, a.n, a.concurrency, cache, a.timeout_s, a.max_retries)
            result["rerun_posts"] = rerun_with_cache(clean.url, a.n, a.concurrency, cache)
            result["rerun2_posts"] = rerun_with_cache(clean.url, a.n, a.concurrency, cache)
    finally:
        faulty.close()
        clean.close()
    result["checks"]["rerun sends only the unjudged"] = result["rerun_posts"] == result["unjudged"]
    result["checks"]["second rerun sends 0"] = result["rerun2_posts"] == 0
    result["ok"] = all(result["checks"].values())
    result.update(faults=FAULTS, retry_after=a.retry_after, timeout_s=a.timeout_s, max_retries=a.max_retries,
                  latency_s=a.latency_s, load_average=open("/proc/loadavg").read().split()[:3],
                  cpus=os.cpu_count(), command=" ".join(sys.argv))
    out = ROOT / "benchmarks" / "results" / f"judge_load{'_' + a.tag if a.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    r = result
    md = [f"# Step-judge load test ({r['n']} requests, {r['concurrency']} threads)", "",
          f"Command: `{r['command']}`; load average {' '.join(r['load_average'])}, {r['cpus']} CPUs; fake server in "
          f"its own process, latency {r['latency_s']} s; faults per POST: " +
          ", ".join(f"{k[2:]} {v:.0%}" for k, v in FAULTS.items()) +
          f"; Retry-After {r['retry_after']} s; judge.timeout_s {r['timeout_s']}, max_retries {r['max_retries']}.", "",
          "| requests | judged | unjudged (by cause) | retries | POSTs client / server | wall s | requests/s | POSTs/s |",
          "|---|---|---|---|---|---|---|---|",
          f"| {r['n']} | {r['judged']} | {r['unjudged']} ({', '.join(f'{c} {k}' for c, k in r['causes'].items()) or '-'}) "
          f"| {r['retries']} | {r['posts_client']} / {r['posts_server']} | {r['wall_s']:.1f} | "
          f"{r['requests_per_s']:.0f} | {r['posts_per_s']:.0f} |", "",
          f"Server outcomes: {r['server_outcomes']}. Shared back-off: the gate was paused {r['gate_paused_s']:.1f} s "
          f"in all. Tokens counted {r['prompt_tokens']:,} prompt + {r['completion_tokens']:,} completion; the server "
          f"billed {r['billed_prompt_tokens']:,} + {r['billed_completion_tokens']:,} (the difference: replies written "
          f"after the client had timed out: {r['late_ok_replies']} late OK replies); replies without usage "
          f"{r['usage_unknown']}.", "",
          f"Rerun with judge.cache_dir: {r['rerun_posts']} POSTs (the {r['unjudged']} unjudged), then "
          f"{r['rerun2_posts']}.", "", "Checks: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["checks"].items())]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    sys.exit(0 if r["ok"] else 1)


if __name__ == "__main__":
    main()
