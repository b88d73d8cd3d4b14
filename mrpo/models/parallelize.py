"""Model-specific parallelism: FSDP2 (`fully_shard`) per decoder block, the vision tower, the root.

On GPU: bf16 parameters with fp32 gradient reduction (MixedPrecisionPolicy). On CPU: fp32 with gloo.
With one process the model is left as it is (nothing to shard).

The fused loss needs the decoder's last hidden states and the lm_head weight, not the logits. Calling
the inner `model.model(...)` would bypass the root FSDP unit's hooks (its parameters would stay sharded
and their gradients would never be reduced), so instead the lm_head is swapped for a `PassthroughHead`:
it keeps the same `weight` parameter (state-dict keys, saving and generation are unchanged) but, inside
`hidden_states_mode()`, returns its input. The regular `model(...)` call then yields hidden states as
"logits", through every hook FSDP2 or DeepSpeed put on the root.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class PassthroughHead(nn.Module):
    """The lm_head (weight [V, D], no bias) that can return hidden states instead of logits."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.passthrough = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.passthrough:
            return hidden
        return F.linear(hidden, self.weight.to(hidden.dtype))


def install_passthrough_head(model: nn.Module) -> PassthroughHead:
    """Replace model.lm_head (an nn.Linear without bias) by a PassthroughHead sharing its weight."""
    head = model.get_output_embeddings()
    if isinstance(head, PassthroughHead):
        return head
    if getattr(head, "bias", None) is not None:
        raise ValueError("the fused MRPO loss expects an lm_head without bias")
    new_head = PassthroughHead(head.weight)
    model.set_output_embeddings(new_head)
    model.register_forward_hook(_hidden_states_only)   # before fully_shard: runs ahead of FSDP2's hook
    return new_head


def _hidden_states_only(module: nn.Module, args, output):
    """In hidden-states mode the root returns only `logits` (= hidden states), as an owned tensor.

    FSDP2 registers its pre-backward hook on every grad-requiring tensor of the root's output; HF also
    returns per-image views of the vision features (image_outputs.pooler_output) and may return a sliced
    view as logits. Hooks on views are dropped by any in-place op, so FSDP2 warns; the training forward
    needs none of those extra tensors, so they are not handed out at all."""
    head = module.get_output_embeddings()
    if not getattr(head, "passthrough", False):
        return output
    logits = output.logits
    return type(output)(logits=logits.clone() if logits._base is not None else logits)


@contextlib.contextmanager
def hidden_states_mode(model: nn.Module):
    """Within this block, model(...).logits are the final-norm hidden states [B, T, D]."""
    head = model.get_output_embeddings()
    if not isinstance(head, PassthroughHead):
        raise RuntimeError("call install_passthrough_head(model) first")
    head.passthrough = True
    try:
        yield
    finally:
        head.passthrough = False


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder blocks for Qwen2.5-VL, Qwen3-VL and InternVL."""
    inner = model.model
    lm = getattr(inner, "language_model", None)
    layers = getattr(lm, "layers", None) if lm is not None else getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def vision_tower(model: nn.Module) -> nn.Module | None:
    inner = model.model
    for name in ("visual", "vision_tower"):
        if hasattr(inner, name):
            return getattr(inner, name)
    return None


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment (collective timeout timeout_s seconds,
    None = torch's default; mrpo.distributed.init_process_group); returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        from mrpo.distributed import init_process_group

        init_process_group("nccl" if device.type == "cuda" else "gloo", timeout_s)
    return rank, world, device


def apply_fsdp2(model: nn.Module, device: torch.device, param_dtype: torch.dtype,
                reduce_dtype: torch.dtype, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder block, the vision tower as one unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    visual = vision_tower(model)
    if visual is not None:
        fully_shard(visual, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model


def freeze_vision_tower(model: nn.Module) -> None:
    visual = vision_tower(model)
    if visual is not None:
        visual.requires_grad_(False)
