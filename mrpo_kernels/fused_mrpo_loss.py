"""Fused linear + MRPO loss: log-probs, step-wise shaping, clipped surrogate, k3 KL and the gradients
wrt hidden and weight in one pass over chunked logits. Never allocates N x V.

Per token t (logits z = hidden @ weight^T / T, logp = log_softmax(z)[target]):
    A_hat = MRPO(A, k, K, valid, correct)   (shaping.py; A when shaping="none")
    x     = clamp(logp - old, -20, 20)       (old = logp detached when None: x = 0, gradient kept)
    r     = exp(x)
    d     = clamp(ref - logp, -20, 20)
    k3    = clamp(exp(d) - d - 1, -10, 10)   (0 when ref is None)
    l_t   = -min(r * A_hat, clip(r, 1 - eps_low, 1 + eps_high) * A_hat) + beta * k3
    loss  = sum_t w_t * l_t
w_t are the per-token weights (loss_inputs.py): LossInputs.token_weights when given (normalised over
a whole optimizer step, scale folded in), else the in-batch weights of loss_agg:
    "seq-mean-token-mean"     1 / (len(seq) * B')        (B' = number of non-empty sequences)
    "token-mean"              1 / N
    "seq-mean-token-sum-norm" 1 / (max_completion_length * B')   (Dr.GRPO)

Bounds (the ones verl's compute_policy_loss and kl_penalty("low_var_kl") use): fp32 exp overflows
above 88.7, so with A_hat = 0 and logp - old > 88 the ratio is inf and inf * 0 = NaN in the loss and
both gradients; ref - logp = 60 gives k3 ~ 1e26. Clamping the log-ratio to [-20, 20] keeps r within
[2e-9, 4.9e8] (finite in fp32, and far outside any clip range, so clipping decisions do not change);
clamping k3 to [-10, 10] (k3 >= 0, so effectively <= 10, reached at ref - logp ~ -11 or ~ 2.6) keeps
one token from dominating the KL term. Gradients follow autograd of clamp: zero wherever a clamp is
active (bounds inclusive), in the torch twin, the Triton kernel and the reference loss alike.

Because every l_t depends only on its own row's logits, the gradient is known as soon as the row's
logsumexp is: dL/dlogp_t = g_t = w_t * (-r A_hat [0 where clipping or the ratio clamp is active]
+ beta * (1 - exp(d)) [0 where a KL clamp is active]), dL/dlogits = g_t * (onehot(target) - softmax) / T.
So forward computes the gradients wrt hidden and weight chunk by chunk (as Liger's fused linear
cross-entropy does) and backward returns them, scaled by grad_output unless the caller promises a
unit grad_output (mrpo_loss(unit_grad_output=True): the loss scale is then folded into the token
weights and backward does nothing but return). About 3 GEMMs of 2 N D V FLOPs in all.

Backends (rows processed in chunks of `chunk_size`, logits buffer [chunk, V] reused):
- torch (CPU training path; fp32 accumulation, fp64 for fp64 inputs): GEMM into the buffer, in-place
  log-softmax, exp -> probs; then grad_hidden = (g/T) * (W[target] - P @ W) and
  grad_weight += P^T @ (-(g/T) h) plus an index_add of (g/T) h at the target rows: the [chunk, V] matrix
  is never rescaled, row factors are applied to [chunk, D] operands instead.
- triton (CUDA; CPU under TRITON_INTERPRET=1 in fp32): the logits GEMM and the two gradient GEMMs are
  cuBLAS calls in the input dtype (fp32 accumulation); one Triton program per row streams over vocab
  tiles for the online logsumexp, computes the shaping, ratio, clipped loss, KL and g_t in fp32 and
  overwrites the row with dL/dlogits = g_t (onehot - softmax) / T (the Liger-FLCE design). For bf16 /
  fp16 inputs the weight gradient accumulates in an fp32 [V, D] buffer through addmm with an fp32
  output dtype (torch >= 2.8 on sm80+), so no per-chunk [V, D] temporary is allocated.
  Block sizes are autotuned on CUDA; the interpreter uses one fixed tile.
No host synchronisation happens per call in mrpo_loss(validate=False) with token weights given.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .linear_logprobs import AUTOTUNE_CONFIGS, launch_rows, row_logsumexp_tl, torch_chunk_log_softmax
from .loss_inputs import LOSS_AGGS, LossInputs, token_weights
from .shaping import credit_code, mrpo_shaped_advantage_tl, mrpo_shaped_advantages
from .utils import check_linear, check_rows, choose_chunk_size, compute_dtype, resolve_backend

SHAPINGS = ("mrpo", "none")
LOG_RATIO_MAX = 20.0  # |logp - old| and |ref - logp| are clamped to this (verl)
K3_MAX = 10.0  # the k3 KL estimate is clamped to [-K3_MAX, K3_MAX] (verl's low_var_kl)


# ----------------------------------------------------------------------------------------------------
# per-token terms: torch twin and Triton helper
def ppo_token_terms(logp, ahat, old, ref, eps_low: float, eps_high: float, beta: float):
    """Clipped surrogate + beta * k3 KL per token and its derivative wrt logp (all [c]), with the
    clamps of the module docstring. old=None means old = logp (ratio 1).
    Returns (loss_t, dloss_dlogp, clipped bool, kl or None)."""
    if old is None:
        ratio = torch.ones_like(logp)
        ratio_clamped = None
    else:
        x = logp - old
        ratio = torch.exp(x.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
        ratio_clamped = (x < -LOG_RATIO_MAX) | (x > LOG_RATIO_MAX)
    clipped = ((ahat > 0) & (ratio > 1 + eps_high)) | ((ahat < 0) & (ratio < 1 - eps_low))
    loss = -torch.minimum(ratio * ahat, ratio.clamp(1 - eps_low, 1 + eps_high) * ahat)
    no_grad = clipped if ratio_clamped is None else clipped | ratio_clamped
    dlogp = torch.where(no_grad, torch.zeros_like(ratio), -ratio * ahat)
    kl = None
    if ref is not None:
        d = ref - logp
        dc = d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        ed = torch.exp(dc)
        k3 = ed - dc - 1
        kl = k3.clamp(-K3_MAX, K3_MAX)
        live = (d >= -LOG_RATIO_MAX) & (d <= LOG_RATIO_MAX) & (k3 >= -K3_MAX) & (k3 <= K3_MAX)
        loss = loss + beta * kl
        dlogp = dlogp + beta * torch.where(live, 1 - ed, torch.zeros_like(ed))
    return loss, dlogp, clipped, kl


@triton.jit
def ppo_token_terms_tl(logp, old, a, ref, eps_low, eps_high, beta,
                       LOG_RATIO_MAX: tl.constexpr, K3_MAX: tl.constexpr):
    """Triton twin of `ppo_token_terms` for one token (fp32). Returns (loss, dloss_dlogp, clipped, kl).
    Pass old = logp for ratio 1 and ref = logp for no KL (the KL terms are then exactly 0)."""
    x = logp - old
    ratio = tl.exp(tl.minimum(tl.maximum(x, -LOG_RATIO_MAX), LOG_RATIO_MAX))
    ratio_clamped = (x < -LOG_RATIO_MAX) | (x > LOG_RATIO_MAX)
    clipped = ((a > 0) & (ratio > 1 + eps_high)) | ((a < 0) & (ratio < 1 - eps_low))
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1 - eps_low), 1 + eps_high)
    d = ref - logp
    dc = tl.minimum(tl.maximum(d, -LOG_RATIO_MAX), LOG_RATIO_MAX)
    ed = tl.exp(dc)
    k3 = ed - dc - 1.0
    kl = tl.minimum(tl.maximum(k3, -K3_MAX), K3_MAX)
    kl_live = (d >= -LOG_RATIO_MAX) & (d <= LOG_RATIO_MAX) & (k3 >= -K3_MAX) & (k3 <= K3_MAX)
    loss = -tl.minimum(ratio * a, clipped_ratio * a) + beta * kl
    dlogp = tl.where(clipped | ratio_clamped, 0.0, -ratio * a) + beta * tl.where(kl_live, 1.0 - ed, 0.0)
    return loss, dlogp, clipped, kl


@triton.jit
def _mrpo_loss_kernel(
    logits_ptr, stride_row, targets_ptr,
    adv_ptr, step_ptr, nsteps_ptr, valid_ptr, correct_ptr, tokw_ptr, old_ptr, ref_ptr,
    logp_ptr, ent_ptr, loss_ptr, ahat_ptr, clip_ptr, kl_ptr,
    V, inv_t, eps_low, eps_high, beta,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, SHAPING: tl.constexpr, VALID_CREDIT: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    LOG_RATIO_MAX: tl.constexpr, K3_MAX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row of a [C, V] logits chunk (raw hidden @ W^T, any float dtype).

    Writes per-token logp, entropy, unweighted loss, A_hat, clipped flag, kl (fp32) and, with
    COMPUTE_GRAD, overwrites the row with dL/dlogits = w_t g_t (onehot - softmax) / T.
    """
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * stride_row
    lse, ent = row_logsumexp_tl(x_ptr, V, inv_t, BLOCK_V, WITH_ENTROPY)
    tgt = tl.load(targets_ptr + row)
    logp = tl.load(x_ptr + tgt).to(tl.float32) * inv_t - lse

    a = tl.load(adv_ptr + row).to(tl.float32)
    if SHAPING:
        a = mrpo_shaped_advantage_tl(
            a, tl.load(step_ptr + row), tl.load(nsteps_ptr + row),
            tl.load(valid_ptr + row) != 0, tl.load(correct_ptr + row) != 0, VALID_CREDIT,
        )
    old = logp
    if HAS_OLD:
        old = tl.load(old_ptr + row).to(tl.float32)
    ref = logp
    if HAS_REF:
        ref = tl.load(ref_ptr + row).to(tl.float32)
    loss, dlogp, clipped, kl = ppo_token_terms_tl(logp, old, a, ref, eps_low, eps_high, beta, LOG_RATIO_MAX, K3_MAX)

    tl.store(logp_ptr + row, logp)
    tl.store(loss_ptr + row, loss)
    tl.store(ahat_ptr + row, a)
    tl.store(clip_ptr + row, clipped.to(tl.int8))
    if HAS_REF:
        tl.store(kl_ptr + row, kl)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, ent)

    if COMPUTE_GRAD:
        gs = dlogp * tl.load(tokw_ptr + row).to(tl.float32) * inv_t
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            p = tl.exp(z - lse)
            d = tl.where(offs == tgt, gs - gs * p, -gs * p)
            tl.store(x_ptr + offs, d.to(x_ptr.dtype.element_ty), mask=mask)


