"""Custom rewards and a python step judge through a short training run and its held-out evaluation."""
import json
import math
import textwrap

from mrpo.config import load_config
from mrpo.trainer import Trainer

from .conftest import tiny_overrides

PLUGINS = """
    import asyncio

    from mrpo.judges.base import JudgeRequest
    from mrpo.judges.rule import RuleJudge

    _rule = RuleJudge(None)
    JUDGED = []

    def judge(steps, question, images, gold_reasoning, **extra):
        # the rule judge's verdict, from a plain function: what a user's own judge would return
        req = JudgeRequest(extra["sample_id"], question, images, extra["gold_answer"], gold_reasoning, steps,
                           extra["facts"])
        JUDGED.append(extra["sample_id"])
        v = _rule.judge([req])[0]
        return None if v is None else {"alignment": v.alignment, "contribution": v.contribution}

    def brevity(steps, **_):
        return [None if not s else 1.0 / len(s) for s in steps]

    async def exact(answers, solution, **_):
        await asyncio.sleep(0)
        return [None if a is None else float(a.strip().lower() == str(s).lower()) for a, s in zip(answers, solution)]

    def broken(completions, **_):
        raise RuntimeError("verifier down")
"""


def _scripted_outputs(monkeypatch):
    """The tiny policy after one warm-up step writes no <think> steps, so nothing would reach the judge:
    its sampled completions are replaced by the gold rationale with a right or wrong answer (alternating
    within each group), and its greedy evaluation outputs by the rationale with a wrong answer. Scoring,
    advantages, the loss and evaluation run unchanged on them."""
    import mrpo.trainer

    real_sample_groups = mrpo.trainer.sample_groups

    def sample_groups(engine, backbone, pool, prompts, rollout_cfg, **kwargs):
        rollout = real_sample_groups(engine, backbone, pool, prompts, rollout_cfg, **kwargs)
        rollout.sample_logprobs = None   # the scripted completions below were not sampled
        for i, rec in enumerate(rollout.records):
            answer = rec["solution"] if i % 2 == 0 else "wrong"
            text = f"<think>{rec['gold_reasoning']}</think><answer>{answer}</answer>"
            rollout.completion_ids[i] = (backbone.tokenizer.encode(text, add_special_tokens=False)
                                         + [backbone.eos_token_ids[0]])
        return rollout

    def greedy_texts(engine, backbone, pool, records, *args, **kwargs):
        return [f"<think>{r['gold_reasoning']}</think><answer>wrong</answer>" for r in records]

    monkeypatch.setattr(mrpo.trainer, "sample_groups", sample_groups)
    monkeypatch.setattr(mrpo.trainer, "greedy_texts", greedy_texts)


def test_custom_rewards_and_python_judge_through_training_and_eval(shared_data, tmp_path, monkeypatch):
    _scripted_outputs(monkeypatch)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "e2e_plugins.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.syspath_prepend(str(plugins))
    custom = ('[{name: brevity, function: "e2e_plugins:brevity", weight: 0.5}, '
              '{name: exact, function: "e2e_plugins:exact"}, '
              '{name: broken, function: "e2e_plugins:broken", weight: 1.0}]')
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run", **{
        "judge.kind": "python", "judge.function": "e2e_plugins:judge", "judge.cache_dir": str(tmp_path / "cache"),
        "reward.custom": custom, "optim.max_steps": 2, "sft.steps": 1, "checkpoint.export_final": False,
        "logging.tensorboard": False}))
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.reward_model.columns == [("answer", 1.0), ("process", 1.0), ("length", 1.0), ("brevity", 0.5),
                                            ("exact", 1.0), ("broken", 1.0)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "phase" not in r]
    assert [r["step"] for r in steps] == [1, 2]                               # the raising reward did not stop it
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"])
        assert r["reward_failed/exact/exception"] == 0 and r["reward_missing/exact"] == 0
        assert r["reward_failed/broken/exception"] == 4 and r["reward_missing/broken"] == 4   # 4 completions/step
        assert r["reward/broken"] is None                                   # no value: null in strict JSON
        assert r["judge_sent"] == 4 and r["unjudged"] == 0                  # the python judge judged them all
        assert 0 < r["reward/process"] <= 1 and r["reward/brevity"] > 0 and r["reward/exact"] == 0.5
    import e2e_plugins

    summary = json.loads((tmp_path / "run" / "eval" / "final" / "summary.json").read_text())
    assert summary["judge"] == "PythonJudge" and summary["n_records"] == 4 and summary["wrong_judged"] == 4
    assert len(e2e_plugins.JUDGED) == 2 * 4 + 4                               # 2 RL steps x 4 + 4 evaluated
    assert any((tmp_path / "cache").rglob("*.json"))
