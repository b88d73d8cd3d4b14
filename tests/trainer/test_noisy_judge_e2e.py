"""judge.noise_flip_rate in the trainer: the training reward sees the flipped verdicts, evaluation the clean ones."""
import json
from pathlib import Path

import torch

from mrpo.config import load_config
from mrpo.judges import NoisyJudge
from mrpo.judges.rule import RuleJudge
from mrpo.trainer import Trainer

from .conftest import tiny_overrides


def test_noisy_judge_trains_on_flips_and_evaluates_clean(shared_data, tmp_path):
    torch.set_num_threads(2)
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run", **{
        "judge.noise_flip_rate": 1.0, "optim.max_steps": 1, "sft.steps": 60, "sft.lr": 0.003,
        "rollout.max_new_tokens": 64, "logging.eval_at_start": False}))
    trainer = Trainer(cfg)
    try:
        assert isinstance(trainer.judge, NoisyJudge) and trainer.reward_model.judge is trainer.judge
        trainer.train()
        assert trainer.judge.seen > 0 and trainer.judge.flipped == trainer.judge.seen   # every verdict flipped
    finally:
        trainer.close()
    facts = {json.loads(line)["id"]: json.loads(line)["facts"]
             for line in (Path(shared_data) / "test.jsonl").read_text().splitlines() if line.strip()}
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "eval" / "final" / "reasoning_steps.jsonl").read_text().splitlines() if line.strip()]
    judged = [r for r in rows if r.get("valid") and r.get("steps")]
    assert judged, "no evaluated answer had judged steps"
    for r in judged:                                   # evaluation verdicts = the clean rule judge's
        assert r["valid"] == RuleJudge().judge_steps(r["steps"], facts[r["id"]]).valid
