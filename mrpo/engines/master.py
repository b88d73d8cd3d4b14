"""fp32 master weights for a bf16 / fp16 model trained in one process.

AdamW on bf16 weights rounds away every update smaller than half a weight's bf16 spacing: at lr 1e-6
almost all of them (the spacing near 0.02 is 1.2e-4). So, as FSDP2 and DeepSpeed do:

- the module keeps its parameters in model.dtype, so forwards, rollouts, the fused loss (which reads
  lm_head.weight directly) and the export run exactly as before, at bf16 speed and memory;
- each low-precision trainable parameter has an fp32 master copy and an fp32 gradient buffer: a
  post-accumulate-grad hook adds every backward's gradient to the buffer and frees the bf16 one, so
  gradients accumulate over micro-batches in fp32;
- the optimizer is built on the module's own Parameter objects; for the step (and for checkpoint
  save / load) `masters_in()` swaps the fp32 masters into `param.data`, so AdamW creates and updates fp32
  moments, clipping sees fp32 gradients, and DCP checkpoints hold the fp32 masters and FQN-keyed fp32
  moments (the layout FSDP2 writes). On exit the model.dtype copy is refreshed from the master (rounded
  to nearest).

Not fp32 parameters under autocast: autocast re-casts every weight at every forward, i.e. at every
decoded token of a rollout (decode is memory-bound: fp32 reads plus a bf16 write per weight per token),
the fused loss would receive an fp32 lm_head weight next to bf16 hidden states, and the reference copy
and generation would need their own casts. Memory per trainable parameter: 2 (bf16) + 4 (master) + 4
(fp32 gradient) + 8 (moments) = 18 bytes (mrpo.plan counts them).
"""
from __future__ import annotations

import contextlib

import torch


class MasterWeights:
    """fp32 masters and fp32 gradient buffers of the non-fp32 parameters in `params` (see module docstring)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = [p for p in params if p.dtype != torch.float32]
        self.masters = [p.detach().float() for p in self.params]         # same shapes, float32
        self.low = [p.data for p in self.params]                          # the model.dtype storage
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)   # fp32 accumulated gradients
        index = {id(p): i for i, p in enumerate(self.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p, i=index[id(p)]: self._accumulate(p, i))
                       for p in self.params]

    def __bool__(self) -> bool:
        return bool(self.params)

    def _accumulate(self, p: torch.nn.Parameter, i: int) -> None:
        """Called once per backward after p.grad (model.dtype) is complete: add it to the fp32 buffer."""
        if self.grads[i] is None:
            self.grads[i] = p.grad.float()
        else:
            self.grads[i].add_(p.grad)
        p.grad = None

    def zero_grad(self) -> None:
        self.grads = [None] * len(self.params)

    @contextlib.contextmanager
    def masters_in(self, grads: bool = False):
        """Inside: every managed parameter holds its fp32 master (and, with grads, its fp32 gradient).
        On exit the model.dtype copy is refreshed from the master and the gradients are cleared."""
        for p, master, g in zip(self.params, self.masters, self.grads):
            p.data = master
            p.grad = g if grads else None
        try:
            yield
        finally:
            for p, master, low in zip(self.params, self.masters, self.low):
                p.grad = None
                low.copy_(master)   # round to nearest
                p.data = low
            if grads:
                self.zero_grad()
