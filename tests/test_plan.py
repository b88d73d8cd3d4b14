"""mrpo.plan: exact parameter counts of the recipe backbones from their shipped config.json, the CLI and its
JSON, the trainer's refusal to start, and the plan against peaks measured on CPU for every phase of a real
RL step (tiny model and a scaled-down Qwen2.5-VL with the real 151936-token vocabulary), within 15%."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mrpo.config import REPO_ROOT, load_config
from mrpo.plan import GiB, PHASES, PlanDoesNotFit, check_at_startup, main, plan_for
from mrpo.plan import first_step_vs_plan
from mrpo.plan_measure import LiveBytes, tensor_bytes

PUBLISHED = {"configs/qwen2_5_vl_7b_mrpo.yaml": 8.29e9, "configs/qwen3_vl_8b_mrpo.yaml": 8.77e9,
             "configs/internvl3_8b_mrpo.yaml": 7.94e9}


@pytest.mark.parametrize("config", sorted(PUBLISHED))
def test_recipe_backbones_plan_without_weights(config):
    """model.path (/models/...) does not exist: the shipped config.json is used, and the meta-device count
    matches the published size."""
    cfg = load_config(REPO_ROOT / config)
    plan = plan_for(cfg, 4, 80.0, knobs=False)
    assert "configs/backbones/" in plan.shape.source and "not found" in plan.shape.source
    assert plan.shape.params_total == pytest.approx(PUBLISHED[config], rel=0.005)
    # FSDP2 over 4 GPUs: a quarter of the parameters per GPU, trainable ones as fp32 master weights, frozen
    # ones in bf16; the rollout gathers the whole model in bf16
    terms = plan.phases["rollout"].terms
    trainable = terms["parameters (trainable float32 master weights, 1/4 FSDP2 shard)"] * 4 // 4
    frozen = terms.get("parameters (frozen, bfloat16, 1/4 FSDP2 shard)", 0) * 4 // 2
    assert trainable + frozen == pytest.approx(plan.shape.params_total, abs=8)
    assert terms["AdamW exp_avg + exp_avg_sq (float32, float32 master weights)"] == 2 * trainable * 4 // 4
    assert terms["parameters gathered for generation (2-byte, whole model)"] == plan.shape.params_total * 2


def test_cli_json_and_knobs(tmp_path, capsys):
    out = tmp_path / "plan.json"
    config = str(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")
    assert main(["--config", config, "--gpus", "1", "--gpu-mem-gib", "80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "knobs that make it fit" in text
    data = json.loads(out.read_text())
    assert data["fits"] is False and data["params_total"] > 8e9
    assert set(data["phases"]) == set(PHASES)
    assert data["peak_gib"] == max(p["peak_gib"] for p in data["phases"].values())
    for p in data["phases"].values():
        assert p["peak_gib"] == pytest.approx(sum(p["terms_gib"].values()), abs=0.02)
    fitting = [k for k in data["knobs"] if k["fits"]]
    assert fitting and all(k["peak_gib"] <= 80 for k in fitting)
    # LoRA: no reference copy, adapters only carry optimizer state
    cfg = load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo_lora.yaml")
    lora = plan_for(cfg, 1, 80.0, knobs=False)
    assert not any("reference" in k for k in lora.phases["train"].terms)
    assert 100e6 < lora.to_json()["params_lora"] < 250e6


def _one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.out[-2000:] + captured.err[-2000:]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error: ", "config error: ")), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


@pytest.mark.parametrize("mem", ["nan", "inf", "-inf", "0"])
def test_cli_gpu_mem_must_be_finite(capsys, mem):
    line = _one_line_error(capsys, main([f"--gpu-mem-gib={mem}"]))
    assert "--gpu-mem-gib a finite number > 0" in line


def test_cli_unwritable_json_path(tmp_path, capsys):
    config = str(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")
    missing = tmp_path / "no" / "such" / "plan.json"
    line = _one_line_error(capsys, main(["--config", config, "--json", str(missing)]))
    assert f"--json {missing}: folder {missing.parent} does not exist" in line
    line = _one_line_error(capsys, main(["--config", config, "--json", str(tmp_path)]))
    assert f"--json {tmp_path}: is a folder" in line
    # a folder this process may not write into: /sys (root too), or a read-only folder for other users
    locked = Path("/sys") if os.geteuid() == 0 else tmp_path / "ro"
    if locked != Path("/sys"):
        locked.mkdir()
        locked.chmod(0o500)
    line = _one_line_error(capsys, main(["--config", config, "--json", str(locked / "plan.json")]))
    assert f"--json {locked / 'plan.json'}: cannot write (Permission denied)" in line
    # a writable path that did not exist is not left behind by the check, and is written after planning
    out = tmp_path / "plan.json"
    assert main(["--config", config, "--json", str(out)]) == 0 and json.loads(out.read_text())["gpus"] == 1


def _model_folder(tmp_path, name: str, text: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(text)
    return str(folder)


def test_cli_invalid_or_non_vl_config_json(tmp_path, capsys):
    config = str(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")
    bad = _model_folder(tmp_path, "bad", "{not json")
    line = _one_line_error(capsys, main(["--config", config, f"model.path={bad}"]))
    assert f"model.path={bad}: config.json cannot be read as a transformers config" in line
    typeless = _model_folder(tmp_path, "typeless", "{}")
    line = _one_line_error(capsys, main(["--config", config, f"model.path={typeless}"]))
    assert f"model.path={typeless}: config.json cannot be read" in line
    llama = _model_folder(tmp_path, "llama", json.dumps({"model_type": "llama", "hidden_size": 64}))
    line = _one_line_error(capsys, main(["--config", config, f"model.path={llama}"]))
    assert "model_type 'llama', not a supported vision-language model" in line
    qwen3 = _model_folder(tmp_path, "qwen3", (REPO_ROOT / "configs" / "backbones" / "qwen3_vl_8b"
                                              / "config.json").read_text())
    line = _one_line_error(capsys, main(["--config", config, f"model.path={qwen3}"]))
    assert "is a qwen3_vl model" in line and "set model.family=qwen3_vl" in line
    line = _one_line_error(capsys, main(["--config", config, "optim.lr=abc"]))   # a config key: as before
    assert line.startswith("config error: ") and "optim.lr" in line


def test_cli_check_exit_code(tmp_path, capsys):
    """--check: 3 when the plan does not fit (for scripts), 0 when it fits; without --check always 0."""
    config = str(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")
    assert main(["--config", config, "--gpus", "1", "--check"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["--config", config, "--gpus", "1"]) == 0
    assert main(["--config", config, "--gpus", "8", "--check"]) == 0
    assert "fits: peak" in capsys.readouterr().out


def test_engine_state_terms():
    """The persistent and gradient terms follow what each engine keeps (sizes from the meta-device count)."""
    from mrpo.plan import make_plan, model_shape, resolve_model_config

    cfg = load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")
    shape = model_shape(cfg, *resolve_model_config(cfg))
    n = shape.params_total
    fsdp = make_plan(cfg, 4, 80.0, shape)
    train = fsdp.phases["train"].terms
    assert train["parameters (trainable float32 master weights, 1/4 FSDP2 shard)"] == n * 4 // 4
    assert train["AdamW exp_avg + exp_avg_sq (float32, float32 master weights)"] == 2 * n * 4 // 4
    # one process: bf16 weights, fp32 masters, fp32 moments and fp32 accumulated gradients (engines/master.py)
    single = make_plan(cfg, 1, 80.0, shape).phases["train"].terms
    assert single["parameters (bfloat16, whole)"] == n * 2
    assert single["float32 master weights (trainable)"] == n * 4
    assert single["AdamW exp_avg + exp_avg_sq (float32, float32 master weights)"] == 2 * n * 4
    assert single["gradients (float32, accumulated over micro-batches)"] == n * 4
    fp32 = make_plan(load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml", ["model.dtype=float32"]),
                     1, 80.0, shape).phases["train"].terms   # fp32 weights are their own masters
    assert not any("master weights (trainable)" in k for k in fp32)
    assert fp32["AdamW exp_avg + exp_avg_sq (float32, no fp32 master)"] == 2 * n * 4
    assert train["reference model (frozen copy, sharded like the policy)"] == n * 2 // 4
    # no-sync accumulation over the 8 micro-batches: every gradient unsharded, in reduce_dtype float32
    assert train["gradients accumulated unsharded over 8 micro-batches"] == n * 4
    ds = make_plan(load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml", ["distributed.engine=deepspeed"]),
                   4, 80.0, shape)
    assert ds.phases["train"].terms["optimizer: fp32 master + AdamW moments + fp32 gradient partition"] == 16 * n // 4
    lora_cfg = load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml", ["lora.rank=64"])
    lora = make_plan(lora_cfg, 4, 80.0, shape).phases["train"].terms
    adapters = shape.lora_in_out * 64
    assert lora["AdamW exp_avg + exp_avg_sq (float32 adapters, no fp32 master)"] == 2 * adapters * 4 // 4
    assert not any("reference" in k for k in lora)
    # KV cache: 2 x 28 layers x 4 KV heads x 128 x bf16 x 16 rows x (1024 + 512) tokens; the decode loop
    # (default) adds its bf16 key mask per row and token and prefills the 2 distinct prompts, not 16 rows
    rollout = fsdp.phases["rollout"].terms
    kv = 2 * 28 * 4 * 128 * 2
    assert rollout["KV cache (one preallocated, 16 rows x 1536 tokens)"] == (kv + 2) * 16 * 1536
    assert rollout["prefill K/V of the 2 distinct prompts (until copied into their rows)"] == kv * 2 * 1024
    assert "prefill (2 x 1024 prompt tokens, 2 images), beyond the decode buffers" in rollout
    hf = make_plan(load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml", ["rollout.decode=hf"]), 4, 80.0, shape)
    assert hf.phases["rollout"].terms["KV cache (dynamic, 16 rows x 1536 tokens)"] == kv * 16 * 1536
    assert "vision tower, no grad (16 images x" in " ".join(hf.phases["rollout"].terms)
    # gradient checkpointing keeps ~1/30 of the activations at these widths (with LoRA, whose optimizer step is
    # small, so the train peak is the backward's and the activation terms are listed)
    no_ckpt = make_plan(load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml",
                                    ["lora.rank=64", "model.gradient_checkpointing=false"]), 4, 80.0, shape)
    with_ckpt = make_plan(lora_cfg, 4, 80.0, shape)
    act = lambda p, w: p.phases["train"].terms[f"activations (3072 tokens, {w} gradient checkpointing)"]  # noqa: E731
    assert act(no_ckpt, "without") > 10 * act(with_ckpt, "with")
    # full fine-tuning under FSDP2: the AdamW step's fp32 temporaries outweigh the checkpointed activations
    assert "AdamW step temporaries (foreach)" in train


def test_refuses_to_start_on_cuda_when_it_does_not_fit(monkeypatch):
    cfg = load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo.yaml")

    class Props:
        total_memory = 24 * GiB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    with pytest.raises(PlanDoesNotFit, match="phase needs .* GiB per GPU.*knobs"):
        check_at_startup(cfg, cfg.model.path, 1, torch.device("cuda:0"), True, log=lambda *_: None)
    cfg.plan.enforce = False
    assert check_at_startup(cfg, cfg.model.path, 1, torch.device("cuda:0"), True, log=lambda *_: None) is not None


def test_live_bytes_counts_saved_activations():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(128, 64)
    with LiveBytes() as live:
        y = lin(x)
        # saved for backward: GELU's input and the second Linear's input ([128, 256] fp32 each), plus y
        assert live.live == 2 * 128 * 256 * 4 + 128 * 64 * 4
        y.sum().backward()
        del y
        assert live.live == tensor_bytes(*[p.grad for p in lin.parameters()])


# ----------------------------------------------------------------------------- planned vs measured on CPU


def _one_step(tmp_path, overrides: list[str], model_path=None):
    """Run one RL step of the real Trainer on CPU with per-phase LiveBytes peaks; returns (plan, peaks)."""
    from mrpo.trainer import Trainer

    base = [f"output_dir={tmp_path / 'run'}", f"data.synthetic_dir={tmp_path / 'data' / 'synthetic'}",
            "data.synthetic_train=32", "data.synthetic_test=4", "sft.steps=0", "optim.max_steps=1",
            "logging.eval_at_end=false", "logging.eval_at_start=false", "logging.eval_every=0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.every_steps=0",
            "checkpoint.export_final=false", "data.max_pixels=3136", "loss.packing=false",
            "rollout.max_new_tokens=24", "optim.per_device_batch_size=4", "optim.grad_accum_steps=2",
            "rollout.group_size=4", "distributed.engine=none"]
    if model_path is not None:
        base.append(f"model.path={model_path}")
    cfg = load_config(REPO_ROOT / "configs" / "tiny_cpu.yaml", base + overrides)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    try:
        return first_step_vs_plan(trainer)
    finally:
        trainer.close()


CASES = {
    # the tiny offline model (hidden 128, vocab ~2k); reference model and old log-probs on
    "tiny": (["loss.beta=0.04", "algo.num_iterations=2"], None),
    # the GPU benchmark's Qwen2.5-VL at toy widths with the real 151936-token vocabulary, gradient checkpointing
    "scaled_down": (["loss.beta=0.04", "model.gradient_checkpointing=true"], "gpu_model"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_measured_peaks_on_cpu(tmp_path, case, capsys):
    overrides, model = CASES[case]
    path = None
    if model == "gpu_model":
        import importlib.util
        import sys
        from pathlib import Path

        spec = importlib.util.spec_from_file_location(
            "gpu_models", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_models.py")
        gpu_models = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("gpu_models", gpu_models)
        spec.loader.exec_module(gpu_models)
        path = gpu_models.make_qwen2_5_vl_1b(tmp_path / "model", size="tiny", dtype=torch.float32, device="cpu")["path"]
    plan, peaks = _one_step(tmp_path, overrides, path)
    rows = []
    for name in PHASES:
        planned, measured = plan.measurable_peak(name, first_step=True), peaks[name]
        rows.append(f"{case} {name}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
                    f"error {(planned - measured) / measured:+.1%}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    for name in PHASES:
        assert plan.measurable_peak(name, first_step=True) == pytest.approx(peaks[name], rel=0.15), rows


@pytest.mark.slow
def test_plan_matches_measured_peaks_fsdp2_two_ranks(tmp_path):
    """FSDP2 on 2 CPU ranks (gloo): sharded state, the whole model gathered for generation, the unsharded
    working set and no-sync gradient accumulation, against LiveBytes peaks (DTensor shards counted)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "result.json"
    worker = Path(__file__).parent / "trainer" / "plan_fsdp_worker.py"   # a script in tests/ sees tests/kernels/ first
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(worker), str(out), str(tmp_path)], check=True, timeout=600,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    for name in PHASES:
        planned, measured = result[name]
        print(f"fsdp2 x2 {name}: planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
              f"error {(planned - measured) / measured:+.1%}")
        assert planned == pytest.approx(measured, rel=0.15), name
