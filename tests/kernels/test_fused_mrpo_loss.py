"""fused_linear_mrpo_loss (torch backend on CPU; Triton on CUDA when present) against the plain-PyTorch
reference in float64, against Liger-Kernel's GRPO loss, and on edge cases.
The Triton backend on CPU (TRITON_INTERPRET=1) is exercised by test_triton_backend.py."""
from __future__ import annotations

import pytest
import torch

from mrpo.algo.reference import reference_mrpo_loss, reference_mrpo_loss_from_inputs, reference_mrpo_loss_from_logits
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs, mrpo_loss
from mrpo_kernels.fused_mrpo_loss import _addmm_fp32_out_supported, _mrpo_loss_kernel, accumulate_grad_weight
from mrpo_kernels.utils import triton_interpreted

from .conftest import as_inputs, inputs_loss_and_grads

AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
SHAPES = [  # (sequence lengths, V, D): N = 1, 37, 1000; zero-length sequences inside
    ([1], 97, 16),
    ([5, 0, 7, 25], 97, 16),
    ([5, 0, 7, 25], 4099, 64),
    ([300, 0, 200, 500], 4099, 16),
    ([300, 0, 200, 500], 97, 64),
]
FULL = dict(shaping="mrpo", beta=0.05, temperature=0.7, eps_low=0.2, eps_high=0.28, return_entropy=True)
PLAIN = dict(shaping="none", beta=0.0, temperature=1.0)
METRICS = ("logprobs", "shaped_advantages", "clip_fraction", "kl")


def _assert_same(a, b, rtol, atol, metrics=METRICS):
    (la, gha, gwa, ma), (lb, ghb, gwb, mb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gha, ghb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gwa, gwb, rtol=rtol, atol=atol)
    for k in metrics:
        torch.testing.assert_close(ma[k], mb[k].to(ma[k].dtype), rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# every aggregation on every shape except the largest (N = 1000, V = 4099: the slowest on 2 cores),
# which gets one aggregation per configuration; the weights are the same code for every shape
CASES = [(*shape, agg, config) for shape in SHAPES for agg in AGGS for config in ("full", "plain")
         if shape[1] * sum(shape[0]) < 10**6 or agg == {"full": AGGS[0], "plain": AGGS[1]}[config]]


@pytest.mark.parametrize("lens,V,D,agg,config", CASES)
def test_torch_backend_matches_reference_fp64(make_batch, run_loss, lens, V, D, agg, config):
    cfg = FULL if config == "full" else PLAIN
    batch = make_batch(lens, V, D, temperature=cfg["temperature"], seed=len(lens) + V + D)
    if config == "plain":  # old = current (ratio 1), no KL
        batch["old_logprobs"] = batch["ref_logprobs"] = None
    kw = dict(cfg, loss_agg=agg, max_completion_length=600)
    ref = run_loss(reference_mrpo_loss, batch, **kw)
    chunk = None if sum(lens) < 16 else 16 if sum(lens) < 100 else 96  # ragged last chunk vs one chunk
    out = run_loss(fused_linear_mrpo_loss, batch, backend="torch", chunk_size=chunk, **kw)
    _assert_same(out, ref, rtol=1e-9, atol=1e-12, metrics=METRICS + (("entropy",) if config == "full" else ()))
    assert out[0].dtype == torch.float64 and out[1].dtype == torch.float64
    if config == "full" and sum(lens) >= 37:  # the test really exercises both clipping sides
        r = torch.exp(ref[3]["logprobs"] - batch["old_logprobs"])
        a = ref[3]["shaped_advantages"]
        assert ((a > 0) & (r > 1.28)).any() and ((a < 0) & (r < 0.8)).any()
        assert not torch.equal(a, batch["advantages"])  # shaping changed some tokens


@pytest.mark.parametrize("credit", ["abs", "signed", "zero"])
def test_valid_step_credit_matches_reference_fp64(make_batch, credit):
    batch = make_batch([5, 0, 7, 25, 9], 97, 16, temperature=0.7, seed=9)
    hidden, weight, inp = as_inputs(batch)
    kw = dict(FULL, valid_step_credit=credit)
    ref = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, hidden, weight, inp, **kw)
    out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", chunk_size=16, **kw)
    _assert_same(out, ref, rtol=1e-9, atol=1e-12, metrics=METRICS + ("entropy",))
    a, ahat = batch["advantages"], ref[3]["shaped_advantages"]
    target = ~batch["answer_correct"] & (batch["step_index"] >= 0) & batch["step_valid"]
    assert ((a < 0) & target).any()  # the case the variants differ on is present
    expected = {"abs": a.abs(), "signed": a, "zero": torch.zeros_like(a)}[credit]
    assert torch.equal(ahat[target], expected[target])


