"""reward.custom: your own reward functions, each its own reward column (calls, async, failures, advantages)."""
import math
from types import SimpleNamespace

import pytest
import torch

from mrpo.algo.advantages import compute_advantages
from mrpo.config import ConfigError, load_config
from mrpo.rewards.custom import CUSTOM_FAILURE_CAUSES, CustomRewards


def _custom(*items):
    return CustomRewards.from_config([{"weight": 1.0, **item} for item in items])


RECORDS = [{"id": "a", "problem": "Which side?", "solution": "left", "image": "a.png", "dataset": "vqa_rad"},
           {"id": "b", "problem": "How many?", "solution": "2", "image": ["b1.png", "b2.png"]}]


def test_call_passes_completions_answers_steps_and_record_columns(plugin):
    mod = plugin("""
        SEEN = {}

        def everything(**kwargs):
            SEEN.update(kwargs)
            return [len(c) for c in kwargs["completions"]]

        def named(completions, solution):       # no **kwargs: only the arguments it names
            return [float(c.endswith(s)) for c, s in zip(completions, solution)]
    """)
    rewards = _custom({"name": "chars", "function": f"{mod}:everything"}, {"name": "ends", "function": f"{mod}:named"})
    values, failed = rewards.score(["xx left", "yyy"], ["left", None], [["s1", "s2"], []], RECORDS)
    assert values == {"chars": [7.0, 3.0], "ends": [1.0, 0.0]}
    assert failed == {n: dict.fromkeys(CUSTOM_FAILURE_CAUSES, 0) for n in ("chars", "ends")}
    seen = __import__(mod).SEEN
    assert seen == {"prompts": ["Which side?", "How many?"], "completions": ["xx left", "yyy"],
                    "answers": ["left", None], "steps": [["s1", "s2"], []], "id": ["a", "b"],
                    "problem": ["Which side?", "How many?"], "solution": ["left", "2"],
                    "image": ["a.png", ["b1.png", "b2.png"]], "dataset": ["vqa_rad", None]}


def test_async_rewards_run_concurrently_with_each_other(plugin):
    mod = plugin("""
        import asyncio, time
        WINDOWS = {}

        async def slow_a(completions, **_):
            start = time.perf_counter()
            await asyncio.sleep(0.3)
            WINDOWS["a"] = (start, time.perf_counter())
            return [1.0] * len(completions)

        async def slow_b(completions, **_):
            start = time.perf_counter()
            await asyncio.sleep(0.3)
            WINDOWS["b"] = (start, time.perf_counter())
            return [None, 2.0]

        def plain(completions, **_):
            return [0.5] * len(completions)
    """)
    rewards = _custom({"name": "a", "function": f"{mod}:slow_a"}, {"name": "p", "function": f"{mod}:plain"},
                      {"name": "b", "function": f"{mod}:slow_b"})
    values, _ = rewards.score(["x", "y"], [None, None], [[], []], RECORDS)
    assert values == {"a": [1.0, 1.0], "p": [0.5, 0.5], "b": [None, 2.0]}    # config order kept
    (sa, ea), (sb, eb) = __import__(mod).WINDOWS["a"], __import__(mod).WINDOWS["b"]
    assert max(sa, sb) < min(ea, eb)                  # the two sleeps overlapped (in order: 0.3 s + 0.3 s)
    again, _ = rewards.score(["x", "y"], [None, None], [[], []], RECORDS)   # the event loop is reused
    assert again == values


def test_failures_are_counted_per_cause_logged_once_and_lose_only_their_values(plugin, caplog):
    mod = plugin("""
        def raises(completions, **_):
            raise ZeroDivisionError("division by zero")

        async def raises_async(completions, **_):
            raise KeyError("solution")

        def short(completions, **_):
            return [1.0]

        def text(completions, **_):
            return ["good", "bad"]

        def infinite(completions, **_):
            return [float("inf"), 1.0]

        def not_a_number(completions, **_):
            return [float("nan"), 1.0]               # NaN is an invalid value, not a silent None

        def fine(completions, **_):
            return [None, 3]                         # None = missing
    """)
    names = ["raises", "raises_async", "short", "text", "infinite", "not_a_number", "fine"]
    rewards = _custom(*({"name": n, "function": f"{mod}:{n}"} for n in names))
    with caplog.at_level("WARNING", logger="mrpo.rewards.custom"):
        values, failed = rewards.score(["x", "y"], [None, None], [[], []], RECORDS)
    assert values == {**{n: [None, None] for n in names[:-1]}, "fine": [None, 3.0]}
    causes = {n: {c: k for c, k in failed[n].items() if k} for n in names}
    assert causes == {"raises": {"exception": 2}, "raises_async": {"exception": 2}, "short": {"wrong_length": 2},
                      "text": {"invalid_value": 2}, "infinite": {"invalid_value": 2},
                      "not_a_number": {"invalid_value": 2}, "fine": {}}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1                                               # one line per batch
    assert "6 of 7 calls failed" in warnings[0]
    assert "'infinite' (" in warnings[0] and "value 0 is inf" in warnings[0] and "value 0 is nan" in warnings[0]
    assert "'raises' (" in warnings[0] and "exception: raised ZeroDivisionError: division by zero" in warnings[0]
    assert "wrong_length: returned 1 values for 2 completions" in warnings[0]
    assert "value 0 is 'good' (str)" in warnings[0]


