"""Worker for test_deepspeed.py::test_zero3_gradients_step_checkpoint (torchrun, 2 gloo processes on CPU).

The policy is wrapped in mrpo.engines.deepspeed.ZeROEngine (ZeRO-3, every parameter partitioned:
stage3_param_persistence_threshold=0); an unsharded copy of the same model is the reference. Checks,
for each model folder:
  1. parameters really are partitioned (empty local tensors outside forward);
  2. generate with synced_gpus under ZeRO-3 (ranks stop at different lengths), and the same tokens with
     the weights gathered once for generation (generation(); later checks run after it);
  3. no-grad log-probs through the engine and the gathered lm_head copy == the reference's;
  4. two accumulated micro-batches of the fused MRPO loss (each scaled by 1/2, through the trainer's
     path: engine forward, lm_head gathered until backward): the full gradients of lm_head.weight, a
     decoder-layer weight, the token embedding and a vision weight == the reference's, averaged over ranks;
  5. step(): grad norm and updated weights == torch clip_grad_norm_ + AdamW on the averaged reference grads;
  6. save / load: a step after load() gives the same weights as the same step before it (weights and
     Adam moments restored), and load() returns the trainer state;
  7. a NaN loss: step() reports (non-finite norm, not applied) and the weights stay untouched;
  8. full_state_dict() on rank 0: the reference's keys, the gathered weights' values;
  9. a ZeRO-3 reference engine (frozen, no optimizer) gives the same no-grad log-probs.
Argv: scratch folder (shared by the ranks), then tiny model folders (e.g. one with a tied lm_head:
the loss's and the embedding's gradient contributions meet in one partitioned parameter).
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mrpo.data.synthetic import make_example
from mrpo.engines.deepspeed import ZeROEngine
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs

# small max norm: clipping is active; Adam's eps well above the tiny clipped gradients keeps the first
# update (about lr * g / (|g| + eps)) well conditioned, so the weights compare tightly
MAX_NORM, LR, EPS = 0.05, 1e-2, 1e-4
NAMES = ("lm_head.weight", "model.language_model.layers.0.mlp.up_proj.weight",
         "model.language_model.embed_tokens.weight", "model.visual.blocks.0.mlp.up_proj.weight")


def cfg_ns():
    return SimpleNamespace(
        optim=SimpleNamespace(per_device_batch_size=1, grad_accum_steps=2, max_grad_norm=MAX_NORM),
        distributed=SimpleNamespace(deepspeed_zero_stage=3, param_dtype="float32", reduce_dtype="float32"),
        model=SimpleNamespace(dtype="float32"))


def loss_of(hidden, weight, targets, seed):
    """Fused MRPO loss (shaping on, 3 steps, some invalid) with advantages drawn from `seed`."""
    n = targets.numel()
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(1, generator=g).expand(n).contiguous()
    step_index = (torch.arange(n, dtype=torch.int32) * 3 // max(n, 1)).to(torch.int32)
    valid = torch.rand(n, generator=g) > 0.4
    return fused_linear_mrpo_loss(
        hidden, weight, targets, adv, step_index, torch.full((n,), 3, dtype=torch.int32), valid,
        torch.zeros(n, dtype=torch.bool), torch.tensor([0, n], dtype=torch.int32), loss_agg="token-mean",
        shaping="mrpo")[0]


def gathered(model, names):
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters([params[n] for n in names]):
        return {n: params[n].detach().clone() for n in names}


def check(path: str, scratch: Path, rank: int, world: int) -> bool:
    from deepspeed.utils import safe_get_full_grad

    bb, ref, ref_zero = load_backbone(path), load_backbone(path), load_backbone(path)
    for b in (bb, ref, ref_zero):
        install_passthrough_head(b.model)
    ref_zero.model.requires_grad_(False).eval()
    model, rmodel = bb.model, ref.model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    ropt = torch.optim.AdamW(rmodel.parameters(), lr=LR, eps=EPS)
    zero = ZeROEngine(model, ref_zero.model, cfg_ns(), torch.device("cpu"), optimizer=opt,
                      overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    params = dict(model.named_parameters())
    rparams = dict(rmodel.named_parameters())
    names = [n for n in NAMES if n in params]   # a tied lm_head is listed once, as the token embedding
    head = model.get_output_embeddings().weight

    # 1. partitioned
    for n in names:
        assert params[n].numel() == 0 and params[n].ds_numel == rparams[n].numel(), n

    # 2. generate under ZeRO-3, different lengths per rank
    problems = ["Is there a lesion?", "How many lesions are there in the image?"]
    batches, comps = [], []
    for mb in range(2):
        batch = bb.encode_prompts([problems[(rank + mb) % 2]], [make_example(mb, "train", rank, 56)[1]])
        torch.manual_seed(10 * rank + mb)
        c = bb.generate(batch, max_new_tokens=4 + 4 * rank + 2 * mb, synced_gpus=True)
        assert 1 <= len(c[0]) <= 4 + 4 * rank + 2 * mb
        batches.append(batch)
        comps.append(c)

    def run(b, model_, runner, batch, comp):
        with hidden_states_mode(model_):
            return b.completion_hidden_states(batch, comp, model=runner)

    # 2b. generation with the weights gathered once (hooks removed, then restored): same tokens
    torch.manual_seed(5 + rank)
    hooked = bb.generate(batches[1], max_new_tokens=6 + 2 * rank, synced_gpus=True)
    with zero.generation():
        assert head.numel() == head.ds_numel
        torch.manual_seed(5 + rank)
        assert bb.generate(batches[1], max_new_tokens=6 + 2 * rank, synced_gpus=True) == hooked
    assert head.numel() == 0

    # 3. no-grad log-probs (old log-probs path)
    with torch.no_grad():
        h, t, _ = run(bb, model, zero.runner(model), batches[0], comps[0])
        lp = linear_logprobs(h, zero.lm_head_weight(model), t)
        h2, t2, _ = run(ref, rmodel, rmodel, batches[0], comps[0])
        lp_ref = linear_logprobs(h2, rmodel.get_output_embeddings().weight, t2)
        assert torch.allclose(lp, lp_ref, atol=1e-5), (lp - lp_ref).abs().max()
        assert head.numel() == 0      # the copy released the gathered weight
        # 9. the ZeRO-3 reference engine
        h3, t3, _ = run(ref_zero, ref_zero.model, zero.runner(ref_zero.model), batches[0], comps[0])
        lp3 = linear_logprobs(h3, zero.lm_head_weight(ref_zero.model), t3)
        assert torch.allclose(lp3, lp_ref, atol=1e-5), (lp3 - lp_ref).abs().max()
    assert zero.runner(ref_zero.model) is zero.ref_engine and zero.runner(model) is zero.engine

    # 4. accumulated gradients of two micro-batches
    def accumulate(seed0):
        for mb in range(2):
            h, t, _ = run(bb, model, zero.runner(model), batches[mb], comps[mb])
            zero.backward(loss_of(h, zero.lm_head_weight(model), t, seed0 + mb) * 0.5)

    def ref_accumulate(seed0):
        ropt.zero_grad(set_to_none=True)
        for mb in range(2):
            h, t, _ = run(ref, rmodel, rmodel, batches[mb], comps[mb])
            (loss_of(h, rmodel.get_output_embeddings().weight, t, seed0 + mb) * 0.5).backward()
        for p in rmodel.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    accumulate(100 * rank)
    ref_accumulate(100 * rank)
    for n in names:
        g = safe_get_full_grad(params[n])
        assert g is not None and torch.allclose(g, rparams[n].grad, atol=1e-6), (n, (g - rparams[n].grad).abs().max())
        assert g.abs().sum() > 0, n

    # 5. step: norm, clipping and AdamW
    norm, applied = zero.step()
    ref_norm = torch.nn.utils.clip_grad_norm_(rmodel.parameters(), MAX_NORM)
    assert applied and abs(norm - float(ref_norm)) < 1e-5 * max(1.0, norm), (norm, float(ref_norm))
    assert norm > MAX_NORM
    ropt.step()
    after = gathered(model, list(rparams))
    for n, p in rparams.items():
        assert torch.allclose(after[n], p, atol=1e-6), (n, (after[n] - p).abs().max())

    # 6. checkpoint: a step after load() == the same step before it
    state = {"step": 1, "marker": "abc"}
    ckpt_dir = zero.save(scratch / "checkpoints", 1, state, keep_last=1)
    assert (ckpt_dir / "COMPLETE").exists() and (ckpt_dir / "trainer_state.pt").exists()
    assert (ckpt_dir / f"rng_rank{rank}.pt").exists()
    accumulate(7 + 100 * rank)
    zero.step()
    first = gathered(model, names)
    accumulate(9 + 100 * rank)    # a different update, then back to the checkpoint
    zero.step()
    assert zero.load(ckpt_dir) == state
    restored = gathered(model, list(rparams))
    for n in rparams:
        assert torch.equal(restored[n], after[n]), n
    accumulate(7 + 100 * rank)
    zero.step()
    second = gathered(model, names)
    for n in names:
        assert torch.allclose(first[n], second[n], atol=1e-7), (n, (first[n] - second[n]).abs().max())

    # 7. a NaN loss: update skipped, weights untouched
    before = gathered(model, list(rparams))
    h, t, _ = run(bb, model, zero.runner(model), batches[0], comps[0])
    zero.backward(loss_of(h, zero.lm_head_weight(model), t, 0) * float("nan"))
    norm, applied = zero.step()
    assert not applied and not torch.isfinite(torch.tensor(norm)), norm
    now = gathered(model, list(rparams))
    for n in rparams:
        assert torch.equal(before[n], now[n]), n

    # 8. consolidated state dict == the gathered weights
    sd = zero.full_state_dict()
    if rank == 0:
        assert set(sd) == set(rmodel.state_dict())
        for n in rparams:
            assert torch.equal(sd[n], now[n]), n
    else:
        assert sd is None
    dist.barrier()
    return head is model.get_input_embeddings().weight


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in sys.argv[2:]:
        tied = check(path, Path(sys.argv[1]) / Path(path).name, rank, world)
        print(f"rank {rank}: {Path(path).name} ok (tied lm_head: {tied})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
