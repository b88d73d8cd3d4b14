"""Every training option runs in a test: reference policy (beta > 0) under each engine and with LoRA,
num_iterations > 1 (old log-probs, clipping on the later passes), gradient checkpointing (same
gradients as without)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .objective_worker import build_trainer, fixed_rollout, layout_gradients

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def _reference_worker(tmp_path, data, engine, lora_rank=0, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "reference_worker.py"), str(tmp_path), str(data), engine, str(lora_rank)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count(" ok") == nproc


@pytest.mark.slow
def test_reference_policy_under_fsdp2(shared_data, tmp_path):
    _reference_worker(tmp_path, shared_data, "fsdp2")


@pytest.mark.slow
def test_reference_policy_under_deepspeed(shared_data, tmp_path):
    pytest.importorskip("deepspeed")
    _reference_worker(tmp_path, shared_data, "deepspeed")


@pytest.mark.slow
def test_lora_reference_is_the_policy_without_adapters_under_fsdp2(shared_data, tmp_path):
    _reference_worker(tmp_path, shared_data, "fsdp2", lora_rank=4)


def test_num_iterations_reuses_old_logprobs_and_clips_later_passes(shared_data, tmp_path):
    trainer = build_trainer(shared_data, tmp_path / "run", **{"algo.num_iterations": 2, "optim.lr": 0.05,
                                                               "loss.eps_low": 0.01, "loss.eps_high": 0.01})
    rollout = fixed_rollout(trainer, 0, 1)
    rollout.old_logprobs = trainer.logprobs(trainer.model, rollout)
    weights, micro = trainer.step_token_weights(rollout), trainer.micro_batches(rollout)
    first = trainer.accumulate_gradients(rollout, weights, micro)
    trainer.engine.step()
    second = trainer.accumulate_gradients(rollout, weights, micro)
    trainer.close()
    assert first[1].item() == 0, "first pass: the policy is the old policy, ratio 1, nothing clipped"
    assert second[1].item() > 0, "second pass: the policy moved beyond 1 +- eps on some tokens"


def test_gradient_checkpointing_gives_the_same_gradients(shared_data, tmp_path):
    grads = []
    for on in (False, True):
        trainer = build_trainer(shared_data, tmp_path / f"gc{on}", **{"model.gradient_checkpointing": on})
        assert trainer.model.is_gradient_checkpointing == on
        grads.append(layout_gradients(trainer, fixed_rollout(trainer, 0, 1), "token-mean", 4))
        trainer.close()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bf16_policy_under_fsdp2_keeps_fp32_master_weights(shared_data, tmp_path):
    """See dtype_worker.py: a bf16 policy's lr-1e-6 update is not rounded away (fp32 master weights)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "dtype_worker.py"), str(tmp_path), str(shared_data)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count(" ok: ") == 2, run.stdout


def test_bf16_policy_in_one_process_keeps_fp32_master_weights(shared_data, tmp_path):
    """One RL step of the tiny bf16 policy in one process at lr 1e-6: every weight whose (clipped) gradient is
    above AdamW's eps moves in its fp32 master (bf16 alone would keep < 20% of them; a gradient far below eps
    gives an update far below lr, which no dtype keeps), the module and the export stay bf16."""
    trainer = build_trainer(shared_data, tmp_path / "run", **{"model.dtype": "bfloat16", "optim.lr": 1e-6,
                                                                "optim.weight_decay": 0.0})
    engine = trainer.engine
    assert engine.name == "single" and engine.master
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    with engine.master.masters_in():
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rollout = fixed_rollout(trainer, 0, 1)
    trainer.accumulate_gradients(rollout, trainer.step_token_weights(rollout), trainer.micro_batches(rollout))
    grads = {names[id(p)]: g.clone() for p, g in zip(engine.master.params, engine.master.grads) if g is not None}
    norm, applied = engine.step()
    assert applied and norm > 0
    with engine.master.masters_in():
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    nonzero = moved = kept_in_bf16 = 0
    clip = min(1.0, trainer.cfg.optim.max_grad_norm / norm)
    for name, g in grads.items():
        mask = g.abs() * clip > 10 * trainer.cfg.optim.adam_eps
        nonzero += int(mask.sum())
        moved += int((after[name] != before[name])[mask].sum())
        kept_in_bf16 += int((after[name].bfloat16() != before[name].bfloat16())[mask].sum())
    assert nonzero > 0.5 * sum(t.numel() for t in before.values())
    assert moved == nonzero, (moved, nonzero)
    assert kept_in_bf16 < 0.2 * nonzero, kept_in_bf16
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in engine.full_state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    trainer.close()
