"""LoRA (mrpo.models.lora) on the tiny backbones: only adapters train through the fused loss, disabled
adapters give the base model (the KL reference), peft / merged exports reproduce the adapted model,
gradient checkpointing and an adapter + optimizer checkpoint round trip change nothing, FSDP2 on 2 ranks."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mrpo.data.synthetic import make_example
from mrpo.models.load import load_backbone
from mrpo.models.lora import (LoraError, adapter_state_dict, adapters_disabled, apply_lora, assert_adapters_loaded,
                              checkpoint_state_dict_options, is_lora_model, load_adapter_merged, merged_state_dict,
                              save_adapter, trainable_parameter_summary)
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head
from mrpo.models.tiny import FAMILIES, build_tiny
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_lora")


def tiny_path(tiny_root, family="qwen2_5_vl"):
    return build_tiny(family, tiny_root / family, seed=0)


def perturb_lora_b(model, seed=1, scale=0.5):
    """lora_B starts at zero (adapted == base); give it random values so the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lora_backbone(path, seed=0, perturb=True, **kw):
    bb = load_backbone(path)
    apply_lora(bb.model, rank=4, alpha=8, seed=seed, **kw)
    if perturb:
        perturb_lora_b(bb.model)
    return bb


def inputs(bb):
    img = make_example(0, "train", 0, image_size=56)[1]
    batch = bb.encode_prompts(["Is there a lesion?", "How many lesions are there in the image?"], [img, img])
    g = torch.Generator().manual_seed(3)
    allowed = torch.tensor([t for t in range(len(bb.tokenizer))
                            if t not in bb.suppress_token_ids and t not in bb.eos_token_ids])
    comps = [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in (5, 8)]
    return batch, comps


def logprobs(bb, batch, comps, model=None):
    """Per-token log-probs [N] through the trainer's path: passthrough head, root forward, linear_logprobs."""
    model = bb.model if model is None else model
    install_passthrough_head(model)
    with hidden_states_mode(model):
        hidden, targets, _ = bb.completion_hidden_states(batch, comps, model=model)
    return linear_logprobs(hidden, model.get_output_embeddings().weight, targets, backend="torch")


