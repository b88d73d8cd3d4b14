"""Length / process / format rewards and the RewardModel that combines them."""
from types import SimpleNamespace

import pytest
import torch

from mrpo.judges.base import JudgeStats, StepVerdict
from mrpo.algo.advantages import compute_advantages
from mrpo.rewards import RewardModel
from mrpo.rewards.format import format_reward
from mrpo.rewards.length import length_reward
from mrpo.rewards.process import process_reward


@pytest.mark.parametrize("k,expected", [(0, -1.0), (1, -0.75), (3, -0.25), (4, 0.0), (7, 0.0), (10, 0.0),
                                        (11, -0.1), (15, -0.5), (30, -2.0)])
def test_length_reward_paper_defaults(k, expected):
    assert length_reward(k) == pytest.approx(expected)


def test_length_reward_custom_bounds_and_errors():
    assert length_reward(1, k_min=2, k_max=3) == pytest.approx(-0.5)
    assert length_reward(6, k_min=2, k_max=3) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        length_reward(-1)
    with pytest.raises(ValueError):
        length_reward(3, k_min=5, k_max=4)


def test_process_reward():
    assert process_reward(None) is None
    assert process_reward(StepVerdict([], [])) == 0.0
    assert process_reward(StepVerdict([1, 0, 0, 0], [0, 1, 0, 0])) == 0.5
    assert process_reward(StepVerdict([1, 1, 1], [0, 0, 1])) == 1.0
    with pytest.raises(ValueError):
        process_reward(StepVerdict([1], [1, 0]))


@pytest.mark.parametrize("text,tag,expected", [
    ("<think>a. b.</think><answer>yes</answer>", "think", 1.0),
    ("\n<think>a.</think>\n<answer>yes</answer><|im_end|>\n", "think", 1.0),
    ("<thinking>a.</thinking><answer>yes</answer>", "thinking", 1.0),
    ("<thinking>a.</thinking><answer>yes</answer>", "think", 0.0),
    ("<think>a.</think>", "think", 0.0),
    ("<answer>yes</answer>", "think", 0.0),
    ("<think> </think><answer>yes</answer>", "think", 0.0),
    ("<think>a.</think><answer> </answer>", "think", 0.0),
    ("<think>a.</think><answer>x</answer><answer>y</answer>", "think", 0.0),
    ("<think>a.</think><think>b.</think><answer>x</answer>", "think", 0.0),
    ("hi <think>a.</think><answer>x</answer>", "think", 0.0),
    ("<think>a.</think><answer>x</answer> trailing", "think", 0.0),
])
def test_format_reward(text, tag, expected):
    assert format_reward(text, tag) == expected


class FakeJudge:
    """Marks a step valid when it contains 'good'; fails (None) for sample ids in `fail`."""

    def __init__(self, fail=()):
        self.stats = JudgeStats()
        self.fail = set(fail)
        self.calls = []

    def judge(self, requests):
        self.calls.append(list(requests))
        self.stats.requests += len(requests)
        out = []
        for r in requests:
            if r.sample_id in self.fail:
                self.stats.failures += 1
                out.append(None)
            else:
                lab = [int("good" in s) for s in r.steps]
                out.append(StepVerdict(alignment=lab, contribution=[0] * len(lab)))
        return out