def test_weight_zero_is_not_called_and_config_is_validated(plugin):
    mod = plugin("def never(**_):\n    raise AssertionError('called')\n")
    rewards = CustomRewards.from_config([{"name": "off", "function": f"{mod}:never", "weight": 0.0}])
    assert not rewards and rewards.names == []
    from mrpo.config import BUILTIN_REWARDS
    from mrpo.rewards import REWARD_COLUMNS

    assert BUILTIN_REWARDS == REWARD_COLUMNS                                # names a custom reward may not take
    cfg = load_config(None, [f'reward.custom=[{{name: brevity, function: "{mod}:never", weight: 0.5}}, '
                             f'{{name: other, function: "{mod}:never"}}]'])
    assert cfg.reward.custom == [{"name": "brevity", "function": f"{mod}:never", "weight": 0.5},
                                 {"name": "other", "function": f"{mod}:never", "weight": 1.0}]
    for value, message in [
        ('[{name: x, function: "no_such_module_xyz:f"}]', r"reward.custom\[0\].function='no_such_module_xyz:f': "
                                                          r"cannot import module"),
        (f'[{{name: x, function: "{mod}:nope"}}]', rf"reward.custom\[0\].function='{mod}:nope': module '{mod}' "
                                                   r"has no attribute 'nope'"),
        (f'[{{name: length, function: "{mod}:never"}}]', r"reward.custom\[0\].name='length' clashes with the built-in"),
        (f'[{{name: a, function: "{mod}:never"}}, {{name: a, function: "{mod}:never"}}]',
         r"reward.custom\[1\].name='a' is already the name of reward.custom\[0\]"),
        (f'[{{name: a, function: "{mod}:never", wieght: 1}}]', r"unknown key 'reward.custom\[0\].wieght' "
                                                                r"\(closest valid key: 'weight'\)"),
        (f'[{{name: a, function: "{mod}:never", weight: .nan}}]', r"reward.custom\[0\].weight=nan must be a finite"),
        ('[{name: a}]', r"reward.custom\[0\].function is missing"),
        ('[{name: "a b", function: "x:y"}]', r"reward.custom\[0\].name='a b' must be a word"),
        ('[brevity]', r"reward.custom\[0\]='brevity' must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [f"reward.custom={value}"])
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- RewardModel + advantages

THINK = "<think>{}</think><answer>{}</answer>"


def _reward_model(custom, **weights):
    from mrpo.rewards import RewardModel

    cfg = SimpleNamespace(answer_weight=1.0, process_weight=0.0, length_weight=0.0, format_weight=0.0, k_min=1,
                          k_max=10, bert_model_path=None, custom=custom, **weights)
    return RewardModel(cfg, judge=None)


def _batch():
    """Two groups of G = 3: answers right/wrong and 1..3 reasoning steps."""
    one, two, three = "The lesion is left.", "The lesion is left. It is big.", "The lesion is left. It is big. So."
    texts = [THINK.format(one, "left"), THINK.format(two, "right"), THINK.format(three, "left"),
             THINK.format(one, "two"), THINK.format(two, "2"), THINK.format(three, "three")]
    records = [{"id": "p0", "problem": "Which side?", "solution": "left"}] * 3 + \
              [{"id": "p1", "problem": "How many?", "solution": "two"}] * 3
    return texts, records


def test_custom_reward_is_its_own_column_and_changes_the_advantages(plugin):
    mod = plugin("""
        def brevity(steps, **_):
            return [1.0 / len(s) for s in steps]
    """)
    rm = _reward_model([{"name": "brevity", "function": f"{mod}:brevity", "weight": 0.5}])
    assert rm.columns == [("answer", 1.0), ("brevity", 0.5)]
    texts, records = _batch()
    scored, _ = rm.score(texts, records)
    matrix = rm.reward_matrix(scored)
    brevity = torch.tensor([1, 1 / 2, 1 / 3] * 2, dtype=torch.float64)
    assert [s.custom for s in scored] == [{"brevity": b} for b in brevity.tolist()]
    torch.testing.assert_close(matrix[:, 1].double(), brevity)               # unweighted in the matrix
    answer = matrix[:, 0].double()
    assert [s.total for s in scored] == pytest.approx((answer + 0.5 * brevity).tolist())
    weights = torch.tensor([w for _, w in rm.columns])

    # GRPO: (r - mean_g) / (std_g + 1e-4) of r = answer + 0.5 brevity, written out in plain torch
    total = (answer + 0.5 * brevity).reshape(2, 3)
    expected = ((total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + 1e-4)).reshape(6)
    adv = compute_advantages(matrix, 3, method="grpo", weights=weights)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
    without = compute_advantages(matrix[:, :1], 3, method="grpo")
    assert not torch.allclose(adv, without)                                  # the reward moved them

    # GDPO: each column normalised in its group on its own, then weighted, then over the batch
    def norm(x):
        x = x.reshape(2, 3)
        return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-4)).reshape(6)
    s = norm(answer) + 0.5 * norm(brevity)
    torch.testing.assert_close(compute_advantages(matrix, 3, method="gdpo", weights=weights).double(),
                               (s - s.mean()) / (s.std() + 1e-4), rtol=1e-5, atol=1e-6)