def test_weight_grad_accumulation_fallback_matches_fp32():
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(33, 97, generator=g).bfloat16(), torch.randn(33, 16, generator=g).bfloat16()
    grad_w = torch.ones(97, 16)
    assert not _addmm_fp32_out_supported(z.device)  # CPU: the per-chunk product path
    accumulate_grad_weight(grad_w, z, h)
    accumulate_grad_weight(grad_w, z, h)
    expected = 1 + 2 * (z.t().double() @ h.double())
    assert grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w.double(), expected, rtol=2e-2, atol=2e-2)  # bf16 rounding of each product
    same = torch.zeros(97, 16, dtype=torch.float64)
    accumulate_grad_weight(same, z.double(), h.double())
    torch.testing.assert_close(same, z.t().double() @ h.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_weight_grad_accumulates_in_fp32_without_a_bf16_temporary():
    g = torch.Generator(device="cuda").manual_seed(0)
    V, D, c = 32768, 1024, 256
    z = torch.randn(c, V, device="cuda", generator=g).bfloat16()
    h = torch.randn(c, D, device="cuda", generator=g).bfloat16()
    grad_w = torch.zeros(V, D, device="cuda")
    assert _addmm_fp32_out_supported(grad_w.device)
    accumulate_grad_weight(grad_w, z, h)  # warm-up: cuBLAS workspace allocated outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        accumulate_grad_weight(grad_w, z, h)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < V * D  # a bf16 [V, D] temporary is 2 V D bytes
    exact = 4 * (z.t().double() @ h.double())
    err = ((grad_w.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-5, err  # fp32 accumulation; bf16 products would be ~1e-3


@pytest.mark.parametrize("loss_type,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dr_grpo", "seq-mean-token-sum-norm")])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_matches_liger_grpo_without_shaping(make_batch, run_loss, loss_type, agg, beta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    lens, T, temp = [6, 4, 2, 5], 8, 0.7
    b = make_batch(lens, 97, 16, dtype=torch.float32, temperature=temp, seed=3)
    B, D = len(lens), 16
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]  # [B, T] right padding
    x = torch.zeros(B, T, D)
    ids = torch.zeros(B, T, dtype=torch.long)
    old = torch.zeros(B, T)
    refl = torch.zeros(B, T)
    x[mask], ids[mask], old[mask], refl[mask] = b["hidden"], b["targets"], b["old_logprobs"], b["ref_logprobs"]
    seq_adv = b["advantages"][b["cu_seqlens"][:-1].long()]

    liger = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=1, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=T, temperature=temp,
    )
    x.requires_grad_(True)
    w = b["weight"].clone().requires_grad_(True)
    l_loss, l_metrics = liger(x, w, ids, mask.float(), seq_adv, ref_per_token_logps=refl if beta else None,
                              old_per_token_logps=old)
    l_loss.backward()

    if beta == 0:
        b["ref_logprobs"] = None
    loss, gh, gw, m = run_loss(fused_linear_mrpo_loss, b, shaping="none", beta=beta, temperature=temp, eps_low=0.2,
                               eps_high=0.28, loss_agg=agg, max_completion_length=T, backend="torch")
    torch.testing.assert_close(loss, l_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, x.grad[mask], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["clip_fraction"], l_metrics[-1], rtol=1e-6, atol=1e-7)
    assert m["clip_fraction"] > 0
    if beta:
        torch.testing.assert_close(m["kl"], l_metrics[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cu", [[0], [0, 0, 0]])
def test_empty_input_gives_zero_loss_and_zero_grads(cu):
    D, V = 8, 97
    h = torch.zeros(0, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    e = torch.zeros(0)
    ei = torch.zeros(0, dtype=torch.int32)
    eb = torch.zeros(0, dtype=torch.bool)
    for agg in AGGS:
        loss, m = fused_linear_mrpo_loss(h, w, torch.zeros(0, dtype=torch.long), e, ei, ei, eb, eb,
                                         torch.tensor(cu, dtype=torch.int32), loss_agg=agg,
                                         max_completion_length=4, backend="torch")
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert h.grad.shape == (0, D) and torch.count_nonzero(w.grad) == 0
        assert m["clip_fraction"].item() == 0.0 and m["kl"].item() == 0.0 and m["logprobs"].shape == (0,)


def test_zero_advantages_give_zero_loss_and_grads(make_batch, run_loss):
    b = make_batch([5, 9, 3], 97, 16)
    b["advantages"] = torch.zeros_like(b["advantages"])
    loss, gh, gw, m = run_loss(fused_linear_mrpo_loss, b, backend="torch")
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert torch.count_nonzero(m["shaped_advantages"]) == 0 and m["clip_fraction"].item() == 0


def test_tokens_outside_steps_keep_plain_advantage(make_batch, run_loss):
    b = make_batch([5, 9, 3], 97, 16)
    b["step_index"] = torch.full_like(b["step_index"], -1)
    b["answer_correct"] = torch.zeros_like(b["answer_correct"])
    shaped = run_loss(fused_linear_mrpo_loss, b, backend="torch", shaping="mrpo")
    plain = run_loss(fused_linear_mrpo_loss, b, backend="torch", shaping="none")
    _assert_same(shaped, plain, rtol=0, atol=0)


def test_backward_scales_by_grad_output_and_frozen_weight(make_batch):
    b = make_batch([5, 9, 3], 97, 16)
    args = {k: v for k, v in b.items() if k not in ("hidden", "weight")}
    h1 = b["hidden"].clone().requires_grad_(True)
    w1 = b["weight"].clone().requires_grad_(True)
    loss1, _ = fused_linear_mrpo_loss(h1, w1, **args, beta=0.1, backend="torch")
    (-3.0 * loss1).backward()
    h2 = b["hidden"].clone().requires_grad_(True)
    w2 = b["weight"].clone()  # frozen lm_head: no weight gradient is computed
    loss2, _ = fused_linear_mrpo_loss(h2, w2, **args, beta=0.1, backend="torch")
    loss2.backward()
    torch.testing.assert_close(h1.grad, -3.0 * h2.grad, rtol=1e-12, atol=0)
    assert w2.grad is None and w1.grad is not None
    with torch.no_grad():  # no-grad path: same loss and metrics, no graph
        loss3, m3 = fused_linear_mrpo_loss(h2, w2, **args, beta=0.1, backend="torch")
    assert loss3.grad_fn is None
    torch.testing.assert_close(loss3, loss2.detach(), rtol=1e-12, atol=0)


def test_enclosing_autocast_does_not_change_the_math(make_batch, run_loss):
    b = make_batch([5, 9, 3], 97, 16, dtype=torch.float32)
    plain = run_loss(fused_linear_mrpo_loss, b, backend="torch", beta=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run_loss(fused_linear_mrpo_loss, b, backend="torch", beta=0.1)
        lp = linear_logprobs(b["hidden"], b["weight"], b["targets"])
    _assert_same(cast, plain, rtol=0, atol=0)
    torch.testing.assert_close(lp, plain[3]["logprobs"], rtol=0, atol=0)


def test_bf16_inputs_on_torch_backend(make_batch, run_loss):
    b = make_batch([5, 0, 7, 25], 4099, 64, dtype=torch.float32, seed=5)
    b["hidden"], b["weight"] = b["hidden"].bfloat16(), b["weight"].bfloat16()
    out = run_loss(fused_linear_mrpo_loss, b, backend="torch", beta=0.05, chunk_size=8)
    ref = run_loss(reference_mrpo_loss, b, beta=0.05)  # fp32 math on the same bf16 values
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16 and out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[3]["logprobs"], ref[3]["logprobs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-2, atol=1e-5)  # only the final bf16 rounding differs
    torch.testing.assert_close(out[2], ref[2], rtol=1e-2, atol=1e-5)


def test_input_errors(make_batch):
    b = make_batch([3, 4], 97, 8)
    b["ref_logprobs"] = None
    with pytest.raises(ValueError, match="ref_logprobs"):
        fused_linear_mrpo_loss(**b, beta=0.1, backend="torch")
    with pytest.raises(ValueError, match="max_completion_length"):
        fused_linear_mrpo_loss(**b, loss_agg="seq-mean-token-sum-norm", backend="torch")
    with pytest.raises(ValueError, match="loss_agg"):
        fused_linear_mrpo_loss(**b, loss_agg="sum", backend="torch")
    with pytest.raises(ValueError, match="shaping"):
        fused_linear_mrpo_loss(**b, shaping="gdpo", backend="torch")
    with pytest.raises(ValueError, match="backend"):
        fused_linear_mrpo_loss(**b, backend="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_mrpo_loss(**dict(b, cu_seqlens=torch.tensor([0, 3, 6])), backend="torch")
    with pytest.raises(ValueError, match="step_valid"):
        fused_linear_mrpo_loss(**dict(b, step_valid=b["step_valid"][:-1]), backend="torch")
    with pytest.raises(ValueError, match="targets"):
        fused_linear_mrpo_loss(**dict(b, targets=b["targets"] + 97), backend="torch")
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_mrpo_loss(**dict(b, weight=b["weight"][:, :4]), backend="torch")
    if not triton_interpreted(_mrpo_loss_kernel):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused_linear_mrpo_loss(**b, backend="triton")


def _rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lens,V,D", [([300, 0, 200, 500], 4099, 128), ([700, 300, 1000], 151936, 256)])
@pytest.mark.parametrize("agg", AGGS)
def test_gpu_bf16_triton_error_within_2x_of_bf16_torch(make_batch, run_loss, lens, V, D, agg):
    b = make_batch(lens, V, D, dtype=torch.float32, temperature=0.7, seed=11)
    kw = dict(FULL, loss_agg=agg, max_completion_length=1024)
    kw.pop("return_entropy")
    b16 = dict(b, hidden=b["hidden"].bfloat16(), weight=b["weight"].bfloat16())
    exact = run_loss(reference_mrpo_loss, b, device="cuda", **kw)  # fp32 reference on fp32 inputs

    def bf16_torch(hidden, weight, **rest):  # the usual bf16 path: bf16 logits, fp32 loss math
        return reference_mrpo_loss_from_logits((hidden @ weight.T).float(), **rest)

    naive = run_loss(bf16_torch, b16, device="cuda", **kw)
    fused = run_loss(fused_linear_mrpo_loss, b16, device="cuda", backend="triton", **kw)
    for i, name in ((0, "loss"), (1, "grad_hidden"), (2, "grad_weight")):
        e_fused, e_naive = _rel_err(fused[i], exact[i]), _rel_err(naive[i], exact[i])
        assert e_fused <= 2 * e_naive + 1e-6, f"{name}: fused {e_fused:.3e} vs bf16 torch {e_naive:.3e}"
    e_fused = _rel_err(fused[3]["logprobs"], exact[3]["logprobs"])
    assert e_fused <= 2 * _rel_err(naive[3]["logprobs"], exact[3]["logprobs"]) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_memory_does_not_grow_with_n_times_v(make_batch):
    N, V, D, chunk = 4096, 151936, 256, 256
    b = make_batch([N], 97, D, dtype=torch.float32)
    h = b["hidden"].cuda().bfloat16().requires_grad_(True)
    w = (torch.randn(V, D, device="cuda") * 0.05).bfloat16().requires_grad_(True)
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items() if k not in ("hidden", "weight")}
    args["targets"] = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = fused_linear_mrpo_loss(h, w, **args, backend="triton", chunk_size=chunk)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    # grads (bf16 N x D, V x D) + fp32 V x D accumulator + bf16 V x D chunk GEMM + chunk x V buffer
    budget = 2 * N * D + 2 * V * D + 4 * V * D + 2 * V * D + 2 * chunk * V
    assert peak <= 1.5 * budget, f"peak {peak / 2**20:.0f} MiB vs budget {budget / 2**20:.0f} MiB"
    assert peak < N * V * 2  # far below one bf16 N x V logits tensor
