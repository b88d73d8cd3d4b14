"""torchrun worker (2 gloo ranks, see test_packing.py::test_packed_fsdp2): the packed training forward
on FSDP2-sharded weights through the trainer's path (passthrough lm_head, root forward). Rank 0's
micro-batch has no image, rank 1's has two sequences with images: rank 0 packs the throwaway blank-image
row (Backbone._vision_filler) as one more sequence, so both ranks run the vision tower. The packed
log-probs equal the unsharded model's padded ones; the gradients equal the ranks' average of the
unsharded padded gradients. A recording attention function sees every decoder layer of the sharded model
get this rank's true sequence boundaries (the filler's included) and no mask."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AttentionInterface

from mrpo.data.synthetic import make_example
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head
from mrpo.models.varlen_attention import KWARG, PREFIX, use_varlen_attention

TOL = 1e-5


def check(path: str, rank: int, world: int) -> None:
    bb, ref = load_backbone(path), load_backbone(path)
    model = bb.model
    install_passthrough_head(model)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    visual = model.model.visual if bb.is_qwen else model.model.vision_tower
    fully_shard(visual)
    fully_shard(model)
    if rank == 0:
        batch = bb.encode_prompts(["Is 2 larger than 1?", "Name the organ shown in most abdominal scans."], [[], []])
    else:
        ims = [make_example(0, "train", k, 56)[1] for k in range(2)]
        batch = bb.encode_prompts(["Is there a lesion?", "Compare the scans."], [[ims[0]], ims])
    assert ("pixel_values" in batch) == (rank != 0)
    g = torch.Generator().manual_seed(rank)
    comps = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (3 + rank, 6)]
    calls = []
    name = use_varlen_attention(model)
    assert name == f"{PREFIX}sdpa"
    varlen = AttentionInterface._global_mapping[name]

    def recording(module, *args, **kwargs):
        calls.append((module, args[3] if len(args) > 3 else kwargs.get("attention_mask"), kwargs.get(KWARG)))
        return varlen(module, *args, **kwargs)

    AttentionInterface._global_mapping[name] = recording
    try:
        with hidden_states_mode(model):
            hidden, targets, cu = bb.completion_hidden_states(batch, comps, model=model, packed=True)
    finally:
        AttentionInterface._global_mapping[name] = varlen
    assert bb.last_padding_fraction == 0.0
    assert [c[0] for c in calls] == [layer.self_attn for layer in model.model.language_model.layers]
    prompt_lengths = batch["attention_mask"].sum(-1).tolist()
    lengths = [p + len(c) for p, c in zip(prompt_lengths, comps)]
    for _, mask, seqs in calls:
        assert mask is None and list(seqs.lengths[:2]) == lengths, (seqs, lengths)
        assert len(seqs.lengths) == (3 if rank == 0 else 2) and seqs.total == bb._last_tokens[0]
    own = int(batch["attention_mask"].sum()) + sum(map(len, comps))
    assert (bb._last_tokens[0] > own) == (rank == 0)                      # rank 0's row holds the filler too
    assert cu.tolist() == [0, len(comps[0]), len(comps[0]) + len(comps[1])]
    assert targets.tolist() == comps[0] + comps[1]
    lp = torch.log_softmax(hidden @ model.get_output_embeddings().weight.T, -1).gather(-1, targets[:, None])[:, 0]
    lp.sum().backward()
    h2, t2, _ = ref.completion_hidden_states(batch, comps)                 # unsharded, padded
    lp2 = torch.log_softmax(h2 @ ref.lm_head_weight.T, -1).gather(-1, t2[:, None])[:, 0]
    lp2.sum().backward()
    assert (lp.detach() - lp2.detach()).abs().max() <= TOL, (lp - lp2).abs().max()
    prefix = "model.visual." if bb.is_qwen else "model.vision_tower."
    vision = next(n for n, _ in ref.model.named_parameters() if n.startswith(prefix) and ".0." in n)
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", vision):
        g_ref = ref.model.get_parameter(name).grad
        g_ref = torch.zeros_like(ref.model.get_parameter(name)) if g_ref is None else g_ref.clone()
        dist.all_reduce(g_ref)
        got = model.get_parameter(name).grad.full_tensor()
        assert g_ref.abs().sum() > 0 and (got - g_ref / world).abs().max() <= TOL, (name, (got - g_ref / world).abs().max())


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))   # a collective mismatch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in sys.argv[1:]:
        check(path, rank, world)
        print(f"rank {rank}: {path} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
