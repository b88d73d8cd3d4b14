"""Shared builders for the kernel tests: random packed MRPO batches covering every shaping branch."""
from __future__ import annotations

import pytest
import torch


def build_batch(lens, V, D, *, dtype=torch.float64, seed=0, temperature=1.0, old_noise=0.5, ref_noise=0.2):
    """Packed batch of len(lens) sequences (zero lengths allowed) in `dtype` on CPU.

    Covers: right and wrong answers, K = 1 and K > 1, tokens outside steps (first and, for longer
    sequences, last token), valid and invalid steps, A > 0, A < 0 and (for B >= 3) A = 0.
    old/ref log-probs are the true log-probs plus Gaussian noise (so clipping fires on both sides);
    None when the noise is None.
    """
    g = torch.Generator().manual_seed(seed)
    B, N = len(lens), sum(lens)
    lengths = torch.tensor(lens, dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    seq_adv = torch.randn(B, generator=g, dtype=torch.float64)
    if B >= 3:
        seq_adv[2] = 0.0
    seq_correct = torch.arange(B) % 3 == 1
    seq_k = torch.randint(1, 7, (B,), generator=g)
    seq_k[0] = 1 if B > 1 else seq_k[0]
    step_index = torch.full((N,), -1, dtype=torch.int32)
    for b in range(B):
        s, L = int(cu[b]), lens[b]
        K = int(seq_k[b])
        body = range(1, L - 1) if L >= 4 else range(L)
        for j, pos in enumerate(body):
            step_index[s + pos] = min(K - 1, j * K // max(1, len(body)))
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    batch = dict(
        hidden=hidden.to(dtype), weight=weight.to(dtype), targets=targets,
        advantages=seq_adv.repeat_interleave(lengths, output_size=N),
        step_index=step_index,
        num_steps=seq_k.to(torch.int32).repeat_interleave(lengths, output_size=N),
        step_valid=torch.rand(N, generator=g) < 0.5,
        answer_correct=seq_correct.repeat_interleave(lengths, output_size=N),
        cu_seqlens=cu,
        old_logprobs=None if old_noise is None else logp + old_noise * torch.randn(N, generator=g, dtype=torch.float64),
        ref_logprobs=None if ref_noise is None else logp + ref_noise * torch.randn(N, generator=g, dtype=torch.float64),
    )
    if dtype != torch.float64:
        for k in ("advantages", "old_logprobs", "ref_logprobs"):
            if batch[k] is not None:
                batch[k] = batch[k].float()
    return batch


def loss_and_grads(fn, batch, *, device="cpu", weight_grad=True, **kwargs):
    """Run fn(**batch, **kwargs), backward; returns (loss, grad_hidden, grad_weight, metrics)."""
    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    b["hidden"] = b["hidden"].detach().clone().requires_grad_(True)
    b["weight"] = b["weight"].detach().clone().requires_grad_(weight_grad)
    loss, metrics = fn(**b, **kwargs)
    loss.backward()
    return loss.detach(), b["hidden"].grad, b["weight"].grad, metrics


def extreme_batch(lens, V, D, *, zero_adv: bool, seed=0):
    """build_batch whose old / ref log-probs are far from the current ones: logp - old uniform in
    [-200, 200] and ref - logp in [-80, 80] on every other token, small (|.| < 3) on the rest, so both
    clamped and unclamped tokens are present. Returns (batch, log_ratio = logp - old, ref_gap = ref - logp)."""
    b = build_batch(lens, V, D, seed=seed, old_noise=None, ref_noise=None)
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(lens)
    with torch.no_grad():
        logp = torch.log_softmax(b["hidden"] @ b["weight"].T, -1).gather(1, b["targets"][:, None]).squeeze(1)
    small = torch.arange(n) % 2 == 0
    u = torch.where(small, 6 * torch.rand(n, generator=g, dtype=torch.float64) - 3,
                    400 * torch.rand(n, generator=g, dtype=torch.float64) - 200)
    v = torch.where(small, 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2,
                    160 * torch.rand(n, generator=g, dtype=torch.float64) - 80)
    if n >= 4:  # the reported failures: A = 0 with logp - old > 88 (fp32 exp overflow); ref - logp = 60
        u[1], v[3] = 100.0, 60.0
    b.update(old_logprobs=logp - u, ref_logprobs=logp + v)
    if zero_adv:
        b["advantages"] = torch.zeros_like(b["advantages"])
    return b, u, v


def as_inputs(batch, device="cpu", **overrides):
    """(hidden, weight, LossInputs) of a build_batch dict, on `device`; overrides replace fields."""
    from mrpo_kernels import LossInputs

    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    hidden, weight = b.pop("hidden"), b.pop("weight")
    return hidden, weight, LossInputs(**{**b, **overrides})


def inputs_loss_and_grads(fn, hidden, weight, inputs, *, weight_grad=True, grad_scale=None, **kwargs):
    """fn(hidden, weight, inputs, **kwargs) on fresh leaf copies, backward of the loss (times grad_scale
    when given); returns (loss, grad_hidden, grad_weight, metrics)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_grad)
    loss, metrics = fn(h, w, inputs, **kwargs)
    (loss if grad_scale is None else loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.fixture
def make_batch():
    return build_batch


@pytest.fixture
def run_loss():
    return loss_and_grads
