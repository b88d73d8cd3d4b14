"""mrpo_shaped_advantages against a scalar transcription of the rule (hand cases: tests/algo).
Its Triton twin is compared with it in triton_cases.py (run by test_triton_backend.py)."""
from __future__ import annotations

import math

import pytest
import torch

from mrpo_kernels import mrpo_shaped_advantages


def scalar_rule(a, k, K, valid, correct, credit="abs"):
    """The rule as written in the paper (credit "abs"), one token at a time."""
    if correct or k < 0:
        return a
    if valid:
        return {"abs": abs(a), "signed": a, "zero": 0.0}[credit]
    if K > 1:
        return -math.exp(1 - k / (K - 1)) * abs(a)
    return -abs(a)


def random_tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randint(1, 12, (n,), generator=g, dtype=torch.int32)
    k = (torch.rand(n, generator=g) * (K + 1)).long().int() - 1  # -1 .. K-1
    a = torch.randn(n, generator=g, dtype=torch.float64)
    a[::7] = 0.0
    return a, k, K, torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.3


@pytest.mark.parametrize("dtype,credit", [(torch.float64, "abs"), (torch.float32, "abs"), (torch.bfloat16, "abs"),
                                          (torch.float64, "signed"), (torch.float32, "zero")])
def test_matches_scalar_rule(dtype, credit):
    a, k, K, valid, correct = random_tokens(2000)
    a = a.to(dtype)
    out = mrpo_shaped_advantages(a, k, K, valid, correct, valid_step_credit=credit)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = torch.tensor(
        [scalar_rule(float(x), int(i), int(n), bool(v), bool(c), credit) for x, i, n, v, c in zip(a, k, K, valid, correct)],
        dtype=torch.float64,
    )
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # every branch is present in the random tokens
    wrong_in_step = ~correct & (k >= 0)
    assert (correct & (k >= 0)).any() and (~correct & (k < 0)).any()
    assert (wrong_in_step & valid).any() and (wrong_in_step & ~valid & (K > 1)).any()
    assert (wrong_in_step & ~valid & (K == 1)).any()


def test_credit_only_changes_valid_steps_of_wrong_answers():
    a, k, K, valid, correct = random_tokens(3000, seed=3)
    base = mrpo_shaped_advantages(a, k, K, valid, correct)
    target = ~correct & (k >= 0) & valid
    for credit, expected in (("signed", a), ("zero", torch.zeros_like(a))):
        out = mrpo_shaped_advantages(a, k, K, valid, correct, valid_step_credit=credit)
        assert torch.equal(out[~target], base[~target]) and torch.equal(out[target], expected[target])
    assert ((a < 0) & target).any() and (mrpo_shaped_advantages(a, k, K, valid, correct, "signed")[(a < 0) & target] < 0).all()
    with pytest.raises(ValueError, match="valid_step_credit"):
        mrpo_shaped_advantages(a, k, K, valid, correct, valid_step_credit="pos")


def test_shapes_and_int_types():
    a, k, K, valid, correct = random_tokens(50, seed=1)
    out64 = mrpo_shaped_advantages(a, k.long(), K.long(), valid.to(torch.uint8), correct.int())
    out32 = mrpo_shaped_advantages(a, k, K, valid, correct)
    torch.testing.assert_close(out64, out32)
    assert mrpo_shaped_advantages(a[:0], k[:0], K[:0], valid[:0], correct[:0]).shape == (0,)


def test_sign_and_magnitude_properties():
    a, k, K, valid, correct = random_tokens(3000, seed=2)
    out = mrpo_shaped_advantages(a, k, K, valid, correct)
    wrong_in_step = ~correct & (k >= 0)
    assert (out[wrong_in_step & valid] >= 0).all()
    assert (out[wrong_in_step & ~valid] <= 0).all()
    # invalid steps are penalised between |A| (last step) and e |A| (first step)
    ratio = out[wrong_in_step & ~valid & (a != 0)].abs() / a[wrong_in_step & ~valid & (a != 0)].abs()
    assert (ratio >= 1 - 1e-12).all() and (ratio <= math.e + 1e-12).all()
