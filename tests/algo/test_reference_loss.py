"""Hand-computed cases for the MRPO shaping rule and the plain-PyTorch reference loss."""
from __future__ import annotations

import math

import pytest
import torch

from mrpo.algo.reference import reference_mrpo_loss
from mrpo_kernels import mrpo_shaped_advantages

E = math.e


def shape(rows, *credit):
    """rows: (A, k, K, valid, correct) per token -> shaped advantages as a Python list."""
    a, k, K, v, c = zip(*rows)
    return mrpo_shaped_advantages(
        torch.tensor(a, dtype=torch.float64), torch.tensor(k, dtype=torch.int32), torch.tensor(K, dtype=torch.int32),
        torch.tensor(v), torch.tensor(c), *credit,
    ).tolist()


@pytest.mark.parametrize("row,expected", [
    ((-0.7, 2, 5, False, True), -0.7),             # right answer: A kept, even on an invalid step
    ((0.9, 0, 5, False, True), 0.9),
    ((-0.7, 2, 5, True, False), 0.7),              # wrong answer, valid step: +|A|
    ((0.3, 1, 4, True, False), 0.3),
    ((0.5, 0, 5, False, False), -0.5 * E),         # wrong, invalid first step: -e |A|
    ((0.5, 4, 5, False, False), -0.5),             # wrong, invalid last step: -|A|
    ((-0.5, 2, 5, False, False), -0.5 * math.exp(0.5)),  # middle step k=2 of K=5: -exp(1 - 2/4) |A|
    ((-2.0, 0, 1, False, False), -2.0),            # K = 1, invalid: -|A|
    ((2.0, 0, 1, False, False), -2.0),
    ((-2.0, 0, 1, True, False), 2.0),              # K = 1, valid: +|A|
    ((-0.4, -1, 5, False, False), -0.4),           # token outside steps: A kept
    ((0.4, -1, 5, True, False), 0.4),
    ((0.0, 0, 5, False, False), 0.0),              # A = 0 stays 0 on every branch
    ((0.0, 1, 5, True, False), 0.0),
    ((0.0, 0, 1, False, False), 0.0),
])
def test_shaping_branches(row, expected):
    assert shape([row])[0] == pytest.approx(expected, abs=1e-15, rel=1e-14)


@pytest.mark.parametrize("a", [0.7, -0.7, 0.0])
@pytest.mark.parametrize("credit,valid_wrong", [("abs", lambda a: abs(a)), ("signed", lambda a: a), ("zero", lambda a: 0.0)])
def test_valid_step_credit_by_hand(a, credit, valid_wrong):
    rows = [
        (a, 1, 4, True, False),   # wrong answer, valid step: the only branch valid_step_credit changes
        (a, 0, 1, True, False),   # same with K = 1
        (a, 0, 4, False, False),  # wrong, invalid first step of K = 4: -e |A|
        (a, 3, 4, False, False),  # wrong, invalid last step: -|A|
        (a, 1, 4, True, True),    # right answer: A
        (a, -1, 4, True, False),  # outside steps: A
    ]
    expected = [valid_wrong(a), valid_wrong(a), -E * abs(a), -abs(a), a, a]
    assert shape(rows, credit) == pytest.approx(expected, abs=1e-15, rel=1e-14)
    if a < 0:  # the length-exploit case: a negative advantage keeps its sign only with "signed"
        assert (shape(rows[:1], credit)[0] < 0) == (credit == "signed")


def test_valid_step_credit_through_the_reference_loss():
    # wrong answer, K = 3, steps invalid / valid / invalid / outside, A = -0.6, ratio 1: loss = -mean(A_hat)
    b, _ = _tiny(r=None, adv=(-0.6,) * 4, correct=(False,) * 4, cu=(0, 4))
    b.update(step_index=torch.tensor([0, 1, 2, -1], dtype=torch.int32), num_steps=torch.full((4,), 3, dtype=torch.int32),
             step_valid=torch.tensor([False, True, False, False]))
    for credit, valid_ahat in (("abs", 0.6), ("signed", -0.6), ("zero", 0.0)):
        loss, m = reference_mrpo_loss(**b, valid_step_credit=credit)
        ahat = [-0.6 * E, valid_ahat, -0.6, -0.6]
        assert m["shaped_advantages"].tolist() == pytest.approx(ahat, rel=1e-14)
        assert loss.item() == pytest.approx(-sum(ahat) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="valid_step_credit"):
        reference_mrpo_loss(**b, valid_step_credit="neg")


