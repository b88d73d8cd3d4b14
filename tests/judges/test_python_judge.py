"""judge.kind=python (a step judge as your function), judge.prompt_template, and the plug-in loader."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mrpo.config import ConfigError, JudgeConfig, load_config
from mrpo.eval.__main__ import main as eval_main
from mrpo.judges import build_judge
from mrpo.judges.base import FAILURE_CAUSES, JudgeRequest, StepVerdict
from mrpo.judges.cache import JudgeCache
from mrpo.judges.prompt import (DEFAULT_PROMPT, PROMPT_VERSION, SYSTEM_PROMPT, JudgePrompt, PromptTemplateError,
                                build_messages)
from mrpo.plugins import PluginError, load_function
from mrpo.rewards import judge_metrics

REPO_PAPER_PROMPT = Path(__file__).resolve().parents[2] / "configs" / "judge_prompts" / "paper.yaml"


def _req(steps=("The lesion is left.", "So the answer is left."), sid="s0", **kw):
    base = dict(sample_id=sid, problem="Which side?", image=None, gold_answer="left", gold_reasoning="Left lesion.",
                steps=list(steps))
    base.update(kw)
    return JudgeRequest(**base)


JUDGE_SOURCE = """
    CALLS = []

    def judge(steps, question, images, gold_reasoning, **extra):
        CALLS.append(dict(steps=steps, question=question, images=images, gold_reasoning=gold_reasoning, **extra))
        if extra["sample_id"] == "boom":
            raise RuntimeError("judge backend down")
        if extra["sample_id"] == "declined":
            return None
        if extra["sample_id"] == "short":
            return {"valid": [True]}
        if extra["sample_id"] == "valid_only":
            return [("left" in s) for s in steps]
        return {"alignment": [int("left" in s) for s in steps], "contribution": [0] * (len(steps) - 1) + [1]}
