"""Engines: everything that differs between one process, FSDP2 and DeepSpeed ZeRO (see base.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .base import Engine


def build_engine(model: torch.nn.Module, ref_model: torch.nn.Module | None, cfg, device: torch.device) -> Engine:
    """The engine for `distributed.engine` (one process always runs the single engine)."""
    from mrpo.config import check_world_size

    world = dist.get_world_size() if dist.is_initialized() else 1
    check_world_size(cfg, world)   # engine=none on several ranks would train unsynced copies
    name = cfg.distributed.engine
    if world == 1:
        from .single import SingleEngine

        return SingleEngine(model, ref_model, cfg, device)
    if name == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, ref_model, cfg, device)
    if name == "deepspeed":
        from .deepspeed import ZeROEngine

        return ZeROEngine(model, ref_model, cfg, device)
    raise ValueError(f"distributed.engine: unknown engine {name!r} (fsdp2 | deepspeed | none)")


__all__ = ["Engine", "build_engine"]
