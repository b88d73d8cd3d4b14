"""Judge cost and budget (mrpo.judges.spend): sums over ranks, the running total, the budget stop, resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.fake_judge_server import FakeJudgeServer
from mrpo.errors import JudgeBudgetError
from mrpo.judges.spend import JudgeSpend, cost_usd

REPO = Path(__file__).resolve().parents[2]


def _step(prompt, completion, requests=1, hits=0, unknown=0):
    return {"judge/requests": requests, "judge/cache_hits": hits, "judge/prompt_tokens": prompt,
            "judge/completion_tokens": completion, "judge/usage_unknown": unknown, "reward": 0.5}


def test_account_prices_the_step_and_keeps_a_running_total():
    spend = JudgeSpend(price_input_per_mtok=0.25, price_output_per_mtok=2.0)
    # the step's usage as the trainer's all-reduce leaves it: summed over ranks (USAGE_KEYS)
    m = spend.account(_step(4000.0, 300.0, requests=5, hits=1, unknown=1))
    assert (m["judge/prompt_tokens"], m["judge/completion_tokens"], m["judge/requests"], m["judge/cache_hits"],
            m["judge/usage_unknown"]) == (4000, 300, 5, 1, 1)
    assert m["judge/cost_usd"] == pytest.approx((4000 * 0.25 + 300 * 2.0) / 1e6) == m["judge/cost_usd_total"]
    assert m["reward"] == 0.5                                            # other metrics untouched
    m2 = spend.account(_step(2000.0, 0.0))
    assert m2["judge/cost_usd_total"] == pytest.approx(m["judge/cost_usd"] + 2000 * 0.25 / 1e6)
    assert spend.postfix() == {"judge": f"${spend.total_usd:.2f}"}


def test_unpriced_shows_no_cost():
    spend = JudgeSpend()
    m = spend.account(_step(1000.0, 10.0))
    assert "judge/cost_usd_total" not in m and m["judge/prompt_tokens"] == 1000 and spend.postfix() == {}
    spend.check()                                                        # no budget: never raises


def test_budget_stops_when_the_next_step_could_pass_it_and_resumes_with_a_higher_one():
    price = dict(price_input_per_mtok=1.0, price_output_per_mtok=1.0)   # $1e-6 per token
    spend = JudgeSpend(**price, max_cost_usd=0.0035)
    spend.check()                                                        # nothing spent, no estimate yet
    for tokens in (1000, 1000):                                          # $0.001 a step
        spend.account(_step(tokens, 0))
        spend.check()                                                    # 0.001 + 0.001, 0.002 + 0.001 <= 0.0035
    spend.account(_step(1000, 0))
    with pytest.raises(JudgeBudgetError) as err:                         # 0.003 + 0.001 > 0.0035
        spend.check()
    msg = str(err.value)
    assert "judge.max_cost_usd=0.0035" in msg and "$0.0030 so far" in msg and "\n" not in msg
    assert err.value.spent_usd == pytest.approx(0.003)
    state = json.loads(json.dumps(spend.state_dict()))                   # as the checkpoint keeps it
    same = JudgeSpend(**price, max_cost_usd=0.0035)
    same.load_state_dict(state)
    with pytest.raises(JudgeBudgetError):
        same.check()                                                     # a resume with the same budget stops at once
    more = JudgeSpend(**price, max_cost_usd=0.01)
    more.load_state_dict(state)
    more.check()
    assert more.account(_step(500, 0))["judge/cost_usd_total"] == pytest.approx(0.0035)


def test_estimate_is_the_largest_recent_step():
    spend = JudgeSpend(1.0, 0.0, window=3)
    for tokens in (5000, 100, 100, 100):
        spend.account(_step(tokens, 0))
    assert spend.estimate_next_usd() == pytest.approx(100e-6)            # the 5000-token step left the window
    assert cost_usd(1e6, 1e6, 0.25, 2.0) == pytest.approx(2.25)


def test_config_keys_are_validated():
    from mrpo.config import ConfigError, load_config

    cfg = load_config(None, ["judge.price_input_per_mtok=0.25", "judge.price_output_per_mtok=2",
                             "judge.max_cost_usd=50", "judge.max_requests_per_minute=500"])
    assert (cfg.judge.max_cost_usd, cfg.judge.max_requests_per_minute) == (50, 500)
    with pytest.raises(ConfigError, match="judge.price_output_per_mtok"):
        load_config(None, ["judge.price_output_per_mtok=-1"])
    with pytest.raises(ConfigError, match="judge.max_cost_usd.*prices"):
        load_config(None, ["judge.max_cost_usd=5"])


# ----------------------------------------------------------------------------- through mrpo.train

def one_step_per_completion(trainer):
    """MRPO_TEST_HOOK: every completion gets one reasoning step, so each one is sent to the judge (the
    tiny policy without warm-up writes no reasoning block)."""
    import mrpo.rewards
    from mrpo.rewards.steps import Step

    mrpo.rewards.segment_steps = lambda text, tag="think", *special: [Step(text[:1], 0, len(text[:1]))]


def _train(out, data, url, budget, steps=3, nproc=1, **extra):
    from tests.trainer.conftest import tiny_overrides

    args = tiny_overrides(data, out, **{
        "judge.kind": "http", "judge.base_url": url, "judge.model": "judge-model", "judge.max_retries": 0,
        "judge.price_input_per_mtok": 1.0, "judge.price_output_per_mtok": 4.0, "judge.max_cost_usd": budget,
        "optim.max_steps": steps, "sft.steps": 0, "checkpoint.every_steps": 100, "logging.eval_at_end": False,
        "checkpoint.export_final": False, "logging.tensorboard": False, **extra})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1",
           "MRPO_TEST_HOOK": "tests.judges.test_spend:one_step_per_completion", "PYTHONPATH": str(REPO)}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, "-m", "mrpo.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "phase" not in r]


@pytest.mark.slow
def test_budget_stop_exit_4_then_resume_with_a_higher_budget(tmp_path):
    server = FakeJudgeServer().start()
    out, data = tmp_path / "run", tmp_path / "data"
    try:
        first = _train(out, data, server.url, budget=1e-9)              # the first step's cost passes it
        assert first.returncode == 4, first.stderr[-3000:]
        line = [x for x in first.stderr.splitlines() if "judge budget" in x]
        assert len(line) == 1 and "judge.max_cost_usd=1e-09" in line[0] and "so far" in line[0]
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1]
        assert (out / "checkpoints" / "step_000001" / "COMPLETE").exists()
        ledger = server.ledger()
        r1 = rows[0]
        assert r1["judge/requests"] == ledger["posts"] == r1["judge_sent"] == 4   # 4 completions, one call each
        assert (r1["judge/prompt_tokens"], r1["judge/completion_tokens"]) == (
            ledger["billed"]["prompt_tokens"], ledger["billed"]["completion_tokens"])
        assert r1["judge/cost_usd_total"] == pytest.approx(
            cost_usd(r1["judge/prompt_tokens"], r1["judge/completion_tokens"], 1.0, 4.0))

        again = _train(out, data, server.url, budget=1e-9)              # same budget: stops before any step
        assert again.returncode == 4 and "judge budget" in again.stderr
        assert [r["step"] for r in _rows(out)] == [1] and server.ledger()["posts"] == 4

        more = _train(out, data, server.url, budget=100.0)              # a higher budget goes on
        assert more.returncode == 0, more.stderr[-3000:]
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1, 2, 3]
        totals = [r["judge/cost_usd_total"] for r in rows]
        assert totals[1] == pytest.approx(totals[0] + rows[1]["judge/cost_usd"])
        assert totals[2] == pytest.approx(totals[1] + rows[2]["judge/cost_usd"])
        assert sum(r["judge/requests"] for r in rows) == server.ledger()["posts"] == 12
    finally:
        server.close()


@pytest.mark.slow
def test_usage_summed_over_two_ranks_and_shown_on_the_step_line(tmp_path):
    server = FakeJudgeServer().start()
    out = tmp_path / "run"
    try:
        run = _train(out, tmp_path / "data", server.url, budget=0, steps=2, nproc=2, **{"logging.progress": True})
        ledger = server.ledger()
    finally:
        server.close()
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _rows(out)
    assert [r["judge/requests"] for r in rows] == [8, 8]                 # 2 ranks x 4 completions, one call each
    assert sum(r["judge/requests"] for r in rows) == ledger["posts"]
    assert sum(r["judge/prompt_tokens"] for r in rows) == ledger["billed"]["prompt_tokens"]
    assert sum(r["judge/completion_tokens"] for r in rows) == ledger["billed"]["completion_tokens"]
    total = rows[-1]["judge/cost_usd_total"]
    assert f"judge=${total:.2f}" in run.stderr                           # the console's step line
