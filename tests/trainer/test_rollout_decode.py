"""Rollouts through mrpo.decoding: the distinct prompts decoded into G rows each, a seed per row (a resumed
run draws the same completions; a prompt's completions do not depend on the call's other prompts), and the trainer's rollout-vs-trainer log-prob metric from the first
log-prob pass (num_iterations = 1: the loss forward; > 1: the old log-probs), on both decode paths."""
import math

import pytest
import torch

from mrpo.rollout import sample_groups

from .objective_worker import build_trainer


@pytest.mark.parametrize("decode, iterations", [("loop", 1), ("loop", 2), ("hf", 1)])
def test_logprob_diff_metric_from_the_first_pass(shared_data, tmp_path, decode, iterations):
    """fp32 tiny policy: the sampling log-probs of either path are the trainer's to float rounding once
    the vision tokens are not suppressed; with them suppressed (the default) every token's sampling
    log-prob is higher by -log(1 - the suppressed mass): the mismatch the metric is there to show."""
    trainer = build_trainer(shared_data, tmp_path / "run", **{"rollout.decode": decode,
                                                              "algo.num_iterations": iterations})
    try:
        suppressed = trainer.backbone.suppress_token_ids
        m = trainer.train_step()
        trainer.backbone.suppress_token_ids = []
        exact = trainer.train_step()
    finally:
        trainer.close()
    assert suppressed
    mean, peak = exact["rollout/logprob_diff_mean"], exact["rollout/logprob_diff_max"]
    assert math.isfinite(mean) and 0 <= mean <= peak < 1e-4, (mean, peak)
    mean, peak = m["rollout/logprob_diff_mean"], m["rollout/logprob_diff_max"]
    assert 1e-4 < mean <= peak < 0.1, (mean, peak)


def test_rollout_decodes_distinct_prompts_with_a_seed_per_row(shared_data, tmp_path):
    trainer = build_trainer(shared_data, tmp_path / "run")
    try:
        records = trainer.pool.records[:2]
        cfg = trainer.cfg.rollout
        first = sample_groups(trainer.engine, trainer.backbone, trainer.pool, records, cfg, seed=(7, 3))
        assert first.decode_stats["path"] == "loop" and first.decode_stats["prefill_rows"] == 2
        assert first.prompts["input_ids"].shape[0] == 2 and first.prompt_row == [0] * cfg.group_size + [1] * cfg.group_size
        assert [len(lp) for lp in first.sample_logprobs] == first.lengths
        torch.manual_seed(123)   # whatever ran before (a resumed process): the same seed, the same completions
        again = sample_groups(trainer.engine, trainer.backbone, trainer.pool, records, cfg, seed=(7, 3))
        assert again.completion_ids == first.completion_ids
        other = sample_groups(trainer.engine, trainer.backbone, trainer.pool, records, cfg, seed=(7, 4))
        assert other.completion_ids != first.completion_ids
        # a prompt's G completions do not depend on the call's other prompts (another split over ranks)
        G = cfg.group_size
        alone = sample_groups(trainer.engine, trainer.backbone, trainer.pool, records[1:], cfg, seed=(7, 3))
        swapped = sample_groups(trainer.engine, trainer.backbone, trainer.pool, records[::-1], cfg, seed=(7, 3))
        assert alone.completion_ids == swapped.completion_ids[:G] == first.completion_ids[G:]
        assert swapped.completion_ids[G:] == first.completion_ids[:G]
        for a, b in zip(alone.sample_logprobs, first.sample_logprobs[G:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    finally:
        trainer.close()
