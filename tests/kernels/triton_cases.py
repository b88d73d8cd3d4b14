"""Triton-backend cases. Not collected by default (no test_ prefix): test_triton_backend.py runs this
file in a subprocess with TRITON_INTERPRET=1 on CPU (the variable must be set before triton is first
imported), or natively on CUDA. fp32 Triton vs the float64 reference; small shapes keep the
interpreter quick."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mrpo.algo.reference import reference_mrpo_loss
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs, mrpo_shaped_advantages
from mrpo_kernels.fused_mrpo_loss import _mrpo_loss_kernel
from mrpo_kernels.shaping import mrpo_shaped_advantage_tl
from mrpo_kernels.utils import triton_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_interpreted(_mrpo_loss_kernel):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before importing triton", allow_module_level=True)

AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@triton.jit
def _shaping_kernel(a_ptr, k_ptr, K_ptr, valid_ptr, correct_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m, other=0.0)
    k = tl.load(k_ptr + offs, mask=m, other=-1)
    K = tl.load(K_ptr + offs, mask=m, other=1)
    valid = tl.load(valid_ptr + offs, mask=m, other=0) != 0
    correct = tl.load(correct_ptr + offs, mask=m, other=0) != 0
    tl.store(out_ptr + offs, mrpo_shaped_advantage_tl(a, k, K, valid, correct), mask=m)


def test_triton_shaping_helper_matches_torch():
    g = torch.Generator().manual_seed(0)
    n = 1000
    K = torch.randint(1, 12, (n,), generator=g, dtype=torch.int32)
    k = (torch.rand(n, generator=g) * (K + 1)).int() - 1
    a = torch.randn(n, generator=g)
    a[::7] = 0
    valid, correct = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.3
    expected = mrpo_shaped_advantages(a, k, K, valid, correct)
    args = [x.to(DEVICE) for x in (a, k, K, valid.to(torch.int8), correct.to(torch.int8))]
    out = torch.empty(n, device=DEVICE)
    _shaping_kernel[(triton.cdiv(n, 256),)](*args, out, n, BLOCK=256)
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


@pytest.mark.parametrize("lens,V,D", [([1], 97, 16), ([5, 0, 7, 25], 257, 32)])  # 257: 3 tiles, last ragged
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("config", ["full", "plain"])
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