def mrpo_loss(bb, batch, comps, model=None):
    """The fused MRPO loss of the trainer's forward_backward (shaping on, every token in step 0)."""
    model = bb.model if model is None else model
    install_passthrough_head(model)
    with hidden_states_mode(model):
        hidden, targets, cu = bb.completion_hidden_states(batch, comps, model=model)
    weight = model.get_output_embeddings().weight            # read after the forward, as the trainer does
    lengths = torch.tensor([len(c) for c in comps])
    n = int(lengths.sum())
    adv = torch.tensor([1.0, -0.7] * len(comps))[:len(comps)].repeat_interleave(lengths)
    correct = torch.tensor([True, False] * len(comps))[:len(comps)].repeat_interleave(lengths)
    loss, _ = fused_linear_mrpo_loss(
        hidden, weight, targets, adv, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.int32),
        torch.ones(n, dtype=torch.bool), correct, cu, backend="torch")
    return loss


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_change_in_a_step(tiny_root, family):
    bb = lora_backbone(tiny_path(tiny_root, family))
    model = bb.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # exactly lora_A / lora_B of the 7 projections of each decoder layer: no vision tower, no lm_head
    assert trainable and all(".language_model.layers." in n and (".lora_A." in n or ".lora_B." in n)
                             for n in trainable)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert len(trainable) == 2 * len(TARGETS) * n_layers
    assert not any("visual" in n or "vision" in n for n in trainable)
    summary = trainable_parameter_summary(model)
    assert 0 < summary["trainable"] < summary["total"] / 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch, comps = inputs(bb)
    model.train()
    mrpo_loss(bb, batch, comps).backward()
    grads = adapter_grads(model)
    assert set(grads) == trainable and all(g.abs().sum() > 0 for g in grads.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapters_equal_the_base_model(tiny_root, family):
    """Reference log-probs via disabled adapters == a separately loaded base copy (the trainer's
    _load_reference), in train mode with adapter dropout on; enabled adapters differ."""
    path = tiny_path(tiny_root, family)
    bb = lora_backbone(path, dropout=0.1)
    base = load_backbone(path)
    base.model.requires_grad_(False).eval()
    batch, comps = inputs(bb)
    bb.model.train()
    flags = {n: p.requires_grad for n, p in bb.model.named_parameters()}
    with torch.no_grad():
        with adapters_disabled(bb.model):
            ref = logprobs(bb, batch, comps)
        expected = logprobs(base, batch, comps)
        bb.model.eval()
        policy = logprobs(bb, batch, comps)
    assert torch.allclose(ref, expected, atol=1e-6, rtol=0), (ref - expected).abs().max()
    assert (policy - expected).abs().max() > 1e-2           # the adapters do change the policy
    assert flags == {n: p.requires_grad for n, p in bb.model.named_parameters()}   # restored exactly
    with torch.no_grad():                                     # adapters are back on after the block
        assert torch.allclose(logprobs(bb, batch, comps), policy, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="no LoRA adapters"):
        with adapters_disabled(base.model):
            pass


def test_fresh_adapters_equal_the_base_model(tiny_root):
    """lora_B = 0 at init: the adapted policy starts exactly at the base (the KL starts at 0)."""
    path = tiny_path(tiny_root)
    bb, base = lora_backbone(path, perturb=False), load_backbone(path)
    batch, comps = inputs(bb)
    with torch.no_grad():
        assert torch.allclose(logprobs(bb, batch, comps), logprobs(base, batch, comps), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_equals_the_adapted_model(tiny_root, tmp_path, family):
    from transformers import AutoModelForImageTextToText

    path = tiny_path(tiny_root, family)
    bb = lora_backbone(path)
    install_passthrough_head(bb.model)                        # the trainer's model: export must not care
    batch, comps = inputs(bb)
    bb.model.eval()
    with torch.no_grad():
        want = logprobs(bb, batch, comps)
        merged = merged_state_dict(bb.model)
    plain_keys = set(load_backbone(path).model.state_dict())
    assert set(merged) == plain_keys
    out = bb.save(tmp_path / "merged", state_dict=merged)
    assert not (out / "adapter_config.json").exists()
    got_bb = load_backbone(out)
    assert not is_lora_model(got_bb.model)
    with torch.no_grad():
        got = logprobs(got_bb, batch, comps)
        base = logprobs(load_backbone(path), batch, comps)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (base - want).abs().max() > 1e-2
    AutoModelForImageTextToText.from_pretrained(out)         # an ordinary Hugging Face folder


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_with_peft(tiny_root, tmp_path, family):
    from peft import PeftModel

    path = tiny_path(tiny_root, family)
    bb = lora_backbone(path)
    install_passthrough_head(bb.model)
    batch, comps = inputs(bb)
    bb.model.eval()
    with torch.no_grad():
        want = logprobs(bb, batch, comps)
    folder = save_adapter(bb.model, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    sd = adapter_state_dict(bb.model)
    assert len(sd) == 2 * len(TARGETS) * 2 and all(".default." not in k for k in sd)

    fresh = load_backbone(path)
    peft_model = PeftModel.from_pretrained(fresh.model, str(folder))
    with torch.no_grad():
        got = logprobs(fresh, batch, comps, model=peft_model.base_model.model)
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    # the vision tower's own gate/up/down_proj were not adapted when loaded either
    assert not any(".lora_" in n and ("visual" in n or "vision" in n) for n, _ in peft_model.named_parameters())

    merged = load_backbone(path)                             # mrpo.infer --adapter: load + merge
    merged.model = load_adapter_merged(merged.model, folder)
    assert not is_lora_model(merged.model)
    with torch.no_grad():
        got = logprobs(merged, batch, comps)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()

    # an adapter whose weights match no module (here: saved without peft's key prefix) must not load
    # silently as the base model
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    w = load_file(broken / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model."): v for k, v in w.items()}, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{len(w)} of {len(w)} adapter weights not loaded"):
        load_adapter_merged(load_backbone(path).model, broken)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_root):
    path = tiny_path(tiny_root)
    grads = []
    for ckpt in (False, True):
        bb = lora_backbone(path, seed=0)
        if ckpt:
            bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert bb.model.model.language_model.gradient_checkpointing
        bb.model.train()
        batch, comps = inputs(bb)
        mrpo_loss(bb, batch, comps).backward()
        grads.append(adapter_grads(bb.model))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6, rtol=1e-5), n


def test_adapter_and_optimizer_checkpoint_resume_exactly(tiny_root, tmp_path):
    """The checkpoint integration (mrpo.checkpoint with StateDictOptions(ignore_frozen_params=True)):
    save adapter + AdamW state after step 1, restore into a fresh model with different adapter init,
    and step 2 matches the unbroken run bit for bit; the frozen base is not in the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = tiny_path(tiny_root)
    opts = checkpoint_state_dict_options()

    def setup(seed):
        bb = lora_backbone(path, seed=seed, perturb=False)
        bb.model.train()
        opt = torch.optim.AdamW([p for p in bb.model.parameters() if p.requires_grad], lr=1e-2)
        return bb, opt

    def step(bb, opt):
        batch, comps = inputs(bb)
        mrpo_loss(bb, batch, comps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bb, opt = setup(seed=0)
    step(bb, opt)
    model_sd, optim_sd = get_state_dict(bb.model, opt, options=opts)
    assert model_sd and all(".lora_A." in k or ".lora_B." in k for k in model_sd)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    step(bb, opt)
    unbroken = {k: v.detach().clone() for k, v in adapter_state_dict(bb.model).items()}

    bb2, opt2 = setup(seed=7)                                 # a different init: the load must overwrite it
    model_sd, optim_sd = get_state_dict(bb2.model, opt2, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    result = set_state_dict(bb2.model, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=opts)
    assert_adapters_loaded(bb2.model, result)
    with pytest.raises(RuntimeError, match="no value for 2 adapter weights"):
        partial = {k: v for k, v in state["model"].items() if "layers.1.mlp.down_proj" not in k}
        assert_adapters_loaded(bb2.model, bb2.model.load_state_dict(partial, strict=False))
    step(bb2, opt2)
    resumed = adapter_state_dict(bb2.model)
    assert unbroken.keys() == resumed.keys()
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)
    ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    adapter_bytes = sum(v.numel() * 4 for v in unbroken.values())
    base_bytes = sum(p.numel() * 4 for p in bb.model.parameters() if not p.requires_grad)
    # adapters + 2 Adam moments (+ DCP metadata), never the frozen base weights
    assert 3 * adapter_bytes <= ckpt_bytes < 3 * adapter_bytes + base_bytes / 4


def test_errors_name_the_key(tiny_root):
    from mrpo.config import ConfigError, load_config

    bb = load_backbone(tiny_path(tiny_root))
    with pytest.raises(LoraError, match="lora.target_modules.*lm_head"):
        apply_lora(bb.model, rank=4, target_modules=("q_proj", "lm_head"))
    with pytest.raises(LoraError, match=r"lora.target_modules: \['qkv'\] match no module.*q_proj"):
        apply_lora(bb.model, rank=4, target_modules=("q_proj", "qkv"))   # qkv exists only in the vision tower
    with pytest.raises(LoraError, match="lora.rank"):
        apply_lora(bb.model, rank=0)
    assert not is_lora_model(bb.model)
    apply_lora(bb.model, rank=2)
    with pytest.raises(LoraError, match="already"):
        apply_lora(bb.model, rank=2)
    for override, key in (("lora.rank=-1", "lora.rank"), ("lora.dropout=1.0", "lora.dropout"),
                          ("lora.alpha=0", "lora.alpha"), ("lora.target_modules=[]", "lora.target_modules"),
                          ("lora.target_modules=[lm_head]", "lora.target_modules"),
                          ("lora.merge_on_export=true", "lora.merge_on_export")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])
    cfg = load_config(None, ["lora.rank=8", "lora.alpha=16"])
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 16.0 and cfg.lora.target_modules == list(TARGETS)


def test_shipped_lora_config_loads():
    from mrpo.config import REPO_ROOT, load_config

    cfg = load_config(REPO_ROOT / "configs" / "qwen2_5_vl_7b_mrpo_lora.yaml")
    assert cfg.lora.rank == 64 and cfg.lora.alpha == 128 and cfg.loss.beta > 0 and cfg.lora.merge_on_export


def _torchrun(worker: str, *args: str):
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name(worker)), *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_deepspeed_zero3_lora_two_ranks(tiny_root, tmp_path):
    """LoRA, then ZeROEngine (ZeRO-3) on 2 gloo ranks: adapter-only gradients equal to an unsharded run,
    only adapters move, save / load resumes exactly, disabled adapters through the engine == the base
    model, export state dicts."""
    pytest.importorskip("deepspeed")
    proc = _torchrun("lora_deepspeed_worker.py", str(tmp_path / "scratch"), str(tiny_path(tiny_root)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2


@pytest.mark.slow
def test_fsdp2_lora_two_ranks(tiny_root):
    """LoRA, then FSDP2 (apply_fsdp2) on 2 gloo ranks: one step through the fused loss; gradients only
    on adapters and equal to an unsharded run; disabled adapters give the base model under sharding."""
    proc = _torchrun("lora_fsdp_worker.py", str(tiny_path(tiny_root)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2


def test_infer_with_adapter_equals_the_merged_export(tiny_root, tmp_path, capsys):
    """python -m mrpo.infer --model BASE --adapter DIR generates what the merged export generates (greedy),
    and not what the base model alone generates."""
    from mrpo.data.synthetic import generate_synthetic
    from mrpo.infer import main

    path = tiny_path(tiny_root)
    bb = lora_backbone(path)
    adapter = save_adapter(bb.model, tmp_path / "adapter")
    merged = bb.save(tmp_path / "merged", state_dict=merged_state_dict(bb.model))
    _, data = generate_synthetic(tmp_path / "data", n_train=0, n_test=3)

    def texts(*model_args):
        out = tmp_path / f"pred{len(list(tmp_path.glob('pred*')))}.jsonl"
        args = ["--data", str(data), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "8",
                "--no-progress", "--device", "cpu", *model_args]
        assert main(args) == 0
        return [json.loads(x)["text"] for x in out.read_text().splitlines()]

    with_adapter = texts("--model", str(path), "--adapter", str(adapter))
    assert "merged LoRA adapter" in capsys.readouterr().err
    assert with_adapter == texts("--model", str(merged))
    assert with_adapter != texts("--model", str(path))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        main(["--model", str(path), "--adapter", str(tmp_path), "--data", str(data), "--out",
              str(tmp_path / "x.jsonl"), "--no-progress", "--device", "cpu"])
