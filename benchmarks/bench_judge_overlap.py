"""What an HTTP step judge with real latency adds to an RL step, against the rule judge (no latency).

    python benchmarks/bench_judge_overlap.py                          # latencies 0.2 s and 2 s, beta 0.04 and 0
    python benchmarks/bench_judge_overlap.py --latencies 0.2 --rounds 3

The trainer scores a step's completions (rewards + judge) on a worker thread (mrpo.rollout.in_background)
while its main thread runs the old / reference log-prob passes, so a judge of latency L should add about
max(0, L - those passes) to the step (with max_concurrency >= completions per rank: one wave of requests).
Here: the tiny default model on CPU, one process, 16 completions per step (G = 8), every completion cut
into 3 steps so each one is sent to the judge (the tiny policy without warm-up writes no reasoning block;
the rule judge gets the same steps), the fake OpenAI-compatible server (benchmarks/fake_judge_server.py) in
its own process answering after L s. One Trainer per variant, all in this process, stepped in interleaved
rounds (variant order rotating each round); medians over the rounds after the warm-up.
Columns: step (time/step), logprobs (time/logprobs: the reference pass for beta > 0, nothing for beta = 0),
judge (time/judge: seconds the scoring thread ran), wait (step - generate - logprobs - loss_backward: the
exposed part of the scoring, advantages included), added (wait - the rule judge's wait; the step times
themselves also move with the completion lengths, which differ between variants once their policies
diverge) and predicted (max(0, judge - logprobs) - the same for the rule judge).
Writes results/judge_overlap[_TAG].json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def three_steps(text, tag="think", *exclude):
    """Every completion as 3 steps (equal thirds of its text), so each one is judged."""
    from mrpo.rewards.steps import Step

    n = len(text)
    if n < 3:
        return [Step(text, 0, n)] if n else []
    cuts = [0, n // 3, 2 * n // 3, n]
    return [Step(text[a:b], a, b) for a, b in zip(cuts, cuts[1:])]


def build(variant: dict, out: Path, data: Path, beta: float, max_new_tokens: int):
    from mrpo.config import load_config
    from mrpo.trainer import Trainer

    ov = {"output_dir": str(out), "data.synthetic_dir": str(data), "sft.steps": 0, "optim.max_steps": 1000,
          "logging.progress": False, "logging.tensorboard": False, "distributed.engine": "none",
          "checkpoint.every_steps": 0, "loss.beta": beta, "rollout.max_new_tokens": max_new_tokens,
          "judge.kind": variant["kind"]}
    if variant["kind"] == "http":
        ov.update({"judge.base_url": variant["url"], "judge.model": "judge-model", "judge.timeout_s": 30,
                   "judge.max_concurrency": 16, "judge.api_key_env": "MRPO_BENCH_NO_KEY"})
    return Trainer(load_config(None, [f"{k}={v}" for k, v in ov.items()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.2, 2.0])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.04, 0.0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()

    import torch

    import mrpo.rewards
    from benchmarks.bench_judge_load import ServerProcess

    torch.set_num_threads(a.threads)
    os.environ.setdefault("NO_PROXY", "127.0.0.1")
    mrpo.rewards.segment_steps = three_steps
    servers = {lat: ServerProcess(latency_s=lat) for lat in a.latencies}
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            for beta in a.betas:
                variants = [{"name": "rule", "kind": "rule", "latency": 0.0}] + [
                    {"name": f"http {lat:g} s", "kind": "http", "url": servers[lat].url, "latency": lat}
                    for lat in a.latencies]
                trainers = [build(v, Path(tmp) / f"b{beta}_{i}", data, beta, a.max_new_tokens)
                            for i, v in enumerate(variants)]
                samples = [[] for _ in variants]
                for r in range(a.warmup + a.rounds):
                    order = list(range(len(variants)))
                    order = order[r % len(order):] + order[:r % len(order)]   # rotate: no variant always first
                    for i in order:
                        m = trainers[i].train_step()
                        if r >= a.warmup:
                            samples[i].append(m)
                        print(f"beta {beta} round {r} {variants[i]['name']}: step {m['time/step']:.3f} s, "
                              f"judge {m['time/judge']:.3f} s, sent {m['judge_sent']:.0f}", flush=True)
                med = lambda xs: statistics.median(xs)  # noqa: E731
                base_wait = base_exposed = None
                for v, ms in zip(variants, samples):
                    step = med([m["time/step"] for m in ms])
                    lp = med([m["time/logprobs"] for m in ms])
                    judge = med([m["time/judge"] for m in ms])
                    wait = med([m["time/step"] - m["time/generate"] - m["time/logprobs"] - m["time/loss_backward"]
                                for m in ms])
                    exposed = max(0.0, judge - lp)
                    if v["kind"] == "rule":
                        base_wait, base_exposed = wait, exposed
                    rows.append({"beta": beta, "variant": v["name"], "latency_s": v["latency"], "step_s": step,
                                 "logprobs_s": lp, "judge_s": judge, "wait_s": wait,
                                 "added_s": wait - base_wait, "predicted_s": exposed - base_exposed,
                                 "sent_per_step": med([m["judge_sent"] for m in ms]),
                                 "requests_per_step": med([m["judge/requests"] for m in ms]),
                                 "unjudged": sum(m["unjudged"] for m in ms)})
                for t in trainers:
                    t.close()
    finally:
        for s in servers.values():
            s.close()
    load = open("/proc/loadavg").read().split()[:3]
    result = {"rows": rows, "rounds": a.rounds, "warmup": a.warmup, "threads": a.threads, "load_average": load,
              "command": " ".join(sys.argv), "torch": torch.__version__}
    out = ROOT / "benchmarks" / "results" / f"judge_overlap{'_' + a.tag if a.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = ["# HTTP step judge latency vs the rule judge: what it adds to an RL step", "",
          f"Command: `{result['command']}`; tiny default model, CPU, 1 process, {a.threads} torch thread(s), 16 "
          f"completions per step (one wave of judge requests: judge.max_concurrency 16), medians of {a.rounds} "
          f"interleaved rounds after {a.warmup} warm-up; load average {' '.join(load)}.", "",
          "| loss.beta | judge | step s | logprobs s | judge s | wait s | added s | predicted s | requests/step |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['beta']:g} | {r['variant']} | {r['step_s']:.3f} | {r['logprobs_s']:.3f} | {r['judge_s']:.3f} | "
                  f"{r['wait_s']:.3f} | {r['added_s']:+.3f} | {r['predicted_s']:+.3f} | {r['requests_per_step']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