def _cfg(**kw):
    base = dict(answer_weight=1.0, process_weight=1.0, length_weight=1.0, format_weight=0.0, k_min=4, k_max=10,
                bert_model_path=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _rec(i, solution="left lung"):
    return {"id": f"s{i}", "image": None, "problem": "Where is the lesion?", "solution": solution,
            "gold_reasoning": "The opacity is in the left lung.", "facts": {"side": "left"}}


COMPLETIONS = [
    # 0: correct, 4 steps (3 good) -> answer 1, process 0.75, length 0, format 1
    "<think>A good look. A good sign. A bad step. A good end.</think><answer>Left lung</answer>",
    # 1: wrong closed answer... open question -> partial credit; 2 steps both bad -> process 0, length -0.5
    "<think>A bad step. Another bad step.</think><answer>right kidney</answer>",
    # 2: no reasoning, no answer -> K = 0: process 0 (judged locally), length -1, answer 0, format 0
    "I do not know",
    # 3: judge fails on this sample -> unjudged, process excluded
    "<think>A good step.</think><answer>left lung</answer>",
]


@pytest.mark.filterwarnings("ignore:AnswerScorer")
def test_reward_model_scores_and_totals():
    judge = FakeJudge(fail={"s3"})
    rm = RewardModel(_cfg(format_weight=0.5), judge)
    scored, stats = rm.score(COMPLETIONS, [_rec(i) for i in range(4)])

    assert len(judge.calls) == 1 and [r.sample_id for r in judge.calls[0]] == ["s0", "s1", "s3"]  # K=0 not sent
    assert judge.calls[0][0].steps == ["A good look.", "A good sign.", "A bad step.", "A good end."]
    assert judge.calls[0][0].gold_answer == "left lung" and judge.calls[0][0].facts == {"side": "left"}

    s0, s1, s2, s3 = scored
    assert (s0.r_answer, s0.r_process, s0.r_length, s0.r_format) == (1.0, 0.75, 0.0, 1.0)
    assert s0.answer_correct and s0.judged and s0.step_valid == [True, True, False, True]
    assert s0.total == pytest.approx(1.0 + 0.75 + 0.0 + 0.5 * 1.0)

    rouge, bleu = rm.answer_scorer.similarity("right kidney", "left lung")
    assert s1.r_answer == pytest.approx(0.5 * rouge + 0.5 * bleu) and not s1.answer_correct
    assert (s1.r_process, s1.r_length, s1.step_valid) == (0.0, -0.5, [False, False])
    assert s1.total == pytest.approx(s1.r_answer + 0.0 - 0.5 + 0.5 * 1.0)

    assert s2.steps == [] and s2.answer is None and s2.judged and s2.step_valid == []
    assert (s2.r_answer, s2.r_process, s2.r_length, s2.r_format, s2.total) == (0.0, 0.0, -1.0, 0.0, -1.0)

    assert not s3.judged and s3.r_process is None and s3.step_valid is None and s3.answer_correct
    assert s3.total == pytest.approx(1.0 - 0.75 + 0.5)  # process excluded, not 0

    assert stats["unjudged"] == 1 and stats["zero_steps"] == 1 and stats["answer_correct"] == 2
    assert stats["judge_requests"] == 3 and stats["judge_failures"] == 1

    assert rm.columns == [("answer", 1.0), ("process", 1.0), ("length", 1.0), ("format", 0.5)]
    m = rm.reward_matrix(scored)   # unweighted, NaN = missing
    assert m.shape == (4, 4) and m.dtype == torch.float32
    assert torch.isnan(m[3, 1]) and not torch.isnan(m[:3, 1]).any() and not torch.isnan(m[:, [0, 2, 3]]).any()
    assert m[0].tolist() == [1.0, 0.75, 0.0, 1.0]
    weights = torch.tensor([w for _, w in rm.columns])
    assert torch.allclose(torch.nansum(m * weights, dim=1), torch.tensor([s.total for s in scored]))


@pytest.mark.filterwarnings("ignore:AnswerScorer")
def test_reward_model_without_judge_and_disabled_rewards():
    rm = RewardModel(_cfg(process_weight=0.0, length_weight=0.0), None, tau=0.6)
    scored, stats = rm.score(COMPLETIONS[:2], [_rec(0), _rec(1)])
    assert all(not s.judged and s.step_valid is None and s.r_process is None for s in scored)
    assert scored[0].total == 1.0 and scored[0].r_length == 0.0
    assert stats["unjudged"] == 0
    assert rm.columns == [("answer", 1.0)]   # a disabled reward is not a column
    m = rm.reward_matrix(scored)
    assert m.shape == (2, 1) and m[0, 0] == 1.0

    # a judge is still used for step validity (MRPO shaping) when the process reward is off
    rm = RewardModel(_cfg(process_weight=0.0, answer_weight=2.0), FakeJudge())
    scored, _ = rm.score(COMPLETIONS[:1], [_rec(0)])
    assert scored[0].judged and scored[0].step_valid == [True, True, False, True]
    assert [name for name, _ in rm.columns] == ["answer", "length"]
    assert scored[0].total == 2.0 and rm.reward_matrix(scored).tolist() == [[1.0, 0.0]]


@pytest.mark.filterwarnings("ignore:AnswerScorer")
def test_reward_model_errors_and_tag():
    with pytest.raises(ValueError, match="process_weight"):
        RewardModel(_cfg(), None)
    rm = RewardModel(_cfg(), FakeJudge())
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        rm.score(COMPLETIONS[:2], [_rec(0)])
    with pytest.raises(KeyError, match="record 0 .*solution"):
        rm.score(COMPLETIONS[:1], [{"id": "x", "problem": "p"}])
    rm = RewardModel(_cfg(), FakeJudge(), reasoning_tag="thinking")
    scored, _ = rm.score(["<thinking>A good one. A bad one.</thinking><answer>left lung</answer>"], [_rec(0)])
    assert [s.text for s in scored[0].steps] == ["A good one.", "A bad one."]


@pytest.mark.filterwarnings("ignore:AnswerScorer")
@pytest.mark.parametrize("method,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                          ("dr_grpo", "group"), ("gdpo", "group")])
def test_unjudged_completion_is_not_ranked_as_all_invalid(method, scale):
    """The issue's case end to end: 4 identical completions, the judge fails on one. Before, its process
    reward entered as 0 and gave A = [0.5, 0.5, 0.5, -1.5]; now it sits at the group mean (A = 0)."""
    text = "<think>A good look. A bad sign. A good step. A good end.</think><answer>left lung</answer>"
    rm = RewardModel(_cfg(format_weight=0.5), FakeJudge(fail={"s3"}))
    scored, stats = rm.score([text] * 4, [_rec(i) for i in range(4)])
    assert stats["unjudged"] == 1 and [s.judged for s in scored] == [True, True, True, False]
    m = rm.reward_matrix(scored)
    weights = torch.tensor([w for _, w in rm.columns])
    adv = compute_advantages(m, 4, method=method, scale=scale, weights=weights)
    assert torch.equal(adv, torch.zeros(4))
    # a second group in which nothing was judged: its advantages come from answer, length and format
    other = ["<think>A good one. A bad one.</think><answer>left lung</answer>", "I do not know",
             "<think>A good one.</think><answer>right kidney</answer>", text]
    rm = RewardModel(_cfg(format_weight=0.5), FakeJudge(fail={f"s{i}" for i in range(4)}))
    scored, _ = rm.score(other, [_rec(i) for i in range(4)])
    m = rm.reward_matrix(scored)
    assert torch.isnan(m[[0, 2, 3], 1]).all() and m[1, 1] == 0.0   # "I do not know": K = 0, judged locally
    m[1, 1] = float("nan")
    adv = compute_advantages(m, 4, method=method, scale=scale, weights=weights)
    without = compute_advantages(m[:, [0, 2, 3]], 4, method=method, scale=scale, weights=weights[[0, 2, 3]])
    assert torch.allclose(adv, without, atol=1e-6) and adv.abs().max() > 0.1
