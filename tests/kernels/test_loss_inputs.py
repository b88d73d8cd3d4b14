"""LossInputs, step-normalised token weights and mrpo_loss (torch backend) against the plain-PyTorch
reference: a whole optimizer step split into micro-batches and ranks gives the full-batch loss and
gradients; the loss scale folded into the weights; metrics as non-differentiable outputs; no host
syncs with validate=False. The Triton twins of these cases run in triton_cases.py."""
from __future__ import annotations

import pytest
import torch

from mrpo.algo.reference import reference_mrpo_loss, reference_mrpo_loss_from_inputs
from mrpo_kernels import LossInputs, mrpo_loss, step_token_weights
from mrpo_kernels.loss_inputs import token_weights

from .conftest import as_inputs, inputs_loss_and_grads

AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
FULL = dict(shaping="mrpo", beta=0.05, temperature=0.7, eps_low=0.2, eps_high=0.28, max_completion_length=40)


def _close(a, b, rtol=1e-9, atol=1e-12):
    (la, gha, gwa, _), (lb, ghb, gwb, _) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gha, ghb, rtol=rtol, atol=atol)
    torch.testing.assert_close(gwa, gwb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("agg,expected", [
    ("token-mean", [0.2] * 5),                                       # 2 / 10
    ("seq-mean-token-mean", [1 / 6] * 3 + [0.25] * 2),               # 2 / (3 * 4), 2 / (2 * 4)
    ("seq-mean-token-sum-norm", [1 / 16] * 5),                       # 2 / (4 * 8)
])
def test_step_token_weights_by_hand(agg, expected):
    w = step_token_weights(torch.tensor([3, 0, 2]), agg, total_tokens=10, total_seqs=4, max_completion_length=8,
                           scale=2.0)
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert w.tolist() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("agg", AGGS)
def test_in_batch_weights_are_the_step_weights_of_one_batch(agg):
    lengths = torch.tensor([4, 0, 1, 7, 0, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(lengths.sum())
    for dtype, tol in ((torch.float64, 0.0), (torch.float32, 1e-7)):
        step = step_token_weights(lengths, agg, total_tokens=n, total_seqs=4, max_completion_length=9, dtype=dtype)
        torch.testing.assert_close(token_weights(cu, n, agg, 9, dtype), step, rtol=tol, atol=0)
    if agg != "seq-mean-token-sum-norm":
        assert step.sum().item() == pytest.approx(1.0, rel=1e-6)


def test_step_token_weights_errors():
    lengths = torch.tensor([3, 2])
    with pytest.raises(ValueError, match="cannot"):
        step_token_weights(lengths, "token-mean", total_tokens=4, total_seqs=2, max_completion_length=None)
    with pytest.raises(ValueError, match="cannot"):
        step_token_weights(lengths, "token-mean", total_tokens=9, total_seqs=1, max_completion_length=None)
    with pytest.raises(ValueError, match="max_completion_length"):
        step_token_weights(lengths, "seq-mean-token-sum-norm", total_tokens=9, total_seqs=2, max_completion_length=None)
    with pytest.raises(ValueError, match="loss_agg"):
        step_token_weights(lengths, "sum", total_tokens=9, total_seqs=2, max_completion_length=None)
    assert step_token_weights(torch.tensor([0, 0]), "token-mean", total_tokens=0, total_seqs=0,
                              max_completion_length=None).shape == (0,)


def test_loss_inputs_properties_and_to(make_batch):
    _, _, inp = as_inputs(make_batch([5, 0, 7], 97, 16), token_weights=torch.ones(12))
    assert inp.num_tokens == 12 and inp.num_seqs == 3
    moved = inp.to("cpu")
    assert moved is not inp and moved.old_logprobs is inp.old_logprobs  # .to on the same device aliases
    assert set(inp.per_token()) == {"targets", "advantages", "step_index", "num_steps", "step_valid",
                                    "answer_correct", "token_weights", "old_logprobs", "ref_logprobs"}
    assert "ref_logprobs" not in LossInputs(**{**inp.__dict__, "ref_logprobs": None}).per_token()


def _micro_batch(batch, b0, b1):
    """Sequences b0..b1-1 of a build_batch dict as (hidden rows, LossInputs without weights)."""
    cu = batch["cu_seqlens"].long()
    s, e = int(cu[b0]), int(cu[b1])
    per_tok = {k: v[s:e] for k, v in batch.items()
               if k not in ("hidden", "weight", "cu_seqlens") and v is not None}
    return batch["hidden"][s:e], LossInputs(**per_tok, cu_seqlens=cu[b0:b1 + 1] - s)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_on_ranks_add_up_to_the_full_batch(make_batch, run_loss, agg):
    """Two ranks x two micro-batches with step weights (scale = world size): summing the losses and the
    weight gradients over micro-batches and averaging over ranks (DP all-reduce) gives the loss and
    gradients of the whole batch under the in-batch aggregation."""
    lens = [5, 0, 7, 25, 3, 11]
    batch = make_batch(lens, 97, 16, temperature=0.7, seed=4)
    kw = dict(FULL, loss_agg=agg)
    full = run_loss(reference_mrpo_loss, batch, **kw)
    world, splits = 2, [[(0, 2), (2, 3)], [(3, 4), (4, 6)]]
    total_tokens, total_seqs = sum(lens), sum(x > 0 for x in lens)
    loss, gw, gh = 0.0, torch.zeros_like(batch["weight"]), []
    for rank in splits:
        for b0, b1 in rank:
            hidden, inp = _micro_batch(batch, b0, b1)
            inp.token_weights = step_token_weights(
                inp.cu_seqlens.diff(), agg, total_tokens=total_tokens, total_seqs=total_seqs,
                max_completion_length=kw["max_completion_length"], scale=world, dtype=torch.float64)
            lo, ghi, gwi, _ = inputs_loss_and_grads(mrpo_loss, hidden, batch["weight"], inp, backend="torch",
                                                    unit_grad_output=True, **kw)
            loss, gw, gh = loss + lo, gw + gwi, gh + [ghi]
    torch.testing.assert_close(loss / world, full[0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(torch.cat(gh) / world, full[1], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gw / world, full[2], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("lens", [[1], [5, 0, 7, 25]])
def test_token_weights_are_honoured_like_the_reference(make_batch, lens):
    batch = make_batch(lens, 257, 16, temperature=0.7, seed=len(lens))
    w = torch.rand(sum(lens), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hidden, weight, inp = as_inputs(batch, token_weights=w)
    ref = inputs_loss_and_grads(reference_mrpo_loss_from_inputs, hidden, weight, inp, **FULL)
    out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", chunk_size=16, **FULL)
    _close(out, ref)
    # the loss is sum_t w_t l_t whatever loss_agg says
    other = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", **dict(FULL, loss_agg="token-mean"))
    _close(other, out)


def test_loss_scale_in_weights_and_grad_output(make_batch):
    """loss * 3.7 backward (grad_output 3.7, multiplied on the device) == weights * 3.7 with
    unit_grad_output (backward returns the stored gradients untouched) == 3.7 * the plain gradients."""
    batch = make_batch([5, 9, 3], 97, 16, seed=2)
    hidden, weight, inp = as_inputs(batch)
    w = token_weights(inp.cu_seqlens.long(), inp.num_tokens, "seq-mean-token-mean", None, torch.float64)
    plain = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", beta=0.1)
    scaled_out = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", beta=0.1, grad_scale=3.7)
    inp37 = LossInputs(**{**inp.__dict__, "token_weights": 3.7 * w})
    folded = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp37, backend="torch", beta=0.1, unit_grad_output=True)
    for out in (scaled_out, folded):
        torch.testing.assert_close(out[1], 3.7 * plain[1], rtol=1e-12, atol=0)
        torch.testing.assert_close(out[2], 3.7 * plain[2], rtol=1e-12, atol=0)
    torch.testing.assert_close(folded[0], 3.7 * plain[0], rtol=1e-12, atol=0)
    # the promise of unit_grad_output: grad_output is not looked at
    ignored = inputs_loss_and_grads(mrpo_loss, hidden, weight, inp, backend="torch", beta=0.1, unit_grad_output=True,
                                    grad_scale=3.7)
    torch.testing.assert_close(ignored[1], plain[1], rtol=0, atol=0)


def test_metrics_are_non_differentiable_outputs(make_batch):
    hidden, weight, inp = as_inputs(make_batch([5, 9], 97, 16))
    h = hidden.clone().requires_grad_(True)
    loss, m = mrpo_loss(h, weight, inp, backend="torch", beta=0.1, return_entropy=True)
    assert loss.requires_grad
    assert set(m) == {"logprobs", "shaped_advantages", "clip_fraction", "kl", "entropy"}
    assert all(not v.requires_grad and v.grad_fn is None for v in m.values())
    assert m["shaped_advantages"].data_ptr() != inp.advantages.data_ptr()
    loss.backward()
    _, m2 = mrpo_loss(h, weight, inp, backend="torch", beta=0.1)
    assert "entropy" not in m2


class _HostSync(RuntimeError):
    pass


def test_validate_false_reads_nothing_back_to_the_host(make_batch, monkeypatch):
    hidden, weight, inp = as_inputs(make_batch([5, 0, 9], 97, 16))
    inp.token_weights = torch.full((14,), 1 / 14, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)

    def sync(*_a, **_k):
        raise _HostSync

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    with pytest.raises(_HostSync):  # the patch is effective: validation reads values
        mrpo_loss(h, weight, inp, backend="torch", beta=0.1)
    loss, _ = mrpo_loss(h, weight, inp, backend="torch", beta=0.1, validate=False, unit_grad_output=True)
    loss.backward()
    inp.token_weights = None  # in-batch weights need no host read either
    loss, _ = mrpo_loss(h, weight, inp, backend="torch", beta=0.1, validate=False)
    (loss * 2).backward()
    monkeypatch.undo()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_mrpo_loss_input_errors(make_batch):
    hidden, weight, inp = as_inputs(make_batch([3, 4], 97, 8))
    with pytest.raises(TypeError, match="LossInputs"):
        mrpo_loss(hidden, weight, inp.__dict__, backend="torch")
    with pytest.raises(ValueError, match="valid_step_credit"):
        mrpo_loss(hidden, weight, inp, valid_step_credit="neg", backend="torch")
    bad = LossInputs(**{**inp.__dict__, "token_weights": torch.ones(6)})
    for validate in (True, False):  # shapes are checked either way (no host read needed)
        with pytest.raises(ValueError, match="token_weights"):
            mrpo_loss(hidden, weight, bad, backend="torch", validate=validate)
    bad = LossInputs(**{**inp.__dict__, "cu_seqlens": torch.tensor([0, 3, 6])})
    with pytest.raises(ValueError, match="cu_seqlens"):
        mrpo_loss(hidden, weight, bad, backend="torch")
    bad = LossInputs(**{**inp.__dict__, "targets": inp.targets + 97})
    with pytest.raises(ValueError, match="targets"):
        mrpo_loss(hidden, weight, bad, backend="torch")
