"""NoisyJudge (judge.noise_flip_rate): seeded flips of step verdicts, clean judge for evaluation."""
from types import SimpleNamespace

import pytest

from mrpo.config import load_config
from mrpo.errors import UserInputError
from mrpo.judges import NoisyJudge, build_judge, clean_judge
from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict
from mrpo.judges.rule import RuleJudge


class FixedJudge:
    """Every step valid except those listed as invalid; request 'none' is unjudged."""

    def __init__(self):
        self.stats = JudgeStats()

    def judge(self, requests):
        return [None if r.sample_id == "none" else
                StepVerdict([0 if "bad" in s else 1 for s in r.steps], [0] * len(r.steps)) for r in requests]


def _reqs(n=400, k=5):
    return [JudgeRequest(f"s{i}", "q", None, "a", "", [f"step {j} {'bad' if j % 2 else 'good'} of {i}"
                                                     for j in range(k)]) for i in range(n)]


def test_rate_zero_and_one():
    reqs = _reqs(20)
    clean = FixedJudge().judge(reqs)
    assert [v.valid for v in NoisyJudge(FixedJudge(), 0.0).judge(reqs)] == [v.valid for v in clean]
    flipped = NoisyJudge(FixedJudge(), 1.0).judge(reqs)
    for v, c in zip(flipped, clean):
        assert v.valid == [not x for x in c.valid]
        assert v.alignment == v.contribution == [int(x) for x in v.valid]


def test_share_flipped_is_the_rate_and_flips_are_seeded():
    reqs = _reqs(400)                                    # 2000 step verdicts
    clean = FixedJudge().judge(reqs)
    j = NoisyJudge(FixedJudge(), 0.2, seed=7)
    got = j.judge(reqs)
    flips = sum(a != b for v, c in zip(got, clean) for a, b in zip(v.valid, c.valid))
    assert j.seen == 2000 and j.flipped == flips
    assert abs(flips / 2000 - 0.2) < 4 * (0.2 * 0.8 / 2000) ** 0.5   # binomial, 4 sd
    # both directions flip (valid -> invalid and invalid -> valid)
    assert any(c.valid[0] and not v.valid[0] for v, c in zip(got, clean))
    assert any(not c.valid[1] and v.valid[1] for v, c in zip(got, clean))
    again = NoisyJudge(FixedJudge(), 0.2, seed=7).judge(reqs)
    assert [v.valid for v in again] == [v.valid for v in got]          # same seed, same flips
    other = NoisyJudge(FixedJudge(), 0.2, seed=8).judge(reqs)
    assert [v.valid for v in other] != [v.valid for v in got]


def test_unjudged_stays_unjudged_and_stats_are_the_inner_ones():
    inner = FixedJudge()
    j = NoisyJudge(inner, 0.5)
    out = j.judge([JudgeRequest("none", "q", None, "a", "", ["x"])] + _reqs(2))
    assert out[0] is None and out[1] is not None
    assert j.stats is inner.stats


def test_build_judge_wraps_and_clean_judge_unwraps():
    cfg = SimpleNamespace(kind="rule", noise_flip_rate=0.2, noise_seed=3)
    j = build_judge(cfg)
    assert isinstance(j, NoisyJudge) and isinstance(clean_judge(j), RuleJudge) and j.seed == 3
    plain = build_judge(SimpleNamespace(kind="rule", noise_flip_rate=0.0))
    assert isinstance(plain, RuleJudge) and clean_judge(plain) is plain
    assert build_judge(SimpleNamespace(kind="none", noise_flip_rate=0.2)) is None


def test_config_validation():
    cfg = load_config(None, ["judge.noise_flip_rate=0.2", "judge.noise_seed=5"])
    assert cfg.judge.noise_flip_rate == 0.2 and cfg.judge.noise_seed == 5
    with pytest.raises(UserInputError, match="judge.noise_flip_rate"):
        load_config(None, ["judge.noise_flip_rate=1.5"])
    with pytest.raises(UserInputError, match="judge.noise_flip_rate"):
        load_config(None, ["judge.noise_flip_rate=0.2", "judge.kind=none", "reward.process_weight=0",
                           "algo.name=grpo"])
