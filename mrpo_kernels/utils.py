"""Backend selection, chunk-size choice and input checks shared by the mrpo_kernels ops."""
from __future__ import annotations

import os

import torch
from triton.runtime.interpreter import InterpretedFunction

BACKENDS = ("auto", "torch", "triton")

# bytes of one [chunk, V] logits buffer on CPU: large enough for efficient GEMMs, small enough that
# the elementwise passes over it stay near the L3 cache and memory does not grow with N
CPU_CHUNK_BYTES = 128 * 2**20
CUDA_MAX_CHUNK_BYTES = 2 * 2**30


def triton_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def resolve_backend(backend: str, device: torch.device, kernel) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' otherwise; checks that 'triton' can run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted(kernel):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device.type}); for CPU tensors set "
            "TRITON_INTERPRET=1 before triton is first imported (fp32 only), or use backend='torch'"
        )
    return backend


def choose_chunk_size(n: int, v: int, elem_bytes: int, device: torch.device, buffers: int = 1) -> int:
    """Rows per chunk so that `buffers` [chunk, V] buffers fit the budget (CPU: 128 MiB; CUDA: a
    quarter of free memory, at most 2 GiB). Multiple of 16 when >= 16; never above n (min 1)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, CUDA_MAX_CHUNK_BYTES)
    else:
        budget = CPU_CHUNK_BYTES
        try:  # do not plan more than an eighth of the memory that is free right now
            budget = min(budget, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
        except (ValueError, OSError, AttributeError):
            pass
    rows = max(1, budget // max(1, v * elem_bytes * buffers))
    if rows >= 16:
        rows = rows // 16 * 16
    return int(max(1, min(rows, n)))


def check_rows(name: str, t: torch.Tensor | None, n: int, device: torch.device) -> None:
    """Raise a ValueError naming `name` unless `t` is a [n] tensor on `device` (None passes)."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one value per token), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of hidden)")


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, check_values: bool = True) -> None:
    """Shapes/devices of hidden [N, D], weight [V, D], targets [N] int; with check_values also
    0 <= id < V (reads the ids' min/max back to the host: a sync on CUDA)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and weight [V, D]; got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}")
    check_rows("targets", targets, hidden.shape[0], hidden.device)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if check_values and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, V={weight.shape[0]}), got min {lo}, max {hi}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


__all__ = [
    "BACKENDS", "triton_interpreted", "resolve_backend", "choose_chunk_size", "check_rows",
    "check_linear", "compute_dtype",
]
