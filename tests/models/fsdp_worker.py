"""Worker for test_fsdp2_sharded_backbone (run by torchrun with 2 gloo processes): for each tiny model
folder given on the command line, shard it with FSDP2 (each decoder layer, the vision tower, the root),
generate with synced_gpus at different lengths per rank, and check the teacher-forced log-probs and a
decoder-layer gradient against an unsharded copy (gradients all-reduced / averaged)."""
import os
import sys

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