"""


def test_python_judge_verdicts_arguments_and_failure_causes(plugin):
    mod = plugin(JUDGE_SOURCE)
    judge = build_judge(JudgeConfig(kind="python", function=f"{mod}:judge"))
    reqs = [_req(), _req(sid="valid_only", steps=["left", "right"]), _req(sid="boom"), _req(sid="declined"),
            _req(sid="short"), _req(sid="empty", steps=[])]
    out = judge.judge(reqs)
    assert out[0] == StepVerdict([1, 1], [0, 1])
    assert out[1] == StepVerdict([1, 0], [1, 0]) and out[1].valid == [True, False]
    assert out[2:5] == [None, None, None]
    assert out[5] == StepVerdict([], [])                                 # K = 0 is not sent
    calls = __import__(mod).CALLS
    assert len(calls) == 5
    assert calls[0] == dict(steps=reqs[0].steps, question="Which side?", images=[], gold_reasoning="Left lesion.",
                            gold_answer="left", sample_id="s0", facts=None)
    causes = {c: n for c, n in judge.stats.causes.items() if n}
    assert causes == {"exception": 1, "no_label": 1, "invalid_reply": 1} and judge.stats.failures == 3
    assert "exception" in FAILURE_CAUSES


def test_python_judge_is_cached_and_a_source_edit_invalidates(plugin, tmp_path):
    mod = plugin(JUDGE_SOURCE)
    cfg = JudgeConfig(kind="python", function=f"{mod}:judge", cache_dir=str(tmp_path / "cache"))
    first = build_judge(cfg).judge([_req()])
    again = build_judge(cfg)
    assert again.judge([_req()]) == first and again.stats.cache_hits == 1
    assert len(__import__(mod).CALLS) == 1                               # served from the cache
    other = plugin(JUDGE_SOURCE.replace("[0] * (len(steps) - 1) + [1]", "[1] * len(steps)"))
    edited = build_judge(JudgeConfig(kind="python", function=f"{other}:judge", cache_dir=str(tmp_path / "cache")))
    assert edited.judge([_req()]) == [StepVerdict([1, 1], [1, 1])] and edited.stats.cache_hits == 0


def test_async_python_judge_runs_requests_concurrently(plugin):
    mod = plugin("""
        import asyncio, threading, time
        WINDOWS = []

        async def judge(steps, **_):
            start = time.perf_counter()
            await asyncio.sleep(0.2)
            WINDOWS.append((start, time.perf_counter()))
            return {"valid": [True] * len(steps)}
    """)
    judge = build_judge(JudgeConfig(kind="python", function=f"{mod}:judge", max_concurrency=4))
    out = judge.judge([_req(sid=str(i)) for i in range(4)])
    assert out == [StepVerdict([1, 1], [1, 1])] * 4
    windows = __import__(mod).WINDOWS
    assert max(s for s, _ in windows) < min(e for _, e in windows)      # all four were in flight at once


def test_python_judge_failures_reach_the_judge_metrics(plugin):
    from mrpo.rewards import RewardModel

    mod = plugin("""
        def judge(steps, sample_id, **_):
            if sample_id == "b":
                raise ValueError("nope")
            return [True] * len(steps)
    """)
    judge = build_judge(JudgeConfig(kind="python", function=f"{mod}:judge"))
    cfg = SimpleNamespace(answer_weight=1.0, process_weight=1.0, length_weight=0.0, format_weight=0.0, k_min=1,
                          k_max=10, bert_model_path=None, custom=[])
    rm = RewardModel(cfg, judge)
    text = "<think>Step one.\nStep two.</think><answer>left</answer>"
    records = [{"id": i, "problem": "q", "solution": "left", "gold_reasoning": "r"} for i in ("a", "b")]
    scored, stats = rm.score([text, text], records)
    m = judge_metrics(stats)
    assert m["judge_sent"] == 2 and m["unjudged"] == 1 and m["unjudged/exception"] == 1
    assert scored[0].r_process == 1.0 and scored[1].r_process is None and not scored[1].judged
    from mrpo.judges.outage import JudgeOutageError, UnjudgedGuard

    guard = UnjudgedGuard(max_fraction=0.4, window=2, judge=repr(judge))
    guard.update_from_metrics(1, m)
    with pytest.raises(JudgeOutageError, match=r"50% .* \(causes: exception 2\).*PythonJudge") as err:
        guard.update_from_metrics(2, m)                                   # the same outage guard as http
    assert {c: n for c, n in err.value.causes.items() if n} == {"exception": 2.0}


def test_python_judge_config_errors_are_one_line(plugin):
    mod = plugin("def needs_more(steps, question, rubric): return [True] * len(steps)\nNOT_A_FUNCTION = 3\n")
    for function, expected in [(None, "judge.function=None is invalid: judge.kind=python needs a function"),
                               ("no_such_module_xyz:judge", "cannot import module 'no_such_module_xyz'"),
                               (f"{mod}:missing", f"module '{mod}' has no attribute 'missing'"),
                               (f"{mod}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
                               (f"{mod}:needs_more", "required parameter 'rubric'"),
                               ("not a path", "must look like 'pkg.module:function'")]:
        overrides = ["judge.kind=python"] + ([f"judge.function={function}"] if function else [])
        with pytest.raises(ConfigError, match="judge.function") as err:
            load_config(None, overrides)
        assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="judge.kind=python only"):
        load_config(None, [f"judge.function={mod}:needs_more"])


def test_module_that_fails_to_import_is_named(plugin):
    mod = plugin("import no_such_dependency_abc\n")
    with pytest.raises(PluginError, match=rf"reward.custom\[0\].function='{mod}:f': cannot import module '{mod}' "
                                          r"\(while importing it: ModuleNotFoundError"):
        load_function(f"{mod}:f", "reward.custom[0].function")
    bad = plugin("raise RuntimeError('broken\\nmodule')\n")
    with pytest.raises(PluginError, match=r"importing module .* failed: RuntimeError: broken module$"):
        load_function(f"{bad}:f", "judge.function")


# ----------------------------------------------------------------------------- mrpo.eval reasoning


def _predictions(tmp_path):
    rows = [{"id": f"r{i}", "problem": "Which side?", "solution": "left", "answer": "right", "gold_reasoning": "L.",
             "text": "<think>The lesion is left. It is on the left side. So right.</think><answer>right</answer>"}
            for i in range(3)]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_reasoning_with_a_python_judge(plugin, tmp_path, capsys):
    mod = plugin("""
        def judge(steps, **_):
            return {"alignment": [int("left" in s) for s in steps], "contribution": [0] * len(steps)}
    """)
    pred = _predictions(tmp_path)
    assert eval_main(["reasoning", "--pred", str(pred), "--judge", "python", "--judge-function", f"{mod}:judge",
                      "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads((tmp_path / "reasoning.json").read_text())
    assert summary["judge"] == "PythonJudge" and summary["sent_to_judge"] == 3 and summary["unjudged"] == 0
    assert summary["wrong"]["with_failure"] == 3 and summary["stage_counts"]["late"] == 3   # step 3 of 3 fails
    rows = [json.loads(line) for line in (tmp_path / "reasoning_steps.jsonl").read_text().splitlines()]
    assert all(r["valid"] == [True, True, False] for r in rows)
    assert any((tmp_path / "cache").rglob("*.json"))                      # the same cache as the other judges
    assert "judge PythonJudge: 3 completions sent, 0 unjudged" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--judge", "python", "--judge-function", "no_such_module_xyz:judge"],
     "error: judge.function='no_such_module_xyz:judge': cannot import module 'no_such_module_xyz'"),
    (["--judge", "python"], "error: --judge python needs --judge-function pkg.module:fn"),
    (["--judge", "rule", "--judge-function", "x:y"], "error: --judge-function is used by --judge python only"),
    (["--judge", "rule", "--judge-prompt-template", "t.yaml"], "error: --judge-prompt-template is used by"),
])
def test_eval_bad_judge_arguments_exit_2_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        eval_main(["reasoning", "--pred", str(_predictions(tmp_path)), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_train_bad_function_path_exits_2_in_one_line(tmp_path, capsys):
    from mrpo.train import main

    code = main([f"output_dir={tmp_path / 'run'}",
                 'reward.custom=[{name: brevity, function: "no_such_module_xyz:brevity", weight: 0.5}]'])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reward.custom[0].function='no_such_module_xyz:brevity': cannot import module" in err
    assert not (tmp_path / "run").exists()                                 # refused before anything was written


# ----------------------------------------------------------------------------- judge.prompt_template


def _old_user_text(req):   # the prompt as it was before templates, written out independently
    steps = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(req.steps))
    return (f"Question: {req.problem}\nReference answer: {req.gold_answer}\n"
            f"Reference rationale: {req.gold_reasoning or '(not available)'}\n\n"
            f"Reasoning steps to grade (K = {len(req.steps)}):\n{steps}\n\n"
            f"Return the JSON object with exactly {len(req.steps)} entries.")


def test_default_prompt_and_the_shipped_paper_file_are_todays_prompt():
    shipped = JudgePrompt.from_file(REPO_PAPER_PROMPT)
    for req in (_req(), _req(gold_reasoning="", problem="What {is} this?", steps=["a {b}", "c"])):
        expected = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _old_user_text(req)}]
        assert build_messages(req, with_image=False) == expected
        assert shipped.messages(req, with_image=False) == expected
    assert shipped.version == DEFAULT_PROMPT.version == PROMPT_VERSION   # existing caches stay valid


def test_custom_template_renders_and_gets_its_own_cache_key(tmp_path):
    path = tmp_path / "prompt.yaml"
    path.write_text('user: |-\n  Q: {question} ({num_steps} steps, literal {{braces}})\n  {steps}\n')
    prompt = JudgePrompt.from_file(path)
    msgs = prompt.messages(_req(), with_image=False)
    assert msgs[0]["content"] == SYSTEM_PROMPT                            # system left out: the paper's
    assert msgs[1]["content"] == ("Q: Which side? (2 steps, literal {braces})\n"
                                  "Step 1: The lesion is left.\nStep 2: So the answer is left.")
    assert prompt.version != PROMPT_VERSION
    cache = JudgeCache(tmp_path / "c")
    assert cache.key("m", _req(), prompt.version) != cache.key("m", _req(), PROMPT_VERSION)


@pytest.mark.parametrize("text, message", [
    ("user: 'Q: {question} {stpes}'", r"unknown field \{stpes\} in 'user' \(did you mean \{steps\}\?\)"),
    ("user: 'Q: {question} {}'", r"positional field \{\} in 'user'"),
    ("user: 'Q: {question.upper} {steps}'", r"unknown field \{question.upper\}"),
    ("user: 'Q: {question}'", r"'user' has no \{steps\} field"),
    ("user: 'Q: {question {steps}'", r"'user' is not a valid template"),
    ("user: '{steps} {num_steps:q}'", r"'user' cannot be rendered"),
    ("system: hi\nuser: '{steps}'\nextra: 1", r"unknown key 'extra'"),
    ("system: hi", r"'user' must be a non-empty text"),
    ("- a list", r"expected a YAML mapping"),
])
def test_invalid_templates_are_refused_naming_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PromptTemplateError, match=rf"judge.prompt_template='{path}': {message}"):
        JudgePrompt.from_file(path)
    with pytest.raises(ConfigError, match=message):                      # at start-up
        load_config(None, ["judge.kind=http", f"judge.prompt_template={path}"])


def test_http_judge_sends_the_template(tmp_path, monkeypatch):
    from mrpo.judges.http import HTTPJudge

    path = tmp_path / "prompt.yaml"
    path.write_text("system: Grade strictly.\nuser: 'Steps of {question}:\n\n  {steps}'\n")
    judge = HTTPJudge(JudgeConfig(kind="http", prompt_template=str(path), cache_dir=str(tmp_path / "c")))
    sent = []

    def complete(messages, parse, **_):
        sent.append(messages)
        return parse('{"steps": [{"alignment": 1, "contribution": 0}, {"alignment": 1, "contribution": 1}]}')
    monkeypatch.setattr(judge.client, "complete", complete)
    assert judge.judge([_req()]) == [StepVerdict([1, 1], [0, 1])]
    assert sent[0] == [{"role": "system", "content": "Grade strictly."},
                       {"role": "user", "content": "Steps of Which side?:\nStep 1: The lesion is left.\n"
                                                   "Step 2: So the answer is left."}]
    cache = JudgeCache(tmp_path / "c")
    assert cache.get(cache.key(judge.model, _req(), judge.prompt.version)) == StepVerdict([1, 1], [0, 1])
    assert cache.get(cache.key(judge.model, _req(), PROMPT_VERSION)) is None
