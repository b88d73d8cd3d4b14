"""linear_logprobs (torch backend on CPU, Triton on CUDA when present) against a direct float64
log_softmax over the full logits. The Triton backend on CPU runs in test_triton_backend.py."""
from __future__ import annotations

import pytest
import torch

from mrpo_kernels import linear_logprobs
from mrpo_kernels.linear_logprobs import _logprobs_kernel
from mrpo_kernels.utils import choose_chunk_size, triton_interpreted


def _direct(h, w, t, temperature):
    logits = h.double() @ w.double().T / temperature
    lp = torch.log_softmax(logits, -1)
    return lp.gather(1, t[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("N,V,D", [(1, 97, 16), (37, 4099, 64), (1000, 97, 16), (1000, 4099, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 33])
def test_torch_backend_matches_log_softmax_fp64(N, V, D, temperature, chunk_size):
    g = torch.Generator().manual_seed(N + V)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    lp_ref, ent_ref = _direct(h, w, t, temperature)
    lp, ent = linear_logprobs(h, w, t, temperature, return_entropy=True, backend="torch", chunk_size=chunk_size)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-10, atol=1e-12)
    lp_only = linear_logprobs(h, w, t, temperature, backend="torch", chunk_size=chunk_size)
    torch.testing.assert_close(lp_only, lp_ref, rtol=1e-10, atol=1e-12)


def test_fp32_and_bf16_inputs_give_fp32_without_graph():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 32, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(257, 32, generator=g) * 0.3).bfloat16().requires_grad_(True)
    t = torch.randint(0, 257, (37,), generator=g)
    lp = linear_logprobs(h, w, t)
    assert lp.dtype == torch.float32 and not lp.requires_grad
    torch.testing.assert_close(lp, _direct(h, w, t, 1.0)[0].float(), rtol=1e-5, atol=1e-5)
    lp32 = linear_logprobs(h.float(), w.float(), t, 0.5)
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32, _direct(h, w, t, 0.5)[0].float(), rtol=1e-5, atol=1e-5)


def test_empty_and_errors():
    w = torch.randn(97, 8)
    lp, ent = linear_logprobs(torch.zeros(0, 8), w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.randn(3, 8), w, torch.tensor([0, 5, 97]))
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(torch.randn(3, 4), w, torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(torch.randn(3, 8), w, torch.tensor([0, 5, 9]), temperature=0.0)
    if not triton_interpreted(_logprobs_kernel):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            linear_logprobs(torch.randn(3, 8), w, torch.tensor([0, 5, 9]), backend="triton")


def test_chunk_size_choice_bounded_by_budget():
    cpu = torch.device("cpu")
    assert choose_chunk_size(0, 97, 4, cpu) == 1
    assert choose_chunk_size(5, 97, 4, cpu) == 5  # never more rows than N
    c = choose_chunk_size(10**6, 151936, 4, cpu)
    assert 16 <= c and c % 16 == 0 and c * 151936 * 4 <= 128 * 2**20
    assert choose_chunk_size(10**6, 151936, 4, cpu, buffers=2) <= c // 2 + 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("V", [4099, 151936, 151643])
def test_gpu_triton_matches_fp64(V):
    g = torch.Generator().manual_seed(V)
    h = torch.randn(777, 128, generator=g)
    w = torch.randn(V, 128, generator=g) * 0.1
    t = torch.randint(0, V, (777,), generator=g)
    lp_ref, ent_ref = _direct(h, w, t, 0.7)
    lp, ent = linear_logprobs(h.cuda(), w.cuda(), t.cuda(), 0.7, return_entropy=True, backend="triton")
    # fp32 inputs: cuBLAS may use TF32 only if enabled globally; tolerances cover fp32 GEMM rounding
    torch.testing.assert_close(lp.cpu().double(), lp_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.cpu().double(), ent_ref, rtol=1e-4, atol=1e-4)
    lp16 = linear_logprobs(h.cuda().bfloat16(), w.cuda().bfloat16(), t.cuda(), 0.7, backend="triton")
    lp16_ref = _direct(h.bfloat16(), w.bfloat16(), t, 0.7)[0]
    assert (lp16.cpu().double() - lp16_ref).abs().max() < 0.1  # bf16 logits rounding only
