"""GRPO / Dr.GRPO / GDPO advantages against hand computations and a plain-Python reference."""
import math
import statistics

import pytest
import torch

from mrpo.algo.advantages import compute_advantages

NAN = float("nan")


def test_grpo_hand_computed():
    # one group of 4: r = [1, 0, 0, 1] -> mean 0.5, unbiased std = sqrt(1/3)
    adv = compute_advantages(torch.tensor([[1.0], [0.0], [0.0], [1.0]]), group_size=4)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert adv.dtype == torch.float32 and adv.shape == (4,)


def test_grpo_sums_columns_ignoring_nan_and_matches_reference():
    torch.manual_seed(0)
    r = torch.rand(12, 3)
    r[2, 1] = NAN
    r[7, 2] = NAN
    adv = compute_advantages(r, group_size=4)
    totals = [sum(x for x in row if not math.isnan(x)) for row in r.tolist()]
    expected = []
    for g in range(3):
        grp = totals[4 * g:4 * g + 4]
        m, s = statistics.mean(grp), statistics.stdev(grp)
        expected += [(x - m) / (s + 1e-4) for x in grp]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


def test_scales_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 3.0, 5.0])  # groups [1, 0] and [3, 5]
    centered = torch.tensor([0.5, -0.5, -1.0, 1.0])
    assert torch.allclose(compute_advantages(r, 2, scale="none"), centered)
    assert torch.allclose(compute_advantages(r, 2, method="dr_grpo"), centered)
    assert torch.allclose(compute_advantages(r, 2, method="dr_grpo", scale="group"), centered)
    batch_std = statistics.stdev([1.0, 0.0, 3.0, 5.0])
    assert torch.allclose(compute_advantages(r, 2, scale="batch"), centered / (batch_std + 1e-4))
    group = compute_advantages(r, 2, scale="group")
    assert torch.allclose(group, torch.tensor([0.5, -0.5, -1.0, 1.0]) / (torch.tensor([1, 1, 2, 2]) * math.sqrt(0.5) + 1e-4))


def test_identical_rewards_give_zero():
    adv = compute_advantages(torch.full((6, 2), 0.7), 3)
    assert torch.equal(adv, torch.zeros(6))
    assert torch.equal(compute_advantages(torch.full((6, 2), 0.7), 3, method="gdpo"), torch.zeros(6))


def test_gdpo_hand_computed():
    # 2 groups of 2, columns (answer, process) with one unjudged process reward
    r = torch.tensor([[1.0, 0.5], [0.0, NAN], [1.0, 1.0], [1.0, 0.0]])
    eps = 1e-4
    sd = math.sqrt(0.5)                              # unbiased std of two values 1 apart
    # answer: group 1 -> [+0.5, -0.5]/sd, group 2 identical -> [0, 0]
    # process: group 1 has one value -> (0.5 - 0.5)/(0 + eps) = 0, NaN -> 0; group 2 -> [+0.5, -0.5]/sd
    s = [0.5 / (sd + eps), -0.5 / (sd + eps), 0.5 / (sd + eps), -0.5 / (sd + eps)]
    m, st = statistics.mean(s), statistics.stdev(s)
    expected = torch.tensor([(x - m) / (st + eps) for x in s])
    assert torch.allclose(compute_advantages(r, 2, method="gdpo"), expected, atol=1e-6)


def test_gdpo_differs_from_grpo_on_scale_mismatch():
    # a large-scale column dominates GRPO's sum but not GDPO's per-column normalisation
    r = torch.tensor([[1.0, 100.0], [0.0, 0.0], [0.0, 100.0], [1.0, 0.0]])
    grpo = compute_advantages(r, 4)
    gdpo = compute_advantages(r, 4, method="gdpo")
    assert grpo[0] > 0 and grpo[2] > 0 and grpo[3] < 0
    assert gdpo[0] > gdpo[2] and gdpo[0] > gdpo[3] and gdpo[1] < gdpo[2]
    assert gdpo[2] == pytest.approx(gdpo[3].item(), abs=1e-3)  # answer and process each "win" once (eps aside)


def test_validation():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        compute_advantages(torch.zeros(6, 1), 4)
    with pytest.raises(ValueError, match="method"):
        compute_advantages(torch.zeros(4, 1), 2, method="ppo")
    with pytest.raises(ValueError, match="scale"):
        compute_advantages(torch.zeros(4, 1), 2, scale="global")
    with pytest.raises(ValueError, match=r"\[n, R\]"):
        compute_advantages(torch.zeros(4, 1, 1), 2)
