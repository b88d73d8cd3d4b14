"""One process, or data-parallel ranks whose model is plain torch: AdamW, clipping, DCP checkpoints.

Also the base of the FSDP2 engine, which only adds sharding, gradient-sync control and the
generation context (DCP and `clip_grad_norm_` work the same on DTensor parameters).

A bf16 / fp16 model trains on fp32 master weights with fp32 AdamW moments (mrpo/engines/master.py):
forwards stay in model.dtype, checkpoints hold the fp32 masters, the export is model.dtype.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mrpo.checkpoint import saved_world_size
from mrpo.errors import CheckpointError
from mrpo.models.lora import assert_adapters_loaded, checkpoint_state_dict_options, is_lora_model

from .base import Engine
from .master import MasterWeights

log = logging.getLogger("mrpo")


def _adamw(params, optim_cfg, lr: float | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=optim_cfg.lr if lr is None else lr, betas=tuple(optim_cfg.adam_betas),
                             eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay)


class SingleEngine(Engine):
    name = "single"

    def __init__(self, model, ref_model, cfg, device):
        super().__init__(model, ref_model, cfg, device)
        self.optimizer = _adamw(self.trainable_parameters(), cfg.optim)
        # fp32 masters of bf16 / fp16 trainable weights (FSDP2 has cast them to fp32 already: none there)
        self.master = MasterWeights(self.trainable_parameters())

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        """Clip to optim.max_grad_norm and step; a non-finite norm skips the update (weights untouched)."""
        with self.master.masters_in(grads=True):
            norm = clip_and_step(self.trainable_parameters(), self.optimizer, self.cfg.optim.max_grad_norm)
        return norm, math.isfinite(norm)

    def zero_grad(self) -> None:
        super().zero_grad()
        self.master.zero_grad()

    def warmup_optimizer(self, lr: float, max_grad_norm: float = 1.0):
        return TorchWarmupOptimizer(self.trainable_parameters(), lr, max_grad_norm, self.master)

    def checkpoint_bytes(self) -> int:
        with self.master.masters_in():   # the checkpoint holds the fp32 masters
            return super().checkpoint_bytes()

    def _state_options(self) -> StateDictOptions | None:
        """LoRA: only the adapters and their optimizer state go into checkpoints (the frozen base comes from
        the model folder)."""
        return checkpoint_state_dict_options() if is_lora_model(self.model) else None

    def save_weights(self, folder: Path) -> None:
        with self.master.masters_in():   # fp32 masters and fp32 moments, keyed by the model's FQNs
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._state_options())
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))

    def load_weights(self, folder: Path) -> None:
        """DCP reshards on load: a checkpoint written by any number of processes (FSDP2 shards or one
        process's tensors) loads on this one, model and optimizer."""
        if not (folder / ".metadata").is_file() and (folder / "deepspeed").is_dir():
            raise CheckpointError(
                f"{folder} was written by DeepSpeed ZeRO on {saved_world_size(folder)} processes: this run "
                f"({self.world} process{'es' if self.world > 1 else ''}, engine {self.name}) reads DCP checkpoints "
                f"only; resume it with distributed.engine=deepspeed on {saved_world_size(folder)} processes")
        options = self._state_options()
        with self.master.masters_in():   # loaded in place into the masters; model.dtype refreshed on exit
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(folder))
            result = set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                                    optim_state_dict=state["optim"], options=options)
        if options is not None:
            assert_adapters_loaded(self.model, result)

    def full_state_dict(self) -> dict | None:
        """Unsharded CPU state dict (filled on rank 0 under FSDP2; every rank calls); with master weights
        the model.dtype copy, i.e. the fp32 masters rounded to model.dtype."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_and_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip, then step unless the total gradient norm is non-finite; zero the gradients. Returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):   # DTensor under FSDP2
        norm = norm.full_tensor()
    norm = float(norm)   # one host sync per optimizer step, needed to decide the skip and to log it
    if math.isfinite(norm):
        optimizer.step()
    else:
        log.warning("non-finite gradient norm (%s): update skipped, weights untouched", norm)
    optimizer.zero_grad(set_to_none=True)
    return norm


class TorchWarmupOptimizer:
    """A fresh AdamW(lr) clipped at max_grad_norm for the supervised warm-up, stepping on the engine's
    fp32 masters (a no-op swap where it has none)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, max_grad_norm: float, master: MasterWeights):
        self.params, self.max_grad_norm, self.master = params, max_grad_norm, master
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def step(self) -> tuple[float, bool]:
        with self.master.masters_in(grads=True):
            norm = clip_and_step(self.params, self.optimizer, self.max_grad_norm)
        return norm, math.isfinite(norm)

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.master.zero_grad()
        self.optimizer = None
