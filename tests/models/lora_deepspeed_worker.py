"""Worker for test_deepspeed_zero3_lora_two_ranks (torchrun, 2 gloo processes on CPU): LoRA applied, then the
policy wrapped in mrpo.engines.deepspeed.ZeROEngine (ZeRO-3, every parameter partitioned) with an
AdamW over the adapters only; one fused-loss micro-batch per rank through the trainer's path (engine
forward with the passthrough head, lm_head gathered until backward). Checks: gradients only on adapters
and equal to an unsharded run's averaged over ranks; the step moves only adapters; reference log-probs
through the engine with adapters disabled == a separately loaded base model; the consolidated state
dict gives the adapter and merged state dicts; save / load resumes the next step exactly.
Argv: scratch folder (shared by the ranks), then tiny model folders."""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_lora import inputs, lora_backbone  # noqa: E402

from mrpo.engines.deepspeed import ZeROEngine  # noqa: E402
from mrpo.models.load import load_backbone  # noqa: E402
from mrpo.models.lora import adapter_state_dict, adapters_disabled, merged_state_dict  # noqa: E402
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head  # noqa: E402
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs  # noqa: E402


def cfg_ns():
    return SimpleNamespace(
        optim=SimpleNamespace(per_device_batch_size=1, grad_accum_steps=1, max_grad_norm=1e9),
        distributed=SimpleNamespace(deepspeed_zero_stage=3, param_dtype="float32", reduce_dtype="float32"),
        model=SimpleNamespace(dtype="float32"))


def loss_of(hidden, weight, targets):
    n = targets.numel()
    return fused_linear_mrpo_loss(
        hidden, weight, targets, torch.full((n,), 0.8), torch.zeros(n, dtype=torch.long),
        torch.ones(n, dtype=torch.int32), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
        torch.tensor([0, n], dtype=torch.int32), backend="torch")[0]


def check(path: str, scratch: Path, rank: int, world: int) -> None:
    from deepspeed.utils import safe_get_full_grad

    bb, ref = lora_backbone(path, seed=0), lora_backbone(path, seed=0)
    for b in (bb, ref):
        install_passthrough_head(b.model)
        b.model.train()
    model = bb.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    zero = ZeROEngine(model, None, cfg_ns(), torch.device("cpu"), optimizer=opt,
                      overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    batch, comps = inputs(bb)
    sub, comps = bb.select_rows(batch, [rank]), [comps[rank]]

    def hidden(b, runner):
        with hidden_states_mode(b.model):
            return b.completion_hidden_states(sub, comps, model=runner)

    h, t, _ = hidden(bb, zero.runner(model))
    zero.backward(loss_of(h, zero.lm_head_weight(model), t))
    h, t, _ = hidden(ref, ref.model)
    loss_of(h, ref.model.get_output_embeddings().weight, t).backward()
    params = dict(model.named_parameters())
    ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    assert len(ref_grads) == 28 and all(".lora_" in n for n in ref_grads)
    for n, p in params.items():
        if n not in ref_grads:
            assert not p.requires_grad, n                        # frozen: outside the optimizer
            continue
        g = safe_get_full_grad(p)
        g_ref = ref_grads[n].clone()
        dist.all_reduce(g_ref)
        assert torch.allclose(g, g_ref / world, atol=1e-6, rtol=1e-5), (n, (g - g_ref / world).abs().max())

    before = zero.full_state_dict()
    zero.step()
    after = zero.full_state_dict()
    if rank == 0:
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:4]
        assert set(adapter_state_dict(model, after)) == set(adapter_state_dict(ref.model))
        assert set(merged_state_dict(model, after)) == set(load_backbone(path).model.state_dict())

    # resume: ZeROEngine.save after the first step, one more step -> weights A; load, the same step -> A again
    # (adapters and their AdamW moments restored; the frozen base is not optimizer state)
    def one_step():
        h, t, _ = hidden(bb, zero.runner(model))
        zero.backward(loss_of(h, zero.lm_head_weight(model), t))
        zero.step()
        return zero.full_state_dict()

    ckpt_dir = zero.save(scratch, 1, {"step": 1}, keep_last=1)
    unbroken = one_step()
    assert zero.load(ckpt_dir) == {"step": 1}
    resumed = one_step()
    if rank == 0:
        assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)
        assert any(not torch.equal(unbroken[k], after[k]) for k in unbroken)

    base = load_backbone(path)
    with torch.no_grad():
        with adapters_disabled(model):
            h, t, _ = hidden(bb, zero.runner(model))
            lp_ref = linear_logprobs(h, zero.lm_head_weight(model), t, backend="torch")
        hb, tb, _ = base.completion_hidden_states(sub, comps)
        lp_base = linear_logprobs(hb, base.lm_head_weight, tb, backend="torch")
    assert torch.allclose(lp_ref, lp_base, atol=1e-6, rtol=0), (lp_ref - lp_base).abs().max()
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    scratch = Path(sys.argv[1])
    for path in sys.argv[2:]:
        check(path, scratch / Path(path).name, rank, world)
        print(f"rank {rank}: {path} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
