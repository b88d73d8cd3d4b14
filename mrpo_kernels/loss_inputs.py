"""The per-token inputs of the MRPO loss as one dataclass, and the per-token loss weights.

The loss is a weighted sum over the packed completion tokens of a micro-batch, loss = sum_t w_t l_t.
The weights carry the aggregation ("loss_agg") and every scale factor, so that the loss of each
micro-batch already is its exact share of the optimizer step's loss:

    "token-mean"               w_t = scale / total_tokens                      (DAPO)
    "seq-mean-token-mean"      w_t = scale / (len_i * total_seqs)              (GRPO)
    "seq-mean-token-sum-norm"  w_t = scale / (total_seqs * max_completion_length)   (Dr.GRPO)

total_tokens / total_seqs count the tokens / non-empty sequences of the whole optimizer step (all
micro-batches of all data-parallel ranks); scale is typically the data-parallel world size, because
the gradient all-reduce averages over ranks. `token_weights` is the special case of one micro-batch
normalised on its own (totals of this batch, scale 1), used when LossInputs.token_weights is None.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@dataclass
class LossInputs:
    """Packed completion tokens of B sequences, N tokens in all (one row of hidden per token).

    targets: [N] int64 token ids; advantages: [N] float32, A_i of the token's sequence;
    step_index: [N] int32, 0-based reasoning step k, -1 outside steps; num_steps: [N] int32, K of the
    token's sequence; step_valid: [N] bool; answer_correct: [N] bool (R_ans > tau);
    cu_seqlens: [B+1] int64 sequence boundaries (0 = cu[0] <= ... <= cu[B] = N);
    token_weights: [N] float32 w_t with loss = sum_t w_t l_t (`step_token_weights`), or None for the
    in-batch weights of `loss_agg`; old_logprobs / ref_logprobs: [N] float log-probs of the behaviour
    / reference policy, or None (old None: ratio 1; ref None: no KL term).
    """

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

    @property
    def num_tokens(self) -> int:
        """N, the number of packed tokens."""
        return self.targets.shape[0]

    @property
    def num_seqs(self) -> int:
        """B, the number of sequences (zero-length ones included)."""
        return self.cu_seqlens.shape[0] - 1

    def to(self, device, non_blocking: bool = False) -> "LossInputs":
        """A copy with every tensor on `device` (dtypes unchanged)."""
        return replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self) if getattr(self, f.name) is not None
        })

    def per_token(self) -> dict:
        """The [N] tensors by name (None entries left out): what the row checks iterate over."""
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if f.name != "cu_seqlens" and getattr(self, f.name) is not None
        }


def _weights(lengths, loss_agg, total_tokens, total_seqs, max_completion_length, scale, dtype, n):
    """Per-sequence weight repeated over its tokens; totals may be numbers or 0-dim tensors (no sync)."""
    if loss_agg == "token-mean":
        per_seq = (scale / total_tokens) * torch.ones(lengths.shape, dtype=dtype, device=lengths.device)
    elif loss_agg == "seq-mean-token-mean":
        per_seq = scale / (lengths.clamp_min(1).to(dtype) * total_seqs)
    elif loss_agg == "seq-mean-token-sum-norm":
        per_seq = (scale / (float(max_completion_length) * total_seqs)) * torch.ones(
            lengths.shape, dtype=dtype, device=lengths.device)
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    return per_seq.to(dtype).repeat_interleave(lengths, output_size=n)


def step_token_weights(
    lengths: torch.Tensor,
    loss_agg: str,
    *,
    total_tokens: int,
    total_seqs: int,
    max_completion_length: int | None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights [sum(lengths)] of one micro-batch, normalised over a whole optimizer step.

    lengths: [B] int completion lengths of this micro-batch's sequences (zero allowed: they get no
    tokens, so they contribute nothing); total_tokens: tokens in the optimizer step (all micro-batches,
    all ranks); total_seqs: non-empty sequences in the step; max_completion_length: needed by
    "seq-mean-token-sum-norm"; scale: multiplies every weight (pass the data-parallel world size when
    the gradient reduction averages over ranks). Returns `dtype` weights on lengths.device; see the
    module docstring for the formulas. The sum of the weights over all micro-batches of all ranks is
    `scale` for "token-mean" and "seq-mean-token-mean".
    """
    if lengths.dim() != 1 or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be a 1-D integer tensor [B], got {tuple(lengths.shape)} {lengths.dtype}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    n = int(lengths.sum())
    if n and bool((lengths < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()[:8]}")
    if n and (total_tokens < n or total_seqs < int((lengths > 0).sum())):
        raise ValueError(
            f"total_tokens={total_tokens} / total_seqs={total_seqs} count the whole optimizer step and cannot "
            f"be below this micro-batch's {n} tokens / {int((lengths > 0).sum())} non-empty sequences"
        )
    if loss_agg == "seq-mean-token-sum-norm" and not (max_completion_length and max_completion_length > 0):
        raise ValueError("loss_agg='seq-mean-token-sum-norm' (Dr.GRPO) needs max_completion_length > 0")
    return _weights(lengths, loss_agg, max(total_tokens, 1), max(total_seqs, 1), max_completion_length,
                    float(scale), dtype, n)


def token_weights(cu_seqlens: torch.Tensor, n: int, loss_agg: str, max_completion_length, dtype) -> torch.Tensor:
    """[N] in-batch weights: `step_token_weights` with the totals of this batch alone and scale 1.
    The non-empty-sequence count stays a device tensor, so no host sync happens here."""
    lengths = cu_seqlens.diff()
    n_seqs = (lengths > 0).sum().clamp_min(1).to(dtype)
    return _weights(lengths, loss_agg, max(n, 1), n_seqs, max_completion_length, 1.0, dtype, n)


__all__ = ["LOSS_AGGS", "LossInputs", "step_token_weights", "token_weights"]
