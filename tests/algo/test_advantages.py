"""GRPO / Dr.GRPO / GDPO advantages against hand computations and a plain-Python reference, with missing
(unjudged) rewards and column weights."""
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


def _reference(rows, group_size, method="grpo", scale="group", weights=None, eps=1e-4):
    """Plain-Python advantages of unweighted reward rows with NaN = missing (see the module docstring)."""
    cols = len(rows[0])
    w = weights or [1.0] * cols
    groups = [rows[g:g + group_size] for g in range(0, len(rows), group_size)]

    def present(group, k):
        return [row[k] for row in group if not math.isnan(row[k])]

    if method == "gdpo":
        s = []
        for group in groups:
            stats = []
            for k in range(cols):
                xs = present(group, k)
                m = statistics.mean(xs) if xs else 0.0
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                stats.append((m, sd))
            s += [sum(w[k] * (0.0 if math.isnan(row[k]) else (row[k] - stats[k][0]) / (stats[k][1] + eps))
                      for k in range(cols)) for row in group]
        m, sd = statistics.mean(s), statistics.stdev(s)
        return [(x - m) / (sd + eps) for x in s]

    totals = []
    for group in groups:
        fill = [statistics.mean(present(group, k)) if present(group, k) else 0.0 for k in range(cols)]
        totals.append([sum(w[k] * (fill[k] if math.isnan(row[k]) else row[k]) for k in range(cols))
                       for row in group])
    batch_sd = statistics.stdev([x for t in totals for x in t])
    out = []
    for t in totals:
        m = statistics.mean(t)
        if method == "dr_grpo" or scale == "none":
            out += [x - m for x in t]
        else:
            sd = statistics.stdev(t) if scale == "group" else batch_sd
            out += [(x - m) / (sd + eps) for x in t]
    return out


METHODS = [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("dr_grpo", "group"), ("gdpo", "group")]


@pytest.mark.parametrize("method,scale", METHODS)
def test_missing_values_match_reference(method, scale):
    torch.manual_seed(0)
    r = torch.rand(12, 3)
    r[2, 1] = NAN                 # one unjudged process reward in group 0
    r[4:8, 1] = NAN               # group 1: nothing judged
    r[9, 1], r[10, 1] = NAN, NAN  # group 2: two unjudged
    weights = [1.0, 0.5, 2.0]
    adv = compute_advantages(r, 4, method=method, scale=scale, weights=torch.tensor(weights))
    expected = _reference(r.tolist(), 4, method, scale, weights)
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize("method,scale", METHODS)
def test_unjudged_is_not_scored_as_all_invalid(method, scale):
    # the case: 4 completions identical except one unjudged (answer, process, length columns);
    # leaving the process term out (adding 0) gave [0.5, 0.5, 0.5, -1.5]
    r = torch.tensor([[1.0, 0.5, 0.0]] * 3 + [[1.0, NAN, 0.0]])
    assert torch.equal(compute_advantages(r, 4, method=method, scale=scale), torch.zeros(4))


@pytest.mark.parametrize("method,scale", METHODS)
def test_unjudged_sits_at_the_group_mean(method, scale):
    # the unjudged completion's advantage equals that of a completion whose process reward is the mean
    # of the judged ones, with the group statistics of the judged completions unchanged
    answer, process = [1.0, 0.0, 1.0, 0.0, 0.5], [1.0, 0.25, 0.5, 0.0, NAN]
    r = torch.tensor([answer, process]).T
    mean = statistics.mean(process[:4])
    adv = compute_advantages(r, 5, method=method, scale=scale)
    filled = compute_advantages(torch.tensor([answer, process[:4] + [mean]]).T, 5, method=method, scale=scale)
    if method != "gdpo":  # GDPO: the filled-in value would change the group's std; a missing one does not
        assert torch.allclose(adv, filled, atol=1e-6)
    assert adv[4] == pytest.approx(_reference(r.tolist(), 5, method, scale)[4], abs=1e-5)
    if scale != "batch":   # within its group, an answer of 0.5 and a mean process reward: between the others
        assert adv[1] < adv[4] < adv[0]


