"""LossInputs: the packed per-token inputs of the fused MRPO loss, and a thin wrapper taking them.
(Interim version; the kernel branch replaces it.)"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .fused_mrpo_loss import FusedLinearMRPOFunction, _fused_forward, _mrpo_loss_kernel, fused_linear_mrpo_loss
from .utils import resolve_backend


@dataclass
class LossInputs:
    targets: torch.Tensor
    advantages: torch.Tensor
    step_index: torch.Tensor
    num_steps: torch.Tensor
    step_valid: torch.Tensor
    answer_correct: torch.Tensor
    cu_seqlens: torch.Tensor
    token_weights: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def to(self, device) -> "LossInputs":
        return LossInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


def step_token_weights(lengths, loss_agg, *, total_tokens, total_seqs, max_completion_length, scale=1.0):
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    n = int(lengths.sum())
    if loss_agg == "token-mean":
        per_seq = torch.full(lengths.shape, 1.0 / max(total_tokens, 1), dtype=torch.float64)
    elif loss_agg == "seq-mean-token-mean":
        per_seq = 1.0 / (lengths.clamp_min(1).double() * max(total_seqs, 1))
    else:
        per_seq = torch.full(lengths.shape, 1.0 / (max(total_seqs, 1) * max_completion_length), dtype=torch.float64)
    return (per_seq * scale).float().repeat_interleave(lengths, output_size=n)


def mrpo_loss(hidden, weight, inputs: LossInputs, *, eps_low=0.2, eps_high=0.2, beta=0.0, temperature=1.0,
              loss_agg="seq-mean-token-mean", max_completion_length=None, shaping="mrpo", valid_step_credit="abs",
              backend="auto", chunk_size=None, return_entropy=False):
    if inputs.token_weights is None:
        return fused_linear_mrpo_loss(
            hidden, weight, inputs.targets, inputs.advantages, inputs.step_index, inputs.num_steps,
            inputs.step_valid, inputs.answer_correct, inputs.cu_seqlens, inputs.old_logprobs, inputs.ref_logprobs,
            eps_low=eps_low, eps_high=eps_high, beta=beta, temperature=temperature, loss_agg=loss_agg,
            max_completion_length=max_completion_length, shaping=shaping, backend=backend,
            chunk_size=chunk_size, return_entropy=return_entropy)
    backend = resolve_backend(backend, hidden.device, _mrpo_loss_kernel)
    kwargs = dict(
        targets=inputs.targets, advantages=inputs.advantages, step_index=inputs.step_index,
        num_steps=inputs.num_steps, step_valid=inputs.step_valid, answer_correct=inputs.answer_correct,
        tokw=inputs.token_weights,
        old_logprobs=None if inputs.old_logprobs is None else inputs.old_logprobs.detach(),
        ref_logprobs=None if inputs.ref_logprobs is None else inputs.ref_logprobs.detach(),
        eps_low=eps_low, eps_high=eps_high, beta=beta, inv_t=1.0 / temperature, shaping=shaping,
        backend=backend, chunk_size=chunk_size, return_entropy=return_entropy,
    )
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            metrics = {}
            loss = FusedLinearMRPOFunction.apply(hidden, weight, kwargs, metrics)
        else:
            with torch.no_grad():
                loss, metrics, _, _ = _fused_forward(hidden, weight, **kwargs, need_grad_hidden=False,
                                                     need_grad_weight=False)
    return loss, metrics
