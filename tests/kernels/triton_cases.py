"""Triton-backend cases. Not collected by default (no test_ prefix): test_triton_backend.py runs this
file in a subprocess with TRITON_INTERPRET=1 on CPU (the variable must be set before triton is first
imported), or natively on CUDA. fp32 Triton vs the float64 reference; small shapes keep the
interpreter quick."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mrpo.algo.reference import reference_mrpo_loss, reference_mrpo_loss_from_inputs
from mrpo_kernels import LossInputs, fused_linear_mrpo_loss, linear_logprobs, mrpo_loss, mrpo_shaped_advantages
from mrpo_kernels.fused_mrpo_loss import K3_MAX, _mrpo_loss_kernel
from mrpo_kernels.shaping import VALID_STEP_CREDITS, mrpo_shaped_advantage_tl
from mrpo_kernels.utils import triton_interpreted

from tests.kernels.conftest import as_inputs, extreme_batch, inputs_loss_and_grads
from tests.kernels.test_loss_bounds import KW as BOUNDS_KW, _unclamped_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_interpreted(_mrpo_loss_kernel):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before importing triton", allow_module_level=True)

AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@triton.jit
def _shaping_kernel(a_ptr, k_ptr, K_ptr, valid_ptr, correct_ptr, out_ptr, n, CREDIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0)
    k = tl.load(k_ptr + offs, mask=m, other=-1)
    K = tl.load(K_ptr + offs, mask=m, other=1)
    valid = tl.load(valid_ptr + offs, mask=m, other=0) != 0
    correct = tl.load(correct_ptr + offs, mask=m, other=0) != 0
    tl.store(out_ptr + offs, mrpo_shaped_advantage_tl(a, k, K, valid, correct, CREDIT), mask=m)


@pytest.mark.parametrize("credit", ["abs", "signed", "zero"])
def test_triton_shaping_helper_matches_torch(credit):
    g = torch.Generator().manual_seed(0)
    n = 1000
    K = torch.randint(1, 12, (n,), generator=g, dtype=torch.int32)
    k = (torch.rand(n, generator=g) * (K + 1)).int() - 1
    a = torch.randn(n, generator=g)
    a[::7] = 0
    valid, correct = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.3
    expected = mrpo_shaped_advantages(a, k, K, valid, correct, credit)
    args = [x.to(DEVICE) for x in (a, k, K, valid.to(torch.int8), correct.to(torch.int8))]
    out = torch.empty(n, device=DEVICE)
    _shaping_kernel[(triton.cdiv(n, 256),)](*args, out, n, CREDIT=VALID_STEP_CREDITS[credit], BLOCK=256)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("N,V,D", [(1, 97, 16), (37, 257, 32), (37, 97, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_linear_logprobs(N, V, D, temperature):
    g = torch.Generator().manual_seed(N * V)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    lp = torch.log_softmax(h @ w.T / temperature, -1)
    lp_ref, ent_ref = lp.gather(1, t[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)
    out, ent = linear_logprobs(h.float().to(DEVICE), w.float().to(DEVICE), t.to(DEVICE), temperature,
                               return_entropy=True, backend="triton", chunk_size=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ent_ref, rtol=1e-5, atol=1e-5)


# the aggregation is token weights computed in torch, identical for both backends: every aggregation
# once on the ragged shape (257: 3 tiles, last ragged), the rest for the two configurations
@pytest.mark.parametrize("lens,V,D,agg,config", [
    ([1], 97, 16, "seq-mean-token-mean", "full"),
    ([1], 97, 16, "token-mean", "plain"),
    *[([5, 0, 7, 25], 257, 32, agg, "full") for agg in AGGS],
    ([5, 0, 7, 25], 257, 32, "seq-mean-token-sum-norm", "plain"),
])
def test_triton_fused_loss_matches_reference(make_batch, run_loss, lens, V, D, agg, config):
    full = config == "full"
    temperature = 0.7 if full else 1.0
    b = make_batch(lens, V, D, temperature=temperature, seed=V + D)
    if not full:
        b["old_logprobs"] = b["ref_logprobs"] = None
    kw = dict(shaping="mrpo" if full else "none", beta=0.05 if full else 0.0, temperature=temperature,
              eps_low=0.2, eps_high=0.28, loss_agg=agg, max_completion_length=64, return_entropy=full)
    ref = run_loss(reference_mrpo_loss, b, **kw)
    b32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}
    loss, gh, gw, m = run_loss(fused_linear_mrpo_loss, b32, device=DEVICE, backend="triton", chunk_size=16, **kw)
    torch.testing.assert_close(loss.cpu().double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.cpu().double(), ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.cpu().double(), ref[2], rtol=1e-4, atol=1e-6)
    for key in ("logprobs", "shaped_advantages", "clip_fraction", "kl") + (("entropy",) if full else ()):
        torch.testing.assert_close(m[key].cpu().double(), ref[3][key].double(), rtol=1e-5, atol=1e-5,
                                   msg=lambda s: f"{key}: {s}")
    if full and sum(lens) > 1:
        assert ref[3]["clip_fraction"] > 0


def test_triton_empty_input_and_frozen_weight(make_batch):
    h = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(97, 16, device=DEVICE, requires_grad=True)
    e, ei = torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    eb = torch.zeros(0, dtype=torch.bool, device=DEVICE)
    loss, m = fused_linear_mrpo_loss(h, w, torch.zeros(0, dtype=torch.long, device=DEVICE), e, ei, ei, eb, eb,
                                     torch.tensor([0, 0], device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16) and torch.count_nonzero(w.grad) == 0

    b = make_batch([5, 9], 97, 16, dtype=torch.float32)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    hh = args.pop("hidden").requires_grad_(True)
    ww = args.pop("weight")
    loss, _ = fused_linear_mrpo_loss(hh, ww, **args, backend="triton")
    loss.backward()
    assert ww.grad is None and torch.count_nonzero(hh.grad) > 0


def _f32(b):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b.items()}


def _close_to_ref(out, ref, rtol=1e-4, atol=1e-6):
    for x, y in zip(out[:3], ref[:3]):
        torch.testing.assert_close(x.cpu().double(), y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("credit", ["signed", "zero"])
def test_triton_valid_step_credit_matches_reference(make_batch, credit):
    b = make_batch([5, 0, 7, 25], 97, 16, temperature=0.7, seed=9)
    kw = dict(beta=0.05, temperature=0.7, eps_low=0.2, eps_high=0.28, valid_step_credit=credit)
    ref = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, *as_inputs(b), **kw)
    out = inputs_loss_and_grads(mrpo_loss, *as_inputs(_f32(b), DEVICE), backend="triton", chunk_size=16, **kw)
    _close_to_ref(out, ref)
    torch.testing.assert_close(out[3]["shaped_advantages"].cpu().double(), ref[3]["shaped_advantages"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero_adv", [True, False])
def test_triton_extreme_log_ratios_are_finite_and_match_reference(zero_adv):
    b, u, v = extreme_batch([5, 0, 7, 25], 97, 16, zero_adv=zero_adv, seed=7)
    assert u.abs().max() > 88 and v.abs().max() > 50
    kw = dict(beta=0.05, eps_low=0.2, eps_high=0.28)
    ref = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, *as_inputs(b), **kw)
    out = inputs_loss_and_grads(mrpo_loss, *as_inputs(_f32(b), DEVICE), backend="triton", chunk_size=16, **kw)
    assert all(torch.isfinite(x).all() for x in out[:3])
    _close_to_ref(out, ref)
    torch.testing.assert_close(out[3]["kl"].cpu().double(), ref[3]["kl"], rtol=1e-5, atol=1e-6)


def test_triton_tokens_without_an_active_clamp_match_the_unclamped_formula():
    b, u, v = extreme_batch([5, 0, 7, 25], 97, 16, zero_adv=False, seed=8)
    live = (u.abs() <= 20) & (torch.exp(v) - v - 1 <= K3_MAX)
    assert live.any() and not live.all()
    w = live.double() / 37  # only the tokens where no clamp is active count
    hidden, weight, inp = as_inputs(_f32(b), DEVICE, token_weights=w.float().to(DEVICE))
    out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="triton", **BOUNDS_KW)
    h = b["hidden"].clone().requires_grad_(True)
    wt = b["weight"].clone().requires_grad_(True)
    expected = _unclamped_loss(h, wt, b, w)
    expected.backward()
    _close_to_ref(out, (expected.detach(), h.grad, wt.grad))


def test_triton_gradient_is_zero_where_a_clamp_is_active(make_batch):
    b = _f32(make_batch([4, 6], 97, 16, old_noise=None, ref_noise=None))
    hidden, weight, inp = as_inputs(b, DEVICE)
    with torch.no_grad():
        logp = mrpo_loss(hidden, weight, inp, backend="triton")[1]["logprobs"]
    sign = torch.where(torch.arange(10, device=DEVICE) % 2 == 0, 1.0, -1.0)
    clamped = LossInputs(**{**inp.__dict__, "advantages": torch.zeros_like(inp.advantages),
                            "old_logprobs": logp - 100 * sign, "ref_logprobs": logp + 60 * sign})
    loss, gh, gw, m = inputs_loss_and_grads(mrpo_loss, hidden, weight, clamped, backend="triton", beta=0.1)
    assert loss.item() == pytest.approx(0.1 * K3_MAX, rel=1e-6) and m["kl"].item() == pytest.approx(K3_MAX, rel=1e-6)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_triton_token_weights_and_grad_output(make_batch):
    """token weights honoured as in the reference; loss * 3.7 backward == weights * 3.7 with
    unit_grad_output == 3.7 x the reference gradients."""
    b = make_batch([5, 0, 7, 25], 97, 16, seed=2)
    w = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(beta=0.05, eps_low=0.2, eps_high=0.28)
    ref = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, *as_inputs(b, token_weights=w), **kw)
    hidden, weight, inp = as_inputs(_f32(b), DEVICE, token_weights=w.float().to(DEVICE))
    out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="triton", **kw)
    _close_to_ref(out, ref)
    inp37 = LossInputs(**{**inp.__dict__, "token_weights": 3.7 * inp.token_weights})
    folded = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp37, backend="triton", unit_grad_output=True,
                                   validate=False, **kw)
    # fused_linear_mrpo_loss, the thin wrapper: in-batch weights, loss * 3.7 scaled on backward
    wrapped = inputs_loss_and_grads(
        lambda h, wt, i, **k: fused_linear_mrpo_loss(h, wt, i.targets, i.advantages, i.step_index, i.num_steps,
                                                     i.step_valid, i.answer_correct, i.cu_seqlens, i.old_logprobs,
                                                     i.ref_logprobs, **k),
        hidden, weight, inp, backend="triton", grad_scale=3.7, **kw)
    ref_in_batch = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, *as_inputs(b), **kw)
    torch.testing.assert_close(wrapped[0].cpu().double(), ref_in_batch[0], rtol=1e-5, atol=1e-6)
    for o, r in ((wrapped, ref_in_batch), (folded, ref)):
        torch.testing.assert_close(o[1].cpu().double(), 3.7 * r[1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(o[2].cpu().double(), 3.7 * r[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(folded[0].cpu().double(), 3.7 * ref[0], rtol=1e-5, atol=1e-6)
    assert not any(v.requires_grad for v in out[3].values())