_mrpo_loss_kernel_tuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["V", "WITH_ENTROPY", "COMPUTE_GRAD"], restore_value=["logits_ptr"]
)(_mrpo_loss_kernel)


# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _addmm_fp32_out_supported(device: torch.device) -> bool:
    """True where torch.addmm(..., out_dtype=torch.float32) runs on bf16/fp16 operands: the
    aten::addmm.dtype_out kernel (torch >= 2.8) exists for CUDA only, and cuBLAS needs sm80+."""
    if device.type != "cuda" or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def accumulate_grad_weight(grad_w: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [V, D] += z^T [V, c] @ h [c, D], in place.

    With an fp32 grad_w and bf16/fp16 z, h the product is accumulated by cuBLAS in fp32 straight into
    grad_w (no [V, D] temporary in the input dtype, no rounding of each chunk's product to bf16);
    where that is unsupported, a per-chunk product in the input dtype is added (correct, one temporary).
    """
    if grad_w.dtype == z.dtype:
        grad_w.addmm_(z.t(), h)
    elif (grad_w.dtype == torch.float32 and z.dtype in (torch.bfloat16, torch.float16)
          and _addmm_fp32_out_supported(z.device)):
        torch.addmm(grad_w, z.t(), h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.add_(torch.mm(z.t(), h))


def _fused_forward(
    hidden, weight, inputs: LossInputs, tokw, *, eps_low, eps_high, beta, inv_t, shaping, credit, backend,
    chunk_size, return_entropy, need_grad_hidden, need_grad_weight,
):
    """(loss, logp [N], A_hat [N], clip_fraction, kl mean, entropy [N] or [0], grad_hidden [N, D] | None,
    grad_weight [V, D] | None); gradients in the inputs' dtypes, already multiplied by w_t."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_grad = need_grad_hidden or need_grad_weight
    grad_h = grad_w = None
    targets = inputs.targets
    old_logprobs, ref_logprobs = inputs.old_logprobs, inputs.ref_logprobs

    if backend == "torch":
        cdt = compute_dtype(hidden, weight)
        w = weight.to(cdt)
        tokw = tokw.to(cdt)
        if shaping == "mrpo":
            ahat = mrpo_shaped_advantages(
                inputs.advantages, inputs.step_index, inputs.num_steps, inputs.step_valid, inputs.answer_correct,
                credit,
            ).to(cdt)
        else:
            ahat = inputs.advantages.to(dtype=cdt, copy=True)  # a copy: metrics must not alias an input
        old = None if old_logprobs is None else old_logprobs.detach().to(cdt)
        ref = None if ref_logprobs is None else ref_logprobs.detach().to(cdt)
        logp = torch.empty(n, dtype=cdt, device=dev)
        ent = torch.empty(n if return_entropy else 0, dtype=cdt, device=dev)
        loss_t = torch.empty(n, dtype=cdt, device=dev)
        clipped = torch.empty(n, dtype=torch.bool, device=dev)
        kl = torch.zeros(n if ref is not None else 0, dtype=cdt, device=dev)
        if need_grad_hidden:
            grad_h = torch.empty(n, d, dtype=cdt, device=dev)
        if need_grad_weight:
            grad_w = torch.zeros(v, d, dtype=cdt, device=dev)
        nbuf = 1 + (return_entropy and need_grad)
        c = chunk_size or choose_chunk_size(n, v, torch.finfo(cdt).bits // 8, dev, nbuf)
        buf = torch.empty(min(c, n), v, dtype=cdt, device=dev)
        pbuf = torch.empty_like(buf) if nbuf == 2 else None
        for s in range(0, n, c):
            e = min(s + c, n)
            h_c, tgt = hidden[s:e].to(cdt), targets[s:e]
            lp, en, probs = torch_chunk_log_softmax(
                h_c, w, tgt, inv_t, buf[: e - s], return_entropy, need_grad, None if pbuf is None else pbuf[: e - s]
            )
            l, dl, clp, k = ppo_token_terms(
                lp, ahat[s:e], None if old is None else old[s:e], None if ref is None else ref[s:e],
                eps_low, eps_high, beta,
            )
            logp[s:e], loss_t[s:e], clipped[s:e] = lp, l, clp
            if return_entropy:
                ent[s:e] = en
            if k is not None:
                kl[s:e] = k
            if need_grad:
                gs = (dl * tokw[s:e] * inv_t).unsqueeze(1)  # dL/dlogits = gs * (onehot - p)
                if need_grad_hidden:
                    gh = grad_h[s:e]
                    torch.mm(probs, w, out=gh)
                    gh.sub_(w[tgt]).mul_(-gs)
                if need_grad_weight:
                    hs = h_c * gs
                    grad_w.addmm_(probs.t(), hs, alpha=-1.0)
                    grad_w.index_add_(0, tgt, hs)
        loss = (loss_t * tokw).sum()
    else:
        if hidden.dtype != weight.dtype:
            raise ValueError(f"triton backend needs hidden and weight of one dtype, got {hidden.dtype}, {weight.dtype}")
        f32 = torch.float32
        i8 = torch.int8
        logp = torch.empty(n, dtype=f32, device=dev)
        ent = torch.empty(n if return_entropy else 0, dtype=f32, device=dev)
        loss_t = torch.empty(n, dtype=f32, device=dev)
        ahat = torch.empty(n, dtype=f32, device=dev)
        clipped = torch.empty(n, dtype=i8, device=dev)
        kl = torch.zeros(n if ref_logprobs is not None else 0, dtype=f32, device=dev)
        adv = inputs.advantages.to(f32).contiguous()
        step = inputs.step_index.to(torch.int32).contiguous()
        nsteps = inputs.num_steps.to(torch.int32).contiguous()
        valid = inputs.step_valid.to(i8).contiguous()
        correct = inputs.answer_correct.to(i8).contiguous()
        tokw32 = tokw.to(f32).contiguous()
        old = logp if old_logprobs is None else old_logprobs.detach().to(f32).contiguous()
        ref = logp if ref_logprobs is None else ref_logprobs.detach().to(f32).contiguous()
        tgts = targets.contiguous()
        if need_grad_hidden:
            grad_h = torch.empty(n, d, dtype=hidden.dtype, device=dev)
        if need_grad_weight:
            grad_w = torch.zeros(v, d, dtype=torch.promote_types(weight.dtype, f32), device=dev)
        c = chunk_size or choose_chunk_size(n, v, hidden.element_size(), dev)
        buf = torch.empty(min(c, n), v, dtype=hidden.dtype, device=dev)
        for s in range(0, n, c):
            e = min(s + c, n)
            h_c = hidden[s:e]
            z = torch.mm(h_c, weight.t(), out=buf[: e - s])
            launch_rows(
                _mrpo_loss_kernel, _mrpo_loss_kernel_tuned, e - s,
                z, z.stride(0), tgts[s:e],
                adv[s:e], step[s:e], nsteps[s:e], valid[s:e], correct[s:e], tokw32[s:e], old[s:e], ref[s:e],
                logp[s:e], ent[s:e] if return_entropy else ent, loss_t[s:e], ahat[s:e], clipped[s:e],
                kl[s:e] if ref_logprobs is not None else kl,
                v, inv_t, eps_low, eps_high, beta,
                HAS_OLD=old_logprobs is not None, HAS_REF=ref_logprobs is not None, SHAPING=shaping == "mrpo",
                VALID_CREDIT=credit_code(credit), WITH_ENTROPY=return_entropy, COMPUTE_GRAD=need_grad,
                LOG_RATIO_MAX=LOG_RATIO_MAX, K3_MAX=K3_MAX,
            )
            if need_grad_hidden:  # z now holds dL/dlogits
                torch.mm(z, weight, out=grad_h[s:e])
            if need_grad_weight:
                accumulate_grad_weight(grad_w, z, h_c)
        loss = (loss_t * tokw32).sum()
        clipped = clipped.bool()

    clip_fraction = clipped.sum().to(loss.dtype) / max(n, 1)
    kl_mean = kl.sum() / max(n, 1)
    if grad_h is not None:
        grad_h = grad_h.to(hidden.dtype)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return loss, logp, ahat, clip_fraction, kl_mean, ent, grad_h, grad_w


class FusedLinearMRPOFunction(torch.autograd.Function):
    """Runs `_fused_forward` with gradients. Outputs (loss, logprobs, shaped_advantages, clip_fraction,
    kl, entropy); all but the loss are non-differentiable. Backward returns the stored gradients, times
    grad_output on the device unless `unit_grad_output` (then untouched)."""

    @staticmethod
    def forward(ctx, hidden, weight, inputs: LossInputs, tokw, unit_grad_output: bool, opts: dict):
        loss, *metrics, grad_h, grad_w = _fused_forward(
            hidden, weight, inputs, tokw, **opts,
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.unit_grad_output = unit_grad_output
        ctx.mark_non_differentiable(*metrics)
        return (loss, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_metric_grads):
        grad_h, grad_w = ctx.saved_tensors
        if not ctx.unit_grad_output:  # on the device: no comparison with 1 read back to the host
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


_METRIC_NAMES = ("logprobs", "shaped_advantages", "clip_fraction", "kl", "entropy")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n: int, check_values: bool = True) -> torch.Tensor:
    """cu_seqlens as int64; with check_values also 0 = cu[0] <= ... <= cu[-1] = n (host sync on CUDA)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [B+1], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    cu = cu_seqlens.long()
    if check_values and (int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu.diff() < 0).any())):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at N={n}; got {cu_seqlens.tolist()[:8]}"
            f"{'...' if cu.numel() > 8 else ''} (last {int(cu[-1])})"
        )
    return cu


def mrpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    inputs: LossInputs,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "seq-mean-token-mean",
    max_completion_length: int | None = None,
    shaping: str = "mrpo",
    valid_step_credit: str = "abs",
    backend: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    unit_grad_output: bool = False,
    validate: bool = True,
):
    """MRPO loss over packed completion tokens, fused with the lm_head; never materialises N x V.

    hidden: [N, D] bf16/fp16/fp32/fp64 (row t predicts inputs.targets[t]); weight: [V, D] (no bias);
    inputs: LossInputs of the N tokens (loss_inputs.py); ref_logprobs required when beta > 0.
    loss = sum_t w_t l_t with w_t = inputs.token_weights when given (then loss_agg and
    max_completion_length are not used), else the in-batch weights of loss_agg (module docstring).
    shaping: "mrpo" | "none"; valid_step_credit: "abs" | "signed" | "zero" (shaping.py).
    unit_grad_output: the caller backpropagates this loss itself (loss.backward(), any scale already
    in token_weights), so backward returns the stored gradients untouched; with False, backward
    multiplies them by grad_output on the device. validate=False skips the checks that read tensor
    values back to the host (target ids in range, cu_seqlens monotone): no host sync per call.

    Returns (loss, metrics): loss is a scalar (fp32; fp64 for fp64 inputs on the torch backend) with
    autograd to hidden and weight; metrics (detached): "logprobs" [N], "shaped_advantages" [N],
    "clip_fraction" (share of tokens where clipping is active), "kl" (mean clamped k3 KL over tokens,
    0 without ref_logprobs) and "entropy" [N] when return_entropy.
    """
    if not isinstance(inputs, LossInputs):
        raise TypeError(f"inputs must be a LossInputs, got {type(inputs).__name__}")
    check_linear(hidden, weight, inputs.targets, check_values=validate)
    n = hidden.shape[0]
    for name, t in inputs.per_token().items():
        check_rows(name, t, n, hidden.device)
    if shaping not in SHAPINGS:
        raise ValueError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
    credit_code(valid_step_credit)
    if beta > 0 and inputs.ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (reference-policy log-probs [N])")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, hidden.device, _mrpo_loss_kernel)
    wdt = compute_dtype(hidden, weight) if backend == "torch" else torch.float32
    if inputs.token_weights is not None:
        if validate:
            _check_cu_seqlens(inputs.cu_seqlens, n)
        tokw = inputs.token_weights.detach()
    else:
        if loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
        if loss_agg == "seq-mean-token-sum-norm" and not (max_completion_length and max_completion_length > 0):
            raise ValueError("loss_agg='seq-mean-token-sum-norm' (Dr.GRPO) needs max_completion_length > 0")
        cu = _check_cu_seqlens(inputs.cu_seqlens.to(hidden.device), n, check_values=validate)
        tokw = token_weights(cu, n, loss_agg, max_completion_length, wdt)

    opts = dict(
        eps_low=eps_low, eps_high=eps_high, beta=beta, inv_t=1.0 / temperature, shaping=shaping,
        credit=valid_step_credit, backend=backend, chunk_size=chunk_size, return_entropy=return_entropy,
    )
    # dtypes are managed here (fp32 accumulation); an enclosing autocast must not recast the GEMMs
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss, *metrics = FusedLinearMRPOFunction.apply(hidden, weight, inputs, tokw, unit_grad_output, opts)
        else:
            with torch.no_grad():
                loss, *metrics, _, _ = _fused_forward(
                    hidden, weight, inputs, tokw, **opts, need_grad_hidden=False, need_grad_weight=False
                )
    out = dict(zip(_METRIC_NAMES, metrics))
    if not return_entropy:
        del out["entropy"]
    return loss, out


def fused_linear_mrpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    step_index: torch.Tensor,
    num_steps: torch.Tensor,
    step_valid: torch.Tensor,
    answer_correct: torch.Tensor,
    cu_seqlens: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "seq-mean-token-mean",
    max_completion_length: int | None = None,
    shaping: str = "mrpo",
    backend: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """MRPO loss over packed completion tokens, fused with the lm_head; never materialises N x V.
    `mrpo_loss` with the tensors of LossInputs as arguments, in-batch weights of loss_agg, the paper's
    valid-step credit ("abs") and full input validation.

    hidden: [N, D] bf16/fp16/fp32/fp64 (row t predicts targets[t]); weight: [V, D] (no bias);
    targets: [N] int64; advantages: [N] float (A_i of the token's sequence); step_index: [N] int
    (0-based step k, -1 outside steps); num_steps: [N] int (K); step_valid, answer_correct: [N] bool;
    cu_seqlens: [B+1] int sequence boundaries; old_logprobs / ref_logprobs: [N] float or None
    (ref required when beta > 0). See the module docstring for the loss and the aggregations.

    Returns (loss, metrics): loss is a scalar (fp32; fp64 for fp64 inputs on the torch backend) with
    autograd to hidden and weight; metrics (detached): "logprobs" [N], "shaped_advantages" [N],
    "clip_fraction" (share of tokens where clipping is active), "kl" (mean clamped k3 KL over tokens,
    0 without ref_logprobs) and "entropy" [N] when return_entropy.
    """
    inputs = LossInputs(
        targets=targets, advantages=advantages, step_index=step_index, num_steps=num_steps,
        step_valid=step_valid, answer_correct=answer_correct, cu_seqlens=cu_seqlens,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
    )
    return mrpo_loss(
        hidden, weight, inputs, eps_low=eps_low, eps_high=eps_high, beta=beta, temperature=temperature,
        loss_agg=loss_agg, max_completion_length=max_completion_length, shaping=shaping, backend=backend,
        chunk_size=chunk_size, return_entropy=return_entropy,
    )
