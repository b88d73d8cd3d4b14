"""The engine interface: everything that differs between one process, FSDP2 and DeepSpeed ZeRO.

The trainer only ever talks to an `Engine`:

  runner(model)              what to call for a forward (the model, or the DeepSpeed engine around it)
  generation()               context for rollouts/evaluation: weights gathered once, not per token
  lm_head_weight(model)      the full [V, D] output-embedding weight for the fused loss
  backward(loss, sync)       backward; sync=False accumulates locally (no gradient reduction yet)
  step()                     clip, NaN skip, optimizer step, zero grads -> (grad norm, applied)
  warmup_optimizer(lr)       a fresh AdamW-like optimizer for the supervised warm-up (step/close)
  save(...) / load(path)     checkpoints in mrpo.checkpoint's atomic layout
  full_state_dict()          consolidated CPU state dict on rank 0, for the Hugging Face export
  export(backbone, dir)      the Hugging Face folder (LoRA: adapter folder, merged model on request)
  grad_average_world         how many ranks data-parallel gradient reduction averages over

Gradient reduction averages over ranks in every engine, so the trainer multiplies its per-token loss
weights by `grad_average_world` to make the step's loss a sum over all ranks' tokens (one objective
whatever the world size).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from mrpo import checkpoint as ckpt
from mrpo.models.lora import is_lora_model, merged_state_dict, save_adapter

log = logging.getLogger("mrpo")


class Engine:
    """Base: a plain torch model and optimizer on one process (see module docstring for the API).

    model: the policy (lm_head already a PassthroughHead); ref_model: the frozen reference policy or
    None; cfg: the run Config; device: this rank's device."""

    name = "base"

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None, cfg, device: torch.device):
        self.model, self.ref_model, self.cfg, self.device = model, ref_model, cfg, device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    # ------------------------------------------------------------------ forward / backward / step
    @property
    def grad_average_world(self) -> int:
        return self.world

    # backward(loss) backpropagates the loss as it is (grad_output 1), so the fused loss may skip scaling
    # its stored gradients; False where the framework rescales the loss itself (DeepSpeed)
    direct_backward = True

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose param_groups' lr the scheduler drives."""
        return self.optimizer

    def runner(self, model: torch.nn.Module):
        return model

    def generation(self):
        return contextlib.nullcontext()

    def lm_head_weight(self, model: torch.nn.Module) -> torch.Tensor:
        return model.get_output_embeddings().weight

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        raise NotImplementedError

    def step(self) -> tuple[float, bool]:
        raise NotImplementedError

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def warmup_optimizer(self, lr: float, max_grad_norm: float = 1.0):
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints and export
    def save(self, root: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path | None:
        """A complete checkpoint for `step` (every rank calls), written atomically (mrpo.checkpoint); None
        when it was skipped for lack of disk space."""
        return ckpt.write_checkpoint(root, step, self.save_weights, trainer_state, keep_last,
                                     expected_bytes=self.checkpoint_bytes())

    def checkpoint_bytes(self) -> int:
        """Expected size of a checkpoint before the first one exists: the saved weights (all of them, or
        with LoRA the trainable ones) plus two fp32 AdamW moments per trainable parameter. Global sizes:
        DTensor.numel() and DeepSpeed's ds_numel count the whole parameter, not this rank's shard."""
        lora = is_lora_model(self.model)
        total = 0
        for p in self.model.parameters():
            numel = getattr(p, "ds_numel", p.numel())
            if p.requires_grad:
                total += numel * (p.element_size() + 8)
            elif not lora:
                total += numel * p.element_size()
        return total

    def load(self, path: str | Path) -> dict:
        """Restore weights, optimizer and this rank's RNG from `path`; returns the trainer state."""
        return ckpt.read_checkpoint(path, self.load_weights)

    def save_weights(self, folder: Path) -> None:
        """Write model + optimizer state into the checkpoint folder (every rank calls)."""
        raise NotImplementedError

    def load_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict | None:
        raise NotImplementedError

    def export(self, backbone, out_dir: Path, merge_lora: bool = False) -> None:
        """Hugging Face folder of the current policy (safetensors, config, tokenizer, processor; every rank
        calls, rank 0 writes). With LoRA: the peft adapter folder out_dir/adapter, and with merge_lora the
        merged model in out_dir."""
        state = self.full_state_dict()
        if self.rank == 0 and self._room_for_export(state, out_dir):
            if is_lora_model(self.model):
                save_adapter(self.model, out_dir / "adapter", state)
                if merge_lora:
                    backbone.save(out_dir, state_dict=merged_state_dict(self.model, state))
            else:
                backbone.save(out_dir, state_dict=state)
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def _room_for_export(state: dict, out_dir: Path) -> bool:
        """Whether the export's file system has room for the state dict's bytes; logs why not (rank 0)."""
        needed = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        problem = ckpt.space_problem(out_dir.parent, needed, "the exported model")
        if problem is not None:
            log.error("%s: export skipped, nothing written (the last checkpoint holds the trained weights)", problem)
        return problem is None
