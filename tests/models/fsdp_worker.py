"""Worker for test_fsdp2_sharded_backbone (run by torchrun with 2 gloo processes): for each tiny model
folder given on the command line, shard it with FSDP2 (each decoder layer, the vision tower, the root),
generate with synced_gpus at different lengths per rank, and check the teacher-forced log-probs and a
decoder-layer gradient against an unsharded copy (gradients all-reduced / averaged); then the same with a
text-only prompt on rank 0 next to an image prompt on rank 1."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from mrpo.data.synthetic import make_example
from mrpo.engines.fsdp2 import generation_context
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head


class count_all_gathers:
    """Counts FSDP2's parameter all-gathers: torch.distributed.all_gather_single (torch >= 2.12) or
    all_gather_into_tensor (earlier), whichever FSDP2 calls."""

    def __init__(self):
        self.count = 0
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._counting(getattr(dist, name)))

    def _counting(self, original):
        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return counting

    def pop(self) -> int:
        n, self.count = self.count, 0
        return n


def check(path: str, rank: int, world: int) -> None:
    bb, ref = load_backbone(path), load_backbone(path)
    model = bb.model
    install_passthrough_head(model)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model.model.visual if bb.is_qwen else model.model.vision_tower)
    fully_shard(model)
    problem = "Is there a lesion?" if rank == 0 else "How many lesions are there in the image?"
    batch = bb.encode_prompts([problem], [make_example(0, "train", rank, 56)[1]])
    units = len(model.model.language_model.layers) + 2     # decoder blocks, vision tower, root
    gathers = count_all_gathers()
    torch.manual_seed(rank)
    with generation_context(model, gather_all=True):        # the engine's path: gathered once
        comps = bb.generate(batch, max_new_tokens=4 + 4 * rank, synced_gpus=True)   # ranks stop at different steps
    assert len(comps[0]) <= 4 + 4 * rank
    once = gathers.pop()
    assert once == units, f"gather_for_generation: {once} all-gathers, expected one per FSDP unit ({units})"
    torch.manual_seed(rank)
    with generation_context(model, gather_all=False):       # per-layer path for models that do not fit
        again = bb.generate(batch, max_new_tokens=4 + 4 * rank, synced_gpus=True)
    assert again == comps
    per_token = gathers.pop()
    assert per_token > 2 * units, per_token                 # every block at every decoded token
    model.unshard()
    hidden, targets, _ = bb.completion_hidden_states(batch, comps)
    lp = torch.log_softmax(hidden @ bb.lm_head_weight.T, -1).gather(-1, targets[:, None])[:, 0]
    lp.sum().backward()
    model.reshard()
    h2, t2, _ = ref.completion_hidden_states(batch, comps)
    lp2 = torch.log_softmax(h2 @ ref.lm_head_weight.T, -1).gather(-1, t2[:, None])[:, 0]
    lp2.sum().backward()
    assert torch.allclose(lp.detach(), lp2.detach(), atol=1e-5), (lp - lp2).abs().max()
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    g_ref = dict(ref.model.named_parameters())[name].grad.clone()
    dist.all_reduce(g_ref)
    g = dict(model.named_parameters())[name].grad.full_tensor()
    assert torch.allclose(g, g_ref / world, atol=1e-5), (g - g_ref / world).abs().max()
    # the trainer's path: root forward with the lm_head passthrough (no manual unshard), the lm_head
    # weight read after the forward (the root stays unsharded until backward) and used by the loss
    model.zero_grad(set_to_none=True)
    with hidden_states_mode(model):
        hidden, targets, _ = bb.completion_hidden_states(batch, comps, model=model)
    weight = model.get_output_embeddings().weight
    lp3 = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])[:, 0]
    lp3.sum().backward()
    assert torch.allclose(lp3.detach(), lp2.detach(), atol=1e-5), (lp3 - lp2).abs().max()
    ref_params = dict(ref.model.named_parameters())
    for pname in (name, "lm_head.weight", "model.language_model.embed_tokens.weight"):
        g_ref = ref_params[pname].grad.clone()
        dist.all_reduce(g_ref)
        g = dict(model.named_parameters())[pname].grad.full_tensor()
        assert torch.allclose(g, g_ref / world, atol=1e-5), (pname, (g - g_ref / world).abs().max())

def check_text_only_rank(path: str, rank: int, world: int) -> None:
    """Rank 0 holds a text-only prompt, the others one with an image: rank 0 must still run the vision
    tower (Backbone appends a throwaway image row), or the ranks' all-gathers stop matching and hang.
    Rank 0's log-probs equal the unsharded model's, and the vision tower's gradient is the average of
    the ranks' (rank 0 adds zero)."""
    bb, ref = load_backbone(path), load_backbone(path)
    model = bb.model
    install_passthrough_head(model)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    visual = model.model.visual if bb.is_qwen else model.model.vision_tower
    fully_shard(visual)
    fully_shard(model)
    images = [] if rank == 0 else [make_example(0, "train", rank, 56)[1]]
    batch = bb.encode_prompts(["Is 2 larger than 1?"], [images])
    assert ("pixel_values" in batch) == (rank != 0)
    with generation_context(model, gather_all=False):       # per-layer gathers: the vision filler matters
        comps = bb.generate(batch, max_new_tokens=3 + 3 * rank, do_sample=False, synced_gpus=True)
    assert comps == ref.generate(batch, max_new_tokens=3 + 3 * rank, do_sample=False)
    with hidden_states_mode(model):
        hidden, targets, cu = bb.completion_hidden_states(batch, comps, model=model)
    assert cu.tolist() == [0, len(comps[0])] and targets.tolist() == comps[0]
    lp = torch.log_softmax(hidden @ model.get_output_embeddings().weight.T, -1).gather(-1, targets[:, None])[:, 0]
    lp.sum().backward()
    h2, t2, _ = ref.completion_hidden_states(batch, comps)
    lp2 = torch.log_softmax(h2 @ ref.lm_head_weight.T, -1).gather(-1, t2[:, None])[:, 0]
    lp2.sum().backward()
    assert torch.allclose(lp.detach(), lp2.detach(), atol=1e-5), (lp - lp2).abs().max()
    prefix = "model.visual." if bb.is_qwen else "model.vision_tower."
    name = next(n for n, _ in ref.model.named_parameters() if n.startswith(prefix) and ".0." in n)   # block 0
    g_ref = ref.model.get_parameter(name).grad
    g_ref = torch.zeros_like(ref.model.get_parameter(name)) if g_ref is None else g_ref.clone()
    assert (g_ref.abs().sum() == 0) == (rank == 0)
    dist.all_reduce(g_ref)
    g = model.get_parameter(name).grad.full_tensor()
    assert g_ref.abs().sum() > 0 and torch.allclose(g, g_ref / world, atol=1e-5), (g - g_ref / world).abs().max()


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))   # a collective mismatch fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in sys.argv[1:]:
        check(path, rank, world)
        check_text_only_rank(path, rank, world)
        print(f"rank {rank}: {path} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
