"""DeepSpeed ZeRO-3 as the alternative distributed engine (`distributed.engine: deepspeed`).

`ZeROEngine` (the `Engine` of mrpo/engines/base.py for DeepSpeed) wraps the policy (and the frozen
reference policy, if any) with `deepspeed.initialize`:

  runner(model)          the DeepSpeed engine to call instead of the module (its forward counts the
                         micro-steps that ZeRO-3 gradient accumulation relies on)
  generation()           context for rollouts: weights gathered once, hooks off (gather_for_generation)
  lm_head_weight(model)  the full [V, D] output-embedding weight for the fused loss (see below)
  backward(loss, sync)   engine.backward, then the lm_head weight is re-partitioned; ZeRO-2/3 reduce
                         gradients inside backward's hooks and have no no-sync mode, so `sync` is unused
  step()                 clip + optimizer step; (grad norm, applied); a non-finite norm skips the update
  save_weights / load_weights  engine.save_checkpoint / load_checkpoint inside mrpo.checkpoint's layout
  full_state_dict()      the consolidated (16-bit on GPU, fp32 on CPU) state dict on rank 0, for export

Gradient accumulation is owned by the trainer (`managed_gradient_accumulation: false`): each micro-batch
calls backward (gradients are reduce-scattered into this rank's fp32 partition and summed), and every
`step()` is the accumulation boundary. The loss is scaled by the trainer (scale_wrt_gas=False).

The lm_head weight under ZeRO-3: outside its module's forward a parameter holds an empty local shard.
The fused MRPO loss reads the weight after the model's forward (which only returns hidden states) and
computes grad_weight inside its own forward, so the weight is all-gathered for the loss and kept gathered
until its gradient has been reduced in backward: ZeRO-3's gradient hook needs the full parameter at that
point (re-partitioning between the loss and backward fails with a size mismatch). Without autograd (old
/ reference log-probs) a gathered copy is returned and the parameter is released at once.

bf16 parameters with fp32 master weights (optimizer partitions) and fp32 gradient reduction on GPU;
fp32 with the gloo backend on CPU (DeepSpeed's CPU accelerator; oneCCL is not needed).
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from mrpo.checkpoint import saved_world_size
from mrpo.errors import CheckpointError, UserInputError
from mrpo.models.lora import is_lora_model

from .base import Engine

DS_TAG = "deepspeed"   # engine.save_checkpoint's sub-folder inside OUTPUT/checkpoints/step_XXXXXX/
_COMM_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def build_config(cfg, device: torch.device, overrides: dict | None = None) -> dict:
    """DeepSpeed config dict from the run config (duck-typed: cfg.optim, cfg.distributed, cfg.model).

    bf16 (fp32 master weights) when the model is bf16 or, on GPU, distributed.param_dtype is bfloat16;
    fp32 otherwise (always on CPU for fp32 models). `overrides` are merged into the result (nested dicts
    merged key by key), e.g. {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}."""
    dcfg = cfg.distributed
    stage = int(dcfg.deepspeed_zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(f"distributed.deepspeed_zero_stage must be 1, 2 or 3, got {stage}")
    if cfg.model.dtype == "float16":
        raise ValueError("model.dtype=float16 is not supported with distributed.engine=deepspeed "
                         "(it would need loss scaling); use bfloat16 or float32")
    bf16 = cfg.model.dtype == "bfloat16" or (device.type == "cuda" and dcfg.param_dtype == "bfloat16")
    config = {
        "train_micro_batch_size_per_gpu": cfg.optim.per_device_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0),
        "managed_gradient_accumulation": False,     # the trainer calls step() once per accumulation window
        "bf16": {"enabled": bf16},
        "communication_data_type": _COMM_DTYPE[dcfg.reduce_dtype] if bf16 else "fp32",
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    return _merge(config, overrides or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _init_comm(device: torch.device) -> None:
    """deepspeed.comm on top of torch.distributed (gloo on CPU, nccl on GPU)."""
    import deepspeed

    for name in ("DeepSpeed", "deepspeed"):   # DeepSpeed logs every engine detail at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


class ZeROEngine(Engine):
    """The policy under DeepSpeed ZeRO (stage 3 by default), optionally with a ZeRO-3 reference model.

    model: the HF policy (lm_head already a PassthroughHead); optimizer: a torch optimizer over its
    trainable parameters (default: AdamW from cfg.optim), which DeepSpeed wraps (fp32 master partitions)."""

    name = "deepspeed"
    direct_backward = False   # engine.backward may rescale the loss (loss scaling, gradient accumulation)

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None, cfg, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, overrides: dict | None = None):
        try:
            import deepspeed
        except ImportError as err:
            raise UserInputError(f"distributed.engine=deepspeed needs DeepSpeed ({err}): pip install -e "
                                 f"'.[deepspeed]', or use distributed.engine=fsdp2") from None

        _init_comm(device)
        super().__init__(model, ref_model, cfg, device)
        if optimizer is None:
            o = cfg.optim
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                          betas=tuple(o.adam_betas), eps=o.adam_eps, weight_decay=o.weight_decay)
        self.config = build_config(cfg, device, overrides)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.config)
        if getattr(self.engine, "managed_gradient_accumulation", lambda: True)():
            raise RuntimeError(f"deepspeed {deepspeed.__version__} ignores managed_gradient_accumulation=false, "
                               "which the trainer's accumulation needs (tested with deepspeed 0.19.8)")
        self.base_optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else optimizer
        self.ref_engine = None
        if ref_model is not None:   # inference-only ZeRO-3 engine: parameters partitioned, no optimizer
            ref_config = {k: v for k, v in self.config.items() if k != "gradient_clipping"}
            ref_config["zero_optimization"] = {**self.config["zero_optimization"], "stage": 3}
            self.ref_engine = deepspeed.initialize(model=ref_model, config=ref_config)[0]
        self._engines = {id(self.engine.module): self.engine}
        if self.ref_engine is not None:
            self._engines[id(self.ref_engine.module)] = self.ref_engine
        self._held = contextlib.ExitStack()   # the gathered lm_head weight, released after backward
        self._holding = False

    # ------------------------------------------------------------------ forward / backward / step
    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        return self.base_optimizer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def runner(self, model: torch.nn.Module):
        """The engine wrapping `model` (call it like the model), or the model itself if not wrapped."""
        return self._engines.get(id(model), model)

    def generation(self):
        """Context for rollouts: the policy's full weights gathered once and the ZeRO-3 hooks removed, so
        generate runs as on an unsharded model instead of all-gathering every layer at every decoding step
        (much faster; needs the whole model to fit on one device). The hooks are restored on exit.
        With distributed.gather_for_generation=false, layers are gathered per forward (slow, lean)."""
        gather = getattr(getattr(self.cfg, "distributed", None), "gather_for_generation", True)
        if self.config["zero_optimization"]["stage"] != 3 or not gather:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def lm_head_weight(self, model: torch.nn.Module) -> torch.Tensor:
        """The full output-embedding weight [V, D] of `model` for the fused loss.

        With autograd on, the parameter itself, gathered until `backward()` (its gradient flows to the
        ZeRO-3 partitions); without, a gathered copy (the parameter is re-partitioned at once)."""
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        weight = model.get_output_embeddings().weight
        if not _is_partitioned(weight) or weight.ds_status == ZeroParamStatus.AVAILABLE:
            return weight
        if not torch.is_grad_enabled():
            with deepspeed.zero.GatheredParameters([weight]):
                return weight.detach().clone()
        if self._holding:
            raise RuntimeError("lm_head weight gathered twice: call ZeROEngine.backward() after each loss")
        self._held.enter_context(deepspeed.zero.GatheredParameters([weight]))
        self._holding = True
        return weight

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """engine.backward(loss) (no extra scaling: the trainer scales by its accumulation), then the
        gathered lm_head weight is released."""
        try:
            self.engine.backward(loss, scale_wrt_gas=False)
        finally:
            self._holding = False
            self._held.close()

    def step(self) -> tuple[float, bool]:
        """Clip (gradient_clipping) and step at this accumulation boundary; zero the gradients.
        Returns (global grad norm before clipping, whether the update was applied). A non-finite norm
        makes DeepSpeed skip the update (weights untouched)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.engine.was_step_applied()) and math.isfinite(norm)
        return norm, applied

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (the next backward starts a new accumulation window)."""
        self.optimizer.zero_grad(set_to_none=True)

    def warmup_optimizer(self, lr: float, max_grad_norm: float = 1.0, **hparams) -> "WarmupOptimizer":
        """The engine's optimizer behaving like a fresh torch.optim.AdamW(params, lr=lr, **hparams) with
        clipping at max_grad_norm, for the supervised warm-up; close() restores the RL settings."""
        return WarmupOptimizer(self, lr, max_grad_norm, hparams)

    # ------------------------------------------------------------------ checkpoints and export
    def save_weights(self, folder: Path) -> None:
        """The DeepSpeed engine state (partitioned fp32 master weights + optimizer moments, per rank)
        under folder/deepspeed/."""
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=is_lora_model(self.model))   # LoRA: adapters only

    def load_weights(self, folder: Path) -> None:
        """Only on the number of processes that wrote the checkpoint: ZeRO partitions are per rank, and
        DeepSpeed's resharding path (universal checkpoints, deepspeed.checkpoint.ds_to_universal) is not
        wired in here. Anything else stops at start-up with one line (CheckpointError, exit 2)."""
        saved = saved_world_size(folder)
        if not (folder / DS_TAG).is_dir():
            raise CheckpointError(
                f"{folder} is a DCP checkpoint (written by {saved or '?'} process{'' if saved == 1 else 'es'}, one "
                f"process or FSDP2; no {DS_TAG}/ folder), which DeepSpeed ZeRO cannot load: resume it on one process, "
                f"or with distributed.engine=fsdp2 (DCP reshards to any number of processes; needs "
                f"checkpoint.resume_ignore_config=true)")
        if saved != self.world:
            raise CheckpointError(
                f"{folder} was written by DeepSpeed ZeRO on {saved} processes and this run has {self.world}: ZeRO "
                f"partitions load only on the same number of processes here (DeepSpeed's universal checkpoints are "
                f"not wired in); resume it on {saved} processes")
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False,
                                                load_module_strict=not is_lora_model(self.model))
        if loaded is None:
            raise RuntimeError(f"deepspeed could not load the checkpoint in {folder / DS_TAG}")

    def full_state_dict(self) -> dict | None:
        """Consolidated CPU state dict of the policy on rank 0 (None on other ranks); every rank calls.
        Parameters in the training dtype (bf16 on GPU, fp32 on CPU), keys as model.state_dict()."""
        if self.config["zero_optimization"]["stage"] == 3:
            # DeepSpeed's own consolidation for save_16bit_model; no public API returns the dict itself
            return self.engine._zero3_consolidated_16bit_state_dict()
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}


class WarmupOptimizer:
    """Supervised warm-up through the ZeRO engine: its optimizer's hyper-parameters are those of a fresh
    torch.optim.AdamW(lr=lr, **hparams), gradients are clipped at max_grad_norm, and the Adam moments are
    dropped when it starts and on close() (the RL phase starts fresh, as with a separate optimizer)."""

    def __init__(self, zero: ZeROEngine, lr: float, max_grad_norm: float, hparams: dict):
        self.zero = zero
        groups = zero.base_optimizer.param_groups
        self._saved = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self._clip = zero.optimizer.clip_grad
        fresh = torch.optim.AdamW([torch.zeros(1)], lr=lr, **hparams).defaults
        for g in groups:
            g.update({k: v for k, v in fresh.items() if k in g})
        zero.optimizer.clip_grad = max_grad_norm
        zero.base_optimizer.state.clear()

    def step(self) -> tuple[float, bool]:
        return self.zero.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.zero_grad()

    def close(self) -> None:
        self.zero.zero_grad()
        self.zero.base_optimizer.state.clear()
        for g, saved in zip(self.zero.base_optimizer.param_groups, self._saved):
            g.update(saved)
        self.zero.optimizer.clip_grad = self._clip