@pytest.mark.parametrize("method,scale", METHODS)
def test_unjudged_group_uses_the_other_rewards(method, scale):
    # group 0 has no judged completion: its advantages come from answer and length alone
    r = torch.tensor([[1.0, NAN, 0.0], [0.0, NAN, -0.5], [0.5, NAN, 0.0], [0.0, NAN, 0.0],
                      [1.0, 0.2, 0.0], [0.0, 0.9, -0.5], [1.0, 0.4, -1.0], [0.0, 0.7, 0.0]])
    w = torch.tensor([1.0, 3.0, 0.5])
    adv = compute_advantages(r, 4, method=method, scale=scale, weights=w)
    assert torch.allclose(adv, torch.tensor(_reference(r.tolist(), 4, method, scale, w.tolist())), atol=1e-5)
    if method != "gdpo" and scale != "batch":   # group statistics only: group 0 alone, without the column
        alone = compute_advantages(r[:4, [0, 2]], 4, method=method, scale=scale, weights=w[[0, 2]])
        assert torch.allclose(adv[:4], alone, atol=1e-6)


def test_grpo_weights_scale_the_columns():
    torch.manual_seed(1)
    r, w = torch.rand(8, 3), torch.tensor([1.0, 0.1, 5.0])
    for scale in ("group", "batch", "none"):
        assert torch.allclose(compute_advantages(r, 4, scale=scale, weights=w), compute_advantages(r * w, 4, scale=scale),
                              atol=1e-6)


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


def test_gdpo_weights_apply_after_the_group_normalisation():
    # the case: weights before the per-reward normalisation cancelled out
    torch.manual_seed(2)
    r = torch.rand(8, 3)
    r[1, 1] = NAN
    adv = {w: compute_advantages(r, 4, method="gdpo", weights=torch.tensor(w))
           for w in ((1.0, 1.0, 1.0), (1.0, 0.1, 0.1), (5.0, 1.0, 0.01))}
    assert (adv[(1.0, 1.0, 1.0)] - adv[(1.0, 0.1, 0.1)]).abs().max() > 0.1
    assert (adv[(1.0, 0.1, 0.1)] - adv[(5.0, 1.0, 0.01)]).abs().max() > 0.1
    for w, a in adv.items():
        assert torch.allclose(a, torch.tensor(_reference(r.tolist(), 4, "gdpo", weights=list(w))), atol=1e-5)
    # equal weights: the unweighted values (the batch normalisation removes a common factor; eps = 1e-4 aside)
    unweighted = compute_advantages(r, 4, method="gdpo")
    assert torch.allclose(compute_advantages(r, 4, method="gdpo", weights=torch.full((3,), 2.5)), unweighted, atol=1e-3)
    assert torch.allclose(adv[(1.0, 1.0, 1.0)], unweighted)
    # a column with weight w -> its normalised values times w, summed (plain torch, no NaN)
    x = torch.rand(8, 2).double()
    g = x.reshape(2, 4, 2)
    normed = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(8, 2)
    s = normed @ torch.tensor([3.0, 0.5]).double()
    expected = (s - s.mean()) / (s.std() + 1e-4)
    assert torch.allclose(compute_advantages(x, 4, method="gdpo", weights=torch.tensor([3.0, 0.5])),
                          expected.float(), atol=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        compute_advantages(torch.zeros(6, 1), 4)
    with pytest.raises(ValueError, match="method"):
        compute_advantages(torch.zeros(4, 1), 2, method="ppo")
    with pytest.raises(ValueError, match="scale"):
        compute_advantages(torch.zeros(4, 1), 2, scale="global")
    with pytest.raises(ValueError, match=r"\[n, R\]"):
        compute_advantages(torch.zeros(4, 1, 1), 2)
    with pytest.raises(ValueError, match="weights must be 2 finite values"):
        compute_advantages(torch.zeros(4, 2), 2, weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights must be 2 finite values"):
        compute_advantages(torch.zeros(4, 2), 2, weights=torch.tensor([1.0, NAN]))
