"""Worker for test_fsdp2_lora_two_ranks (torchrun, 2 gloo processes): apply LoRA, install the passthrough
head, shard with mrpo.models.parallelize.apply_fsdp2, run one fused-loss step on a different micro-batch per
rank and compare with an unsharded copy: gradients only on adapters and equal to the all-reduced mean of
the unsharded gradients; the optimizer step moves only adapters; disabled adapters give the base model;
the gathered adapter / merged state dicts equal the unsharded ones."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, os.path.dirname(__file__))
from test_lora import inputs, logprobs, lora_backbone, mrpo_loss  # noqa: E402

from mrpo.models.load import load_backbone  # noqa: E402
from mrpo.models.lora import adapter_state_dict, adapters_disabled, merged_state_dict  # noqa: E402
from mrpo.models.parallelize import apply_fsdp2, install_passthrough_head  # noqa: E402


def check(path: str, rank: int, world: int) -> None:
    bb, ref = lora_backbone(path, seed=0), lora_backbone(path, seed=0)   # same adapters on every rank
    model = bb.model
    install_passthrough_head(model)
    install_passthrough_head(ref.model)
    apply_fsdp2(model, torch.device("cpu"), torch.float32, torch.float32)
    batch, comps = inputs(bb)
    mine = [rank]                                                        # each rank its own sequence
    sub = bb.select_rows(batch, mine)
    comps = [comps[r] for r in mine]
    model.train(), ref.model.train()

    mrpo_loss(bb, sub, comps).backward()
    mrpo_loss(ref, sub, comps).backward()
    ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) == 28, sorted(grads)[:4]
    assert all(".lora_A." in n or ".lora_B." in n for n in grads)
    for n, g_ref in ref_grads.items():
        g_ref = g_ref.clone()
        dist.all_reduce(g_ref)
        g = grads[n].full_tensor()
        assert torch.allclose(g, g_ref / world, atol=1e-6, rtol=1e-5), (n, (g - g_ref / world).abs().max())

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = get_model_state_dict(model, options=opts)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    after = get_model_state_dict(model, options=opts)
    if rank == 0:
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:4]

    # reference log-probs under sharding: adapters off == a separately loaded base model
    base = load_backbone(path)
    with torch.no_grad():
        with adapters_disabled(model):
            lp_ref = logprobs(bb, sub, comps)
        lp_base = logprobs(base, sub, comps)
    assert torch.allclose(lp_ref, lp_base, atol=1e-6, rtol=0), (lp_ref - lp_base).abs().max()

    # export pieces from the gathered state: adapters only (ignore_frozen_params) and merged
    adapters = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
    if rank == 0:
        assert set(adapter_state_dict(model, adapters)) == set(adapter_state_dict(ref.model))
        merged = merged_state_dict(model, after)
        assert set(merged) == set(base.model.state_dict())


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in sys.argv[1:]:
        check(path, rank, world)
        print(f"rank {rank}: {path} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
