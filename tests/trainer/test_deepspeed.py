"""DeepSpeed ZeRO-3 engine (distributed.engine=deepspeed): config building, gradient / step / checkpoint
correctness against an unsharded reference (2 gloo processes), an end-to-end CLI run with export, and
resume=auto reproducing an unbroken run (and refused in one line on one process). Skipped when deepspeed
is not installed."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from mrpo.config import load_config  # noqa: E402
from mrpo.engines.deepspeed import build_config  # noqa: E402

from .conftest import read_metrics, tiny_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMING = ("time", "tokens_per_s")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return _run(["-m", "mrpo.train", *args, "distributed.engine=deepspeed"])


def _rl_steps(out_dir) -> dict[int, dict]:
    rows = read_metrics(out_dir)
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(TIMING)} for m in rows if "phase" not in m}


# ---------------------------------------------------------------------------------------------- config
def test_build_config_from_run_config():
    cfg = load_config(None, ["rollout.group_size=4", "optim.per_device_batch_size=3", "optim.grad_accum_steps=4",
                             "optim.max_grad_norm=0.7",
                             "distributed.engine=deepspeed", "distributed.param_dtype=bfloat16"])
    cpu = build_config(cfg, torch.device("cpu"))
    assert cpu["train_micro_batch_size_per_gpu"] == 3 and cpu["gradient_accumulation_steps"] == 4
    assert cpu["gradient_clipping"] == 0.7 and cpu["managed_gradient_accumulation"] is False
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["bf16"] == {"enabled": False} and cpu["communication_data_type"] == "fp32"   # fp32 on CPU
    gpu = build_config(cfg, torch.device("cuda", 0))
    assert gpu["bf16"] == {"enabled": True} and gpu["communication_data_type"] == "fp32"    # fp32 reduction
    assert not build_config(load_config(None, []), torch.device("cuda", 0))["bf16"]["enabled"]  # param_dtype fp32
    bf16_model = load_config(None, ["model.dtype=bfloat16"])
    assert build_config(bf16_model, torch.device("cpu"))["bf16"]["enabled"]
    merged = build_config(cfg, torch.device("cpu"), {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert merged["zero_optimization"] == {**cpu["zero_optimization"], "offload_optimizer": {"device": "cpu"}}


def test_build_config_rejects_bad_settings():
    ns = SimpleNamespace(optim=SimpleNamespace(per_device_batch_size=1, grad_accum_steps=1, max_grad_norm=1.0),
                         distributed=SimpleNamespace(deepspeed_zero_stage=4, param_dtype="float32",
                                                     reduce_dtype="float32"),
                         model=SimpleNamespace(dtype="float32"))
    with pytest.raises(ValueError, match="deepspeed_zero_stage"):
        build_config(ns, torch.device("cpu"))
    ns.distributed.deepspeed_zero_stage, ns.model.dtype = 3, "float16"
    with pytest.raises(ValueError, match="float16"):
        build_config(ns, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- 2 processes
def _tied_copy(src: Path, dst: Path) -> Path:
    """A copy of a tiny model folder whose lm_head is tied to the token embedding."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.slow
def test_zero3_gradients_step_checkpoint(tmp_path):
    """See deepspeed_worker.py: ZeRO-3 gradients (lm_head, decoder, embedding, vision), clipped AdamW step,
    save/load, non-finite skip, consolidated state dict, ZeRO-3 reference == an unsharded reference; for
    an untied and a tied lm_head."""
    from mrpo.models.tiny import build_tiny

    untied = build_tiny("qwen2_5_vl", tmp_path / "untied")
    tied = _tied_copy(untied, tmp_path / "tied")
    run = _run([str(Path(__file__).with_name("deepspeed_worker.py")), str(tmp_path / "scratch"), str(untied),
                str(tied)])
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    for r in (0, 1):
        assert f"rank {r}: untied ok (tied lm_head: False)" in run.stdout, run.stdout
        assert f"rank {r}: tied ok (tied lm_head: True)" in run.stdout, run.stdout


@pytest.mark.slow
def test_deepspeed_two_processes_end_to_end(shared_data, tmp_path):
    run = _train(tiny_overrides(shared_data, tmp_path, **{"optim.max_steps": 2, "logging.eval_at_start": False}))
    assert run.returncode == 0, run.stderr[-4000:]
    steps = _rl_steps(tmp_path)
    assert sorted(steps) == [1, 2]
    for m in steps.values():
        assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "reward", "lr")), m
        assert m["skipped_updates"] == 0
    sft = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"sft"' in x]
    assert sft and all(math.isfinite(m["sft_nll"]) for m in sft)
    ckpt = tmp_path / "checkpoints" / "step_000002"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "deepspeed").is_dir()
    # the exported folder loads with transformers and holds the trained weights (the checkpoint's fp32
    # master weights, consolidated by DeepSpeed's own zero_to_fp32 reader)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "final_model").state_dict()
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    for name in ("lm_head.weight", "model.language_model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(exported[name], master[name]), name
    assert json.loads((tmp_path / "eval" / "final" / "summary.json").read_text())["n_records"] == 4


@pytest.mark.slow
def test_deepspeed_resume_auto_matches_unbroken_run(shared_data, tmp_path):
    """Run 2 steps (checkpoint each), then drop the step-2 checkpoint and its metrics as a crash after
    step 1 would, rerun: resume=auto continues from step 1 and reproduces step 2's metrics."""
    args = tiny_overrides(shared_data, tmp_path, **{
        "optim.max_steps": 2, "sft.steps": 0, "checkpoint.keep_last": 5, "logging.eval_at_start": False,
        "logging.eval_at_end": False, "checkpoint.export_final": False, "logging.tensorboard": False})
    first = _train(args)
    assert first.returncode == 0, first.stderr[-4000:]
    unbroken = _rl_steps(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000002")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(x + "\n" for x in metrics.read_text().splitlines() if json.loads(x).get("step") != 2))
    resumed = _train(args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step_000001" in resumed.stderr
    again = _rl_steps(tmp_path)
    assert sorted(again) == [1, 2] and unbroken[2].keys() == again[2].keys()
    for k in unbroken[2]:
        assert again[2][k] == pytest.approx(unbroken[2][k], rel=1e-6, abs=1e-9, nan_ok=True), k
    # on one process (the single engine, DCP only) the ZeRO checkpoint is refused at start-up in one line
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mrpo.train", *args, "distributed.engine=deepspeed"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert one.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'checkpoints' / 'step_000002'} was written by DeepSpeed ZeRO on 2 processes: this run "
        f"(1 process, engine single) reads DCP checkpoints only; resume it with distributed.engine=deepspeed on 2 "
        f"processes")