@pytest.mark.parametrize("K", [2, 3, 5, 10])
@pytest.mark.parametrize("a", [0.8, -1.3])
def test_first_invalid_step_penalised_e_times_the_last(K, a):
    first, last = shape([(a, 0, K, False, False), (a, K - 1, K, False, False)])
    assert first / last == pytest.approx(E, rel=1e-14)
    assert last == pytest.approx(-abs(a), rel=1e-14)
    # monotone in between: earlier invalid steps are penalised more
    steps = shape([(a, k, K, False, False) for k in range(K)])
    assert all(x < y for x, y in zip(steps, steps[1:]))


def _softplus(x):
    return math.log1p(math.exp(x))


def _tiny(r, adv, correct=(True,) * 4, cu=(0, 2, 3, 4), hidden=(1.0, 0.0, 2.0, 0.5), targets=(0, 0, 1, 0)):
    """4 tokens, V = 2, D = 1: logits of token t are [h_t, 0], so logp = -softplus(-h) for target 0 and
    -softplus(h) for target 1; old log-probs are set so that the ratios are exactly `r`."""
    h = torch.tensor(hidden, dtype=torch.float64)[:, None]
    logp = [-_softplus(-x) if t == 0 else -_softplus(x) for x, t in zip(hidden, targets)]
    n = len(hidden)
    return dict(
        hidden=h, weight=torch.tensor([[1.0], [0.0]], dtype=torch.float64), targets=torch.tensor(targets),
        advantages=torch.tensor(adv, dtype=torch.float64), step_index=torch.zeros(n, dtype=torch.int32),
        num_steps=torch.ones(n, dtype=torch.int32), step_valid=torch.zeros(n, dtype=torch.bool),
        answer_correct=torch.tensor(correct), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        old_logprobs=None if r is None else torch.tensor([lp - math.log(x) for lp, x in zip(logp, r)], dtype=torch.float64),
    ), logp


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("agg,expected", [
    # per-token losses: r=1.5,A=+1 -> -1.2 (clipped); r=0.5,A=+1 -> -0.5; r=1.1,A=-1 -> 1.1; r=0.5,A=-1 -> 0.8 (clipped)
    ("seq-mean-token-mean", ((-1.2 - 0.5) / 2 + 1.1 + 0.8) / 3),
    ("token-mean", (-1.2 - 0.5 + 1.1 + 0.8) / 4),
    ("seq-mean-token-sum-norm", ((-1.2 - 0.5) / 4 + 1.1 / 4 + 0.8 / 4) / 3),
])
def test_tiny_clipped_loss_by_hand(agg, expected):
    b, logp = _tiny(r=(1.5, 0.5, 1.1, 0.5), adv=(1.0, 1.0, -1.0, -1.0))
    h = b.pop("hidden").requires_grad_(True)
    w = b.pop("weight").requires_grad_(True)
    loss, m = reference_mrpo_loss(h, w, **b, loss_agg=agg, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(0.5)  # tokens 0 (upper side) and 3 (lower side)
    assert m["logprobs"].tolist() == pytest.approx(logp, rel=1e-12)
    assert m["kl"].item() == 0.0
    loss.backward()
    # dL/dlogp = w_t * (-r A) where not clipped, 0 where clipped; dlogp/dh = 1 - sigmoid(h) (target 0),
    # -sigmoid(h) (target 1); dlogp/dW = (onehot - softmax) * h
    wt = {"seq-mean-token-mean": [1 / 6, 1 / 6, 1 / 3, 1 / 3], "token-mean": [1 / 4] * 4,
          "seq-mean-token-sum-norm": [1 / 12] * 4}[agg]
    g1, g2 = wt[1] * -0.5, wt[2] * 1.1
    expected_gh = [0.0, g1 * (1 - _sigmoid(0.0)), g2 * -_sigmoid(2.0), 0.0]
    assert h.grad[:, 0].tolist() == pytest.approx(expected_gh, rel=1e-12, abs=1e-15)
    # token 1 has h = 0 (no weight gradient); token 2: dL/dz = g2 * ([0, 1] - [s, 1 - s]) = g2 * [-s, s], times h = 2
    s = _sigmoid(2.0)
    assert w.grad[:, 0].tolist() == pytest.approx([-2 * g2 * s, 2 * g2 * s], rel=1e-12)


def test_tiny_mrpo_shaped_loss_by_hand():
    # one wrong sequence with K = 3: invalid k=0, valid k=1, invalid k=2, one token outside steps; A = -0.6
    b, logp = _tiny(r=None, adv=(-0.6,) * 4, correct=(False,) * 4, cu=(0, 4))
    b.update(step_index=torch.tensor([0, 1, 2, -1], dtype=torch.int32), num_steps=torch.full((4,), 3, dtype=torch.int32),
             step_valid=torch.tensor([False, True, False, False]))
    h = b.pop("hidden").requires_grad_(True)
    loss, m = reference_mrpo_loss(h, b.pop("weight"), **b)
    ahat = [-0.6 * E, 0.6, -0.6, -0.6]
    assert m["shaped_advantages"].tolist() == pytest.approx(ahat, rel=1e-14)
    assert loss.item() == pytest.approx(-sum(ahat) / 4, rel=1e-12)  # ratio 1: loss = -mean(A_hat)
    loss.backward()
    dlogp_dh = [1 - _sigmoid(1.0), 1 - _sigmoid(0.0), -_sigmoid(2.0), 1 - _sigmoid(0.5)]
    assert h.grad[:, 0].tolist() == pytest.approx([-a / 4 * d for a, d in zip(ahat, dlogp_dh)], rel=1e-12)
    # shaping "none" keeps A for every token
    _, m2 = reference_mrpo_loss(h, torch.tensor([[1.0], [0.0]], dtype=torch.float64), **b, shaping="none")
    assert m2["shaped_advantages"].tolist() == [-0.6] * 4


def test_kl_term_by_hand():
    b, logp = _tiny(r=None, adv=(0.0,) * 4)
    b["ref_logprobs"] = torch.tensor(logp, dtype=torch.float64) + math.log(2.0)  # k3 = 2 - ln 2 - 1
    h = b.pop("hidden").requires_grad_(True)
    loss, m = reference_mrpo_loss(h, b.pop("weight"), **b, beta=0.1, loss_agg="token-mean")
    assert m["kl"].item() == pytest.approx(1 - math.log(2), rel=1e-12)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), rel=1e-12)
    loss.backward()  # dL/dlogp = beta * (1 - exp(ref - logp)) / N = -0.1 / 4
    dlogp_dh = [1 - _sigmoid(1.0), 1 - _sigmoid(0.0), -_sigmoid(2.0), 1 - _sigmoid(0.5)]
    assert h.grad[:, 0].tolist() == pytest.approx([-0.1 / 4 * d for d in dlogp_dh], rel=1e-12)


