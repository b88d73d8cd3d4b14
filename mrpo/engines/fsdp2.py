"""FSDP2 (`fully_shard`) per decoder block, the vision tower and the root; DCP checkpoints.

- Gradients are reduce-scattered only on the last micro-batch of a step (set_requires_gradient_sync):
  earlier micro-batches accumulate unsharded gradients locally, one reduce-scatter per unit per step.
- Generation (rollouts, evaluation) gathers every unit once and keeps it unsharded until the end of
  the context (distributed.gather_for_generation), instead of an all-gather per unit per decoded
  token; with gather_for_generation=false the per-unit path is kept for models that do not fit.
- Trainable parameters are sharded in fp32 whatever model.dtype (the optimizer's master weights);
  forwards run in distributed.param_dtype. AdamW on bf16 weights rounds away every update smaller
  than half the weight's bf16 spacing: at lr 1e-6 almost all of them (the spacing near 0.02 is 1.2e-4).
  The export is cast back to model.dtype.
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule

from mrpo.models.lora import is_lora_model
from mrpo.models.parallelize import apply_fsdp2

from .single import SingleEngine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inner_units(model: torch.nn.Module) -> list[FSDPModule]:
    """The model's FSDP units below the root (decoder blocks, vision tower)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]


def _init_root(model: torch.nn.Module) -> None:
    # FSDP2 makes the first module that runs forward the root; HF generate runs the vision tower
    # (get_image_features) before the model's forward, so the root is set up explicitly here. The
    # private call is the only way to do so before a forward (torch 2.6-2.13); a no-op when done.
    model._get_fsdp_state()._lazy_init()


class FSDP2Engine(SingleEngine):
    name = "fsdp2"

    def __init__(self, model, ref_model, cfg, device):
        dcfg = cfg.distributed
        param_dtype = DTYPES[dcfg.param_dtype] if device.type == "cuda" else torch.float32
        reduce_dtype = DTYPES[dcfg.reduce_dtype]
        for p in model.parameters():   # fp32 master weights (a tied weight is cast once, and stays tied)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        for m in (model, ref_model):
            if m is not None:
                apply_fsdp2(m, device, param_dtype, reduce_dtype)
                _init_root(m)
        super().__init__(model, ref_model, cfg, device)   # the optimizer sees the sharded (DTensor) params
        self.export_dtype = getattr(torch, cfg.model.dtype)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.model.set_requires_gradient_sync(sync)
        loss.backward()

    def generation(self):
        return generation_context(self.model, self.cfg.distributed.gather_for_generation)

    def full_state_dict(self) -> dict | None:
        """The unsharded CPU state dict, full fine-tuning's fp32 master weights cast back to model.dtype
        (LoRA adapters, trained in fp32 whatever the base, are exported as they are)."""
        state = super().full_state_dict()
        if is_lora_model(self.model):
            return state
        return {k: v.to(self.export_dtype) if v.is_floating_point() else v for k, v in state.items()}


@contextlib.contextmanager
def generation_context(model: torch.nn.Module, gather_all: bool = True):
    """Context for generate on an FSDP2 model. gather_all: every unit unsharded once for the whole
    context (one all-gather per unit), resharded (and the per-forward reshard restored) on exit;
    otherwise only the root is unsharded (its embeddings / projector run outside its forward in HF
    generate) and each block all-gathers at every forward, i.e. every decoded token."""
    _init_root(model)
    inner = _inner_units(model) if gather_all else []
    for unit in inner:   # the root never reshards after forward (FSDP2 keeps it for backward)
        unit.set_reshard_after_forward(False, recurse=False)
    handles = [unit.unshard(async_op=True) for unit in [model, *inner]]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield
    finally:
        for unit in [model, *inner]:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
