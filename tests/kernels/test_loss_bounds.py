"""Bounded numerics of the fused loss (torch backend; the Triton twin runs in triton_cases.py): with
logp - old in [-200, 200] and ref - logp in [-80, 80], A = 0 and A != 0, the loss and both gradients
are finite and equal to the reference; where no clamp is active they equal the unclamped formula;
where a clamp is active the gradient is zero."""
from __future__ import annotations

import pytest
import torch

from mrpo.algo.reference import reference_mrpo_loss
from mrpo_kernels import LossInputs, fused_linear_mrpo_loss, mrpo_loss, mrpo_shaped_advantages
from mrpo_kernels.fused_mrpo_loss import K3_MAX, LOG_RATIO_MAX
from mrpo_kernels.loss_inputs import token_weights

from .conftest import as_inputs, extreme_batch, inputs_loss_and_grads

KW = dict(beta=0.05, eps_low=0.2, eps_high=0.28)


def _to32(b):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}


def _finite(out):
    loss, gh, gw, _ = out
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("zero_adv", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_log_ratios_are_finite_and_match_the_reference(run_loss, zero_adv, dtype):
    b, u, v = extreme_batch([5, 0, 7, 25], 97, 16, zero_adv=zero_adv, seed=7)
    assert u.abs().max() > 88 and v.max() > 50 and v.min() < -50
    ref = run_loss(reference_mrpo_loss, b, **KW)  # float64, clamped the same way
    _finite(ref)
    out = run_loss(fused_linear_mrpo_loss, b if dtype == torch.float64 else _to32(b), backend="torch",
                   chunk_size=16, **KW)
    _finite(out)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for x, y in zip(out[:3], ref[:3]):
        torch.testing.assert_close(x.double(), y, **tol)
    torch.testing.assert_close(out[3]["kl"].double(), ref[3]["kl"], **tol)
    assert ref[3]["kl"] <= K3_MAX


def _unclamped_loss(hidden, weight, b, tokw):
    """The loss without any clamp, sum_t w_t l_t over full float64 logits."""
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, b["targets"][:, None]).squeeze(1)
    a = mrpo_shaped_advantages(b["advantages"], b["step_index"], b["num_steps"], b["step_valid"], b["answer_correct"])
    r = torch.exp(logp - b["old_logprobs"])
    d = b["ref_logprobs"] - logp
    l_t = -torch.min(r * a, r.clamp(0.8, 1.28) * a) + KW["beta"] * (torch.exp(d) - d - 1)
    return (l_t * tokw).sum()


@pytest.mark.parametrize("zero_adv", [True, False])
def test_tokens_without_an_active_clamp_match_the_unclamped_formula(zero_adv):
    b, u, v = extreme_batch([5, 0, 7, 25], 97, 16, zero_adv=zero_adv, seed=8)
    live = (u.abs() <= LOG_RATIO_MAX) & (torch.exp(v) - v - 1 <= K3_MAX)
    assert live.any() and not live.all()
    hidden, weight, inp = as_inputs(b)
    w = token_weights(inp.cu_seqlens.long(), inp.num_tokens, "seq-mean-token-mean", None, torch.float64)
    inp.token_weights = w * live  # only the tokens where no clamp is active count
    out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", **KW)
    h = hidden.clone().requires_grad_(True)
    wt = weight.clone().requires_grad_(True)
    expected = _unclamped_loss(h, wt, b, inp.token_weights)
    expected.backward()
    torch.testing.assert_close(out[0], expected.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out[1], h.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out[2], wt.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_is_zero_where_a_clamp_is_active(make_batch, dtype):
    b = make_batch([4, 6], 97, 16, dtype=dtype, old_noise=None, ref_noise=None)
    hidden, weight, inp = as_inputs(b)
    with torch.no_grad():
        logp = mrpo_loss(hidden, weight, inp, backend="torch")[1]["logprobs"]
    sign = torch.where(torch.arange(10) % 2 == 0, 1.0, -1.0).to(logp.dtype)
    # every ratio clamped (|logp - old| = 100 > 88: inf in fp32 without the clamp), no KL term
    inp.old_logprobs = logp - 100 * sign
    for adv in (torch.zeros_like(inp.advantages), inp.advantages):
        inp.advantages = adv
        loss, gh, gw, m = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch")
        assert torch.isfinite(loss) and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
        ref = reference_mrpo_loss(hidden, weight, **{k: getattr(inp, k) for k in b if k not in ("hidden", "weight")})
        torch.testing.assert_close(loss, ref[0].to(loss.dtype), rtol=1e-6, atol=0)
    # A = 0, every k3 clamped (ref - logp = +-60): loss = beta * K3_MAX * sum(w) = beta * K3_MAX, no gradient
    inp = LossInputs(**{**inp.__dict__, "advantages": torch.zeros_like(inp.advantages), "old_logprobs": None,
                        "ref_logprobs": logp + 60 * sign})
    loss, gh, gw, m = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", beta=0.1)
    assert loss.item() == pytest.approx(0.1 * K3_MAX, rel=1e-6)
    assert m["kl"].item() == pytest.approx(K3_MAX, rel=1e-6)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