def test_temperature_and_entropy_by_hand():
    b, _ = _tiny(r=None, adv=(1.0,) * 4)
    _, m = reference_mrpo_loss(**b, temperature=2.0, return_entropy=True)
    hs = [1.0, 0.0, 2.0, 0.5]
    expected = [-_softplus(-x / 2) if t == 0 else -_softplus(x / 2) for x, t in zip(hs, [0, 0, 1, 0])]
    assert m["logprobs"].tolist() == pytest.approx(expected, rel=1e-12)
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (_sigmoid(x / 2) for x in hs)]
    assert m["entropy"].tolist() == pytest.approx(ent, rel=1e-12)


def test_zero_length_sequences_are_skipped():
    b, _ = _tiny(r=(1.5, 0.5, 1.1, 0.5), adv=(1.0, 1.0, -1.0, -1.0))
    loss, _ = reference_mrpo_loss(**b)
    b["cu_seqlens"] = torch.tensor([0, 0, 2, 2, 3, 4, 4], dtype=torch.int32)
    loss_gaps, _ = reference_mrpo_loss(**b)
    assert loss_gaps.item() == pytest.approx(loss.item(), rel=1e-14)
    assert loss.item() == pytest.approx(0.35, rel=1e-12)


def test_errors():
    b, _ = _tiny(r=None, adv=(1.0,) * 4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        reference_mrpo_loss(**b, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        reference_mrpo_loss(**b, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_agg"):
        reference_mrpo_loss(**b, loss_agg="mean")
    with pytest.raises(ValueError, match="cu_seqlens"):
        reference_mrpo_loss(**dict(b, cu_seqlens=torch.tensor([0, 3])))
