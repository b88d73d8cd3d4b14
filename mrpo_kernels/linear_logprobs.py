"""Log-probs (and entropy) of target tokens under softmax(hidden @ weight^T / T), never N x V.

Design (both backends): rows are processed in chunks; for each chunk the logits [chunk, V] are produced
by one GEMM into a reused buffer, so peak extra memory is chunk x V (chunk picked from N, V, dtype and
free memory by `utils.choose_chunk_size`), never N x V.
- torch backend (CPU path, any dtype; accumulates in fp32, fp64 for fp64 inputs): in-place log-softmax
  of the chunk, gather of the target column, entropy = -sum p log p when asked.
- triton backend (CUDA; CPU under TRITON_INTERPRET=1, fp32): the GEMM stays in cuBLAS (input dtype,
  fp32 accumulation) and one Triton program per row streams over vocab tiles with an online
  logsumexp (running max / rescaled sum in fp32), gathers the target logit and, optionally, the
  entropy. Tiles are masked, so V need not be a multiple of the block (97, 4099, 151936, ...).
The fused loss (fused_mrpo_loss.py) reuses both pieces.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_linear, choose_chunk_size, compute_dtype, resolve_backend, triton_interpreted

BLOCK_V_INTERPRET = 128  # fixed tile under TRITON_INTERPRET (autotuning is CUDA only)
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=nw) for bv in (1024, 2048, 4096) for nw in (4, 8, 16)
]


# ----------------------------------------------------------------------------------------------------
# Triton
@triton.jit
def row_logsumexp_tl(x_ptr, V, inv_t, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Online logsumexp (and entropy) of one row x[0:V] * inv_t. Returns (lse, entropy) in fp32."""
    m = float("-inf")
    s = 0.0
    t = 0.0  # sum exp(z - m) * z, rescaled with s; entropy = lse - t / s
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ent = lse - t / s
    return lse, ent


@triton.jit
def _logprobs_kernel(
    logits_ptr, stride_row, targets_ptr, logp_ptr, ent_ptr, V, inv_t,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row of a [C, V] logits chunk: logp[row] (and ent[row]) in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * stride_row
    lse, ent = row_logsumexp_tl(x_ptr, V, inv_t, BLOCK_V, WITH_ENTROPY)
    tgt = tl.load(targets_ptr + row)
    tl.store(logp_ptr + row, tl.load(x_ptr + tgt).to(tl.float32) * inv_t - lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, ent)


_logprobs_kernel_tuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["V", "WITH_ENTROPY"])(_logprobs_kernel)


def launch_rows(kernel, tuned, grid_rows: int, *args, **meta):
    """Launch `kernel` with one program per row: autotuned on CUDA, fixed BLOCK_V when interpreted."""
    if triton_interpreted(kernel):
        kernel[(grid_rows,)](*args, BLOCK_V=BLOCK_V_INTERPRET, **meta)
    else:
        tuned[(grid_rows,)](*args, **meta)


# ----------------------------------------------------------------------------------------------------
# torch
def torch_chunk_log_softmax(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, inv_t: float, buf: torch.Tensor,
    with_entropy: bool, need_probs: bool, pbuf: torch.Tensor | None = None,
):
    """Log-softmax of one chunk, in place in `buf`.

    h: [c, D], w: [V, D] (both in buf's dtype), targets: [c], buf: [c, V] (overwritten),
    pbuf: [c, V] second buffer, needed when both entropy and probs are asked.
    Returns (logp [c], entropy [c] | None, probs [c, V] | None); probs live in buf or pbuf.
    """
    if inv_t != 1.0:
        h = h * inv_t
    torch.mm(h, w.t(), out=buf)
    torch.ops.aten._log_softmax.out(buf, 1, False, out=buf)
    logp = buf.gather(1, targets.view(-1, 1)).squeeze(1)
    ent = probs = None
    if with_entropy:
        p = torch.exp(buf, out=pbuf) if pbuf is not None else torch.exp(buf)
        ent = -torch.einsum("ij,ij->i", p, buf)  # batched dot products: no [c, V] temporary
        if need_probs:
            probs = p
    elif need_probs:
        probs = buf.exp_()
    return logp, ent, probs


# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """Log-probs of `targets` under softmax(hidden @ weight^T / temperature), without N x V memory.

    hidden: [N, D], weight: [V, D] (same dtype for the triton backend), targets: [N] int64.
    Returns logp [N] float32 (float64 for float64 inputs, torch backend), or (logp, entropy) when
    return_entropy. No autograd state is kept (for old / reference policies).
    """
    check_linear(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, hidden.device, _logprobs_kernel)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are managed here
        return _linear_logprobs(hidden, weight, targets, 1.0 / temperature, return_entropy, backend, chunk_size)


def _linear_logprobs(hidden, weight, targets, inv_t, return_entropy, backend, chunk_size):
    n, v = hidden.shape[0], weight.shape[0]
    out_dtype = compute_dtype(hidden, weight) if backend == "torch" else torch.float32
    logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
    ent = torch.empty(n if return_entropy else 0, dtype=out_dtype, device=hidden.device)

    if backend == "torch":
        cdt = out_dtype
        w = weight.to(cdt)
        c = chunk_size or choose_chunk_size(n, v, torch.finfo(cdt).bits // 8, hidden.device, 1 + return_entropy)
        buf = torch.empty(min(c, n), v, dtype=cdt, device=hidden.device)
        pbuf = torch.empty_like(buf) if return_entropy else None
        for s in range(0, n, c):
            e = min(s + c, n)
            lp, en, _ = torch_chunk_log_softmax(
                hidden[s:e].to(cdt), w, targets[s:e], inv_t, buf[: e - s], return_entropy, False,
                None if pbuf is None else pbuf[: e - s],
            )
            logp[s:e] = lp
            if return_entropy:
                ent[s:e] = en
    else:
        if hidden.dtype != weight.dtype:
            raise ValueError(f"triton backend needs hidden and weight of one dtype, got {hidden.dtype}, {weight.dtype}")
        c = chunk_size or choose_chunk_size(n, v, hidden.element_size(), hidden.device)
        buf = torch.empty(min(c, n), v, dtype=hidden.dtype, device=hidden.device)
        tgt = targets.contiguous()
        for s in range(0, n, c):
            e = min(s + c, n)
            z = torch.mm(hidden[s:e], weight.t(), out=buf[: e - s])
            launch_rows(
                _logprobs_kernel, _logprobs_kernel_tuned, e - s,
                z, z.stride(0), tgt[s:e], logp[s:e], ent[s:e] if return_entropy else ent, v, inv_t,
                WITH_ENTROPY=return_entropy,
            )
    return (logp, ent) if return_entropy else logp