def test_none_is_missing_never_zero_and_failures_are_missing_too(plugin):
    mod = plugin("""
        def partial(completions, **_):
            return [None, 0.9, 0.3, 0.8, 0.2, 0.4]

        def boom(completions, **_):
            raise RuntimeError("verifier down")
    """)
    rm = _reward_model([{"name": "partial", "function": f"{mod}:partial", "weight": 1.0},
                        {"name": "boom", "function": f"{mod}:boom", "weight": 2.0}])
    texts, records = _batch()
    scored, stats = rm.score(texts, records)
    matrix = rm.reward_matrix(scored).double()
    assert math.isnan(matrix[0, 1]) and torch.isnan(matrix[:, 2]).all()
    assert scored[0].custom == {"partial": None, "boom": None}
    assert scored[0].total == pytest.approx(scored[0].r_answer)             # missing values are left out
    # the advantage treats None as its group's mean of the present values (0.6), not as 0
    imputed = matrix[:, :2].clone()
    imputed[0, 1] = (0.9 + 0.3) / 2
    total = (imputed[:, 0] + imputed[:, 1]).reshape(2, 3)
    expected = ((total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + 1e-4)).reshape(6)
    weights = torch.tensor([w for _, w in rm.columns])
    adv = compute_advantages(matrix, 3, method="grpo", weights=weights).double()
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    as_zero = matrix[:, :2].clone()
    as_zero[0, 1] = 0.0
    assert not torch.allclose(adv, compute_advantages(as_zero, 3, method="grpo").double(), atol=1e-3)

    from mrpo.rollout import rollout_metrics

    m = rollout_metrics(scored, stats, [[1, 2]] * 6)
    assert m["reward/partial"] == pytest.approx((0.9 + 0.3 + 0.8 + 0.2 + 0.4) / 5)
    assert m["reward_missing/partial"] == 1 and m["reward_missing/boom"] == 6
    assert math.isnan(m["reward/boom"]) and m["reward_failed/boom/exception"] == 6
    assert {k for k in m if k.startswith("reward_failed/")} == {
        f"reward_failed/{n}/{c}" for n in ("partial", "boom") for c in CUSTOM_FAILURE_CAUSES}


def test_reward_custom_from_a_yaml_file(plugin, tmp_path):
    mod = plugin("def brevity(steps, **_):\n    return [1.0 / max(len(s), 1) for s in steps]\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"reward:\n  custom:\n    - {{name: brevity, function: \"{mod}:brevity\", weight: 0.5}}\n"
                    f"    - name: again\n      function: {mod}:brevity\n")
    cfg = load_config(path)
    assert [(c["name"], c["weight"]) for c in cfg.reward.custom] == [("brevity", 0.5), ("again", 1.0)]


def test_readme_examples_run(tmp_path, monkeypatch):
    """The plain-function examples of README "Your own rewards and judges" (the async one needs a server)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Your own rewards and judges", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    by_file = {b.splitlines()[0].lstrip("# ").strip(): b for b in blocks}
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "readme_rewards.py").write_text(blocks[0])
    (tmp_path / "readme_judge.py").write_text(by_file["myjudge.py"])
    rewards = CustomRewards.from_config([{"name": "brevity", "function": "readme_rewards:brevity", "weight": 0.5}])
    values, failed = rewards.score(["a", "b", "c"], [None] * 3, [["s"] * 3, ["s"] * 9, []], RECORDS + RECORDS[:1])
    assert values == {"brevity": [1.0, 0.5, None]} and not any(failed["brevity"].values())
    from mrpo.config import JudgeConfig
    from mrpo.judges import build_judge
    from mrpo.judges.base import JudgeRequest, StepVerdict

    judge = build_judge(JudgeConfig(kind="python", function="readme_judge:judge"))
    req = JudgeRequest("s", "Which side?", None, "left", "the lesion is in the left lung",
                       ["The lesion is in the left lung.", "So the answer is left.", "Unrelated."])
    assert judge.judge([req]) == [StepVerdict([1, 0, 0], [1, 1, 0])]


def test_completions_reach_the_reward_without_special_tokens(plugin):
    mod = plugin("SEEN = []\n\ndef seen(completions, **_):\n    SEEN.extend(completions)\n    return [0.0] * len(completions)\n")
    rm = _reward_model([{"name": "seen", "function": f"{mod}:seen", "weight": 1.0}])
    text = THINK.format("The lesion is left.", "left")
    rm.score([text + "<|im_end|>"], [{"id": "a", "problem": "q", "solution": "left"}], special_tokens=["<|im_end|>"])
    assert __import__(mod).SEEN == [text]
