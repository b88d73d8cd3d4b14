"""Small collective helpers over torch.distributed (no-ops on one process)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def all_gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's x (same shape on every rank) along dim 0, rank order."""
    if not dist.is_initialized():
        return x
    local = x.to(_comm_device(device))
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.cat(out).to(x.device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of numbers (float64)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_mean(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of each metric, ignoring ranks where it is non-finite (NaN if none has it)."""
    if not dist.is_initialized():
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    finite = torch.isfinite(vals)
    stacked = torch.stack([torch.where(finite, vals, torch.zeros_like(vals)), finite.double()])
    stacked = stacked.to(_comm_device(device))
    dist.all_reduce(stacked)
    total, count = stacked.cpu().tolist()
    return {k: (v / c if c > 0 else float("nan")) for k, v, c in zip(keys, total, count)}


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of every rank's integer `value` (the value itself on one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
