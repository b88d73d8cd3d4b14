"""Plain-PyTorch MRPO loss: the readable definition every fused kernel is tested against.

It materialises the full logits [N, V] (in the inputs' dtype upcast to at least float32) and lets
autograd differentiate a direct transcription of the loss:
    logp_t = log_softmax(hidden @ weight^T / T)[t, target_t]
    A_hat  = MRPO shaping (mrpo_kernels.shaping, with valid_step_credit) or A when shaping="none"
    r_t    = exp(clamp(logp_t - old_t, -20, 20))    (old = logp detached when not given)
    l_t    = -min(r_t A_hat_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_hat_t) + beta * k3_t,
    k3_t   = clamp(exp(d_t) - d_t - 1, -10, 10),  d_t = clamp(ref_t - logp_t, -20, 20)
(the bounds of verl's compute_policy_loss / kl_penalty("low_var_kl"): see mrpo_kernels.fused_mrpo_loss),
aggregated with the token weights when given (loss = sum_t w_t l_t), else per sequence with an
explicit loop over cu_seqlens:
    "seq-mean-token-mean"      mean over sequences of the token mean (zero-length sequences skipped)
    "token-mean"               mean over all tokens (DAPO)
    "seq-mean-token-sum-norm"  mean over non-empty sequences of token sum / max_completion_length (Dr.GRPO)
Memory is N x V: use it for tests and small benchmarks only.
"""
from __future__ import annotations

import torch

from mrpo_kernels.fused_mrpo_loss import K3_MAX, LOG_RATIO_MAX
from mrpo_kernels.loss_inputs import LOSS_AGGS, LossInputs
from mrpo_kernels.shaping import mrpo_shaped_advantages


def reference_mrpo_loss(
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
    valid_step_credit: str = "abs",
    token_weights: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """Same arguments and returns as mrpo_kernels.fused_linear_mrpo_loss (minus backend/chunk_size),
    plus valid_step_credit and token_weights ([N] w_t: loss = sum_t w_t l_t; None: loss_agg).

    hidden: [N, D], weight: [V, D]; logits computed in promote(dtype, float32) (float64 stays float64).
    Returns (loss scalar with autograd, metrics dict as the fused op).
    """
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return reference_mrpo_loss_from_logits(
        logits, targets, advantages, step_index, num_steps, step_valid, answer_correct, cu_seqlens,
        old_logprobs, ref_logprobs, eps_low=eps_low, eps_high=eps_high, beta=beta, temperature=temperature,
        loss_agg=loss_agg, max_completion_length=max_completion_length, shaping=shaping,
        valid_step_credit=valid_step_credit, token_weights=token_weights, return_entropy=return_entropy,
    )


def reference_mrpo_loss_from_inputs(hidden: torch.Tensor, weight: torch.Tensor, inputs: LossInputs, **kwargs):
    """The reference loss with the arguments of mrpo_kernels.mrpo_loss: (hidden, weight, LossInputs,
    eps_low=, eps_high=, beta=, temperature=, loss_agg=, max_completion_length=, shaping=,
    valid_step_credit=, return_entropy=); backend, chunk_size, unit_grad_output and validate are
    accepted and ignored. Honours inputs.token_weights."""
    for k in ("backend", "chunk_size", "unit_grad_output", "validate"):
        kwargs.pop(k, None)
    return reference_mrpo_loss(
        hidden, weight, inputs.targets, inputs.advantages, inputs.step_index, inputs.num_steps,
        inputs.step_valid, inputs.answer_correct, inputs.cu_seqlens, inputs.old_logprobs, inputs.ref_logprobs,
        token_weights=inputs.token_weights, **kwargs,
    )


def reference_mrpo_loss_from_logits(
    logits: torch.Tensor,
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
    valid_step_credit: str = "abs",
    token_weights: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """The reference loss from raw logits [N, V] (computed in the logits' dtype); see reference_mrpo_loss."""
    if token_weights is None and loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if shaping not in ("mrpo", "none"):
        raise ValueError(f"shaping must be 'mrpo' or 'none', got {shaping!r}")
    if token_weights is None and loss_agg == "seq-mean-token-sum-norm" and not max_completion_length:
        raise ValueError("loss_agg='seq-mean-token-sum-norm' (Dr.GRPO) needs max_completion_length")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs")
    n = logits.shape[0]
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must go from 0 to N={n} without decreasing, got {cu}")
    dtype = logits.dtype

    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs_all.gather(1, targets.view(-1, 1)).squeeze(1)
    if shaping == "mrpo":
        ahat = mrpo_shaped_advantages(
            advantages, step_index, num_steps, step_valid, answer_correct, valid_step_credit
        ).to(dtype)
    else:
        ahat = advantages.to(dtype)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_MAX, LOG_RATIO_MAX))
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * ahat, clipped_ratio * ahat)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        delta = torch.clamp(ref_logprobs.to(dtype) - logp, -LOG_RATIO_MAX, LOG_RATIO_MAX)
        kl = torch.clamp(torch.exp(delta) - delta - 1, -K3_MAX, K3_MAX)
        per_token = per_token + beta * kl

    if token_weights is not None:
        loss = (per_token * token_weights.to(dtype)).sum()
    elif loss_agg == "token-mean":
        loss = per_token.sum() / max(n, 1)
    else:
        seq_losses = []
        for s, e in zip(cu, cu[1:]):
            if e == s:
                continue
            seg = per_token[s:e]
            seq_losses.append(seg.mean() if loss_agg == "seq-mean-token-mean" else seg.sum() / max_completion_length)
        loss = torch.stack(seq_losses).mean() if seq_losses else per_token.sum() * 0.0

    active = ((ahat > 0) & (ratio > 1 + eps_high)) | ((ahat < 0) & (ratio < 1 - eps_low))
    metrics = {
        "logprobs": logp.detach(),
        "shaped_advantages": ahat.detach(),
        "clip_fraction": active.to(dtype).sum() / max(n, 1),
        "kl": kl.detach().sum() / max(n, 1),
    }
    if return_entropy:
        metrics["entropy"] = -(logprobs_all.exp() * logprobs_all).sum(-1).detach()
    return loss, metrics
