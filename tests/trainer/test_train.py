"""End-to-end tests of the trainer on the tiny offline model and synthetic data (CPU)."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrpo.config import load_config
from mrpo.rollout import MicroBatch, Rollout, micro_batches, pad_micro_batches
from mrpo.trainer import PromptSampler, Trainer, first_failure_stage

from .conftest import read_metrics, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TIMING = ("time", "tokens_per_s")


def _metrics(out_dir) -> list[dict]:
    return read_metrics(out_dir)


def _rl_steps(out_dir) -> dict[int, dict]:
    rows = [m for m in _metrics(out_dir) if "phase" not in m]
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(TIMING)} for m in rows}


def test_tiny_run_end_to_end(shared_data, tmp_path):
    torch.set_num_threads(2)
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run"))
    trainer = Trainer(cfg)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    out = tmp_path / "run"
    steps = _rl_steps(out)
    assert sorted(steps) == [1, 2]
    for m in steps.values():
        assert math.isfinite(m["loss"]) and math.isfinite(m["reward"]) and 0 <= m["accuracy"] <= 1
        assert m["skipped_updates"] == 0 and math.isfinite(m["grad_norm"])
    assert (out / "config.yaml").exists() and (out / "versions.json").exists()
    assert any((out / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"]          # keep_last=2, no .tmp left behind
    summary = json.loads((out / "eval" / "final" / "summary.json").read_text())
    assert summary["n_records"] == 4 and 0 <= summary["accuracy"] <= 1
    assert "eval/accuracy" in final
    assert (out / "eval" / "final" / "predictions.jsonl").exists() and (out / "eval" / "final" / "reasoning.json").exists()
    # the exported policy loads with plain transformers and matches the trained weights
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(out / "final_model")
    trained = trainer.model.state_dict()
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)


@pytest.mark.parametrize("algo, family", [("grpo", "qwen2_5_vl"), ("gdpo", "qwen2_5_vl"), ("dr_grpo", "qwen2_5_vl"),
                                          ("mrpo", "qwen3_vl"), ("mrpo", "internvl3")])
def test_methods_and_backbones_run(shared_data, tmp_path, algo, family):
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path, **{
        "algo.name": algo, "model.family": family, "optim.max_steps": 1, "sft.steps": 1,
        "logging.eval_at_end": False, "checkpoint.export_final": False}))
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert math.isfinite(_rl_steps(tmp_path)[1]["loss"])
    assert trainer.reasoning_tag == ("thinking" if family == "qwen3_vl" else "think")


def test_nonfinite_gradient_skips_update(shared_data, tmp_path):
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path, **{"sft.steps": 0}))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    norm, ok = trainer.engine.step()
    assert not ok and not math.isfinite(norm)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.close()


def test_prompt_sampler_is_deterministic_and_disjoint_across_ranks():
    a = PromptSampler(10, seed=3, shuffle=True, rank=0, world=2)
    b = PromptSampler(10, seed=3, shuffle=True, rank=1, world=2)
    first = a.next(2) + b.next(2)
    assert len(set(first)) == 4
    state = a.state_dict()
    again = PromptSampler(10, seed=3, shuffle=True, rank=0, world=2)
    again.load_state_dict(state)
    assert again.next(2) == a.next(2)


def test_first_failure_stage():
    assert first_failure_stage([False, True, True]) == "early"
    assert first_failure_stage([True, False, True]) == "mid"
    assert first_failure_stage([True, True, False]) == "late"
    assert first_failure_stage([True, True]) is None


def test_micro_batches_are_padded_to_the_largest_count_with_zero_weight_fillers():
    lengths = [50, 30, 80, 20, 60]
    own = micro_batches(lengths, max_seqs=4, max_tokens=100)
    assert own == [[0, 1], [2, 3], [4]]
    padded = pad_micro_batches(own, 5, lengths)
    assert padded[:3] == [MicroBatch([0, 1]), MicroBatch([2, 3]), MicroBatch([4])]
    assert padded[3:] == [MicroBatch([3], filler=True)] * 2   # the shortest sequence, flagged
    assert pad_micro_batches(own, 3, lengths) == padded[:3]


def _run_cli(args, env_extra=None, nproc=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mrpo.train", *args]
    else:
        cmd = [sys.executable, "-m", "mrpo.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, {"lora.rank": 4, "loss.beta": 0.05}], ids=["full", "lora_kl"])
def test_sigkill_mid_step_then_resume_matches_unbroken_run(shared_data, tmp_path, variant):
    extra = {"optim.max_steps": 4, "logging.eval_at_end": False, "checkpoint.export_final": False,
             "checkpoint.keep_last": 5, **variant}
    unbroken = _run_cli(tiny_overrides(shared_data, tmp_path / "a", **extra))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    crashed = _run_cli(tiny_overrides(shared_data, tmp_path / "b", **extra),
                       env_extra={"MRPO_TEST_HOOK": "tests.trainer.fault_hooks:sigkill_after_scoring",
                                  "MRPO_FAULT_STEP": "3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert sorted(_rl_steps(tmp_path / "b")) == [1, 2]
    resumed = _run_cli(tiny_overrides(shared_data, tmp_path / "b", **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _rl_steps(tmp_path / "a"), _rl_steps(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-6, abs=1e-9, nan_ok=True), (step, k)


@pytest.mark.slow
def test_fsdp2_two_processes(shared_data, tmp_path):
    """The issue-21 reproduction in small: a token budget per micro-batch under FSDP2 finishes."""
    run = _run_cli(tiny_overrides(shared_data, tmp_path, **{"optim.max_steps": 2,
                                                            "loss.max_tokens_per_micro_batch": 200}), nproc=2)
    assert run.returncode == 0, run.stderr[-4000:]
    steps = _rl_steps(tmp_path)
    assert sorted(steps) == [1, 2] and all(math.isfinite(m["loss"]) for m in steps.values())
    assert all(m["micro_batches"] >= 1 and "filler_micro_batches" in m for m in steps.values())
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "final_model")
    assert json.loads((tmp_path / "eval" / "final" / "summary.json").read_text())["n_records"] == 4


def test_overlong_prompts_are_skipped_and_counted(shared_data, tmp_path):
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path, **{"sft.steps": 0}))
    trainer = Trainer(cfg)
    train, test = trainer.pool.records, trainer.test_pool.records
    train[0] = {**train[0], "problem": "lesion " * 400}
    chosen = trainer.pool.usable([0, 1], 2)
    assert [r["id"] for r in chosen] == [train[1]["id"], train[2]["id"]]
    assert trainer.pool.too_long == {train[0]["id"]}
    trainer.cfg.data.on_bad_row = "error"
    trainer.pool.too_long.clear()
    with pytest.raises(ValueError, match=train[0]["id"]):
        trainer.pool.usable([0, 1], 2)
    trainer.cfg.data.on_bad_row = "skip"
    test[1] = {**test[1], "problem": "lesion " * 400}
    summary = trainer.evaluate("skip_long")   # the over-long test prompt is left out, not a crash
    assert summary["n_records"] == 3 and test[1]["id"] in trainer.pool.too_long
    trainer.close()


def test_frozen_vision_tower_and_gradient_checkpointing(shared_data, tmp_path):
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path, **{
        "sft.steps": 0, "model.freeze_vision": True, "model.gradient_checkpointing": True}))
    trainer = Trainer(cfg)
    records = trainer.pool.records[:2]
    completions = [[5, 6, 7], [8, 9]]
    rollout = Rollout(trainer.pool.encode(records), [0, 1], records, completions)
    hidden, weight = trainer.hidden_states(trainer.model, rollout, [0, 1])
    assert hidden.shape == (5, weight.shape[1])
    (hidden @ weight.T).logsumexp(-1).sum().backward()
    named = dict(trainer.model.named_parameters())
    vision = [k for k in named if ".visual." in k]
    language = [k for k in named if ".language_model.layers." in k]
    assert vision and language
    assert all(not named[k].requires_grad and named[k].grad is None for k in vision)
    assert all(named[k].grad is not None and named[k].grad.abs().sum() > 0 for k in language)
    assert trainer.model.is_gradient_checkpointing
    trainer.close()


def test_lora_run_exports_adapter_and_merged_model(shared_data, tmp_path):
    """LoRA through the trainer: only adapters train, no reference copy with beta > 0, and the export holds
    the peft adapter folder and a merged model equal to the adapted policy."""
    from transformers import AutoModelForImageTextToText

    from mrpo.models.lora import merged_state_dict

    cfg = load_config(None, tiny_overrides(shared_data, tmp_path, **{
        "lora.rank": 4, "lora.merge_on_export": True, "loss.beta": 0.05, "optim.max_steps": 1, "sft.steps": 1,
        "logging.eval_at_end": False}))
    trainer = Trainer(cfg)
    assert trainer.ref_model is None
    frozen = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    try:
        trainer.train()
    finally:
        trainer.close()
    for name, p in trainer.model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert math.isfinite(_rl_steps(tmp_path)[1]["kl"])
    assert (tmp_path / "final_model" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "final_model").state_dict()
    for name, value in merged_state_dict(trainer.model).items():
        if name in merged:
            torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6)
