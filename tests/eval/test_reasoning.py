"""First Failure Point / Failure Accumulation Rate on hand-built records with known values."""
import json
from fractions import Fraction

import pytest

from mrpo.eval.reasoning import (
    cascade_counts,
    evaluate_generations,
    evaluate_reasoning,
    failure_accumulation_rate,
    failure_cascade_stats,
    far_bin,
    ffp_stage,
    first_failure_point,
    summary_from_counts,
)
from mrpo.judges.base import JudgeStats, StepVerdict

T, F = True, False

# (correct, valid) -> expected (stage, FFP, FAR, FAR bin) worked out by hand
WRONG_WITH_FAILURE = [
    ([T, F, F, T], "early", Fraction(1, 4), 0.5, 1),
    ([F, F, F], "early", Fraction(0), 1.0, 0),
    ([T, F, T], "mid", Fraction(1, 3), 0.0, 1),          # FFP exactly 1/3 -> mid
    ([T, T, F], "late", Fraction(2, 3), None, 3),         # FFP exactly 2/3 -> late; last step: FAR undefined
    ([T, T, T, T, T, F, F, T, F, T], "mid", Fraction(1, 2), 0.5, 2),
    ([T, T, T, T, F, F], "late", Fraction(2, 3), 1.0, 3),  # 4/6 = 2/3 -> late
    ([T] * 9 + [F, T], "late", Fraction(9, 11), 0.0, 4),
]


def hand_records():
    recs = [{"correct": False, "valid": v} for v, *_ in WRONG_WITH_FAILURE]
    recs += [
        {"correct": False, "valid": [T, T]},   # no failure
        {"correct": False, "valid": []},       # no steps
        {"correct": False, "valid": None},     # step judge failed
        {"correct": True, "valid": [T, F]},
        {"correct": True, "valid": None},
        {"correct": None, "valid": [F]},       # answer verdict unknown
    ]
    return recs


@pytest.mark.parametrize("valid,stage,ffp,far,b", WRONG_WITH_FAILURE)
def test_single_record_values(valid, stage, ffp, far, b):
    f = valid.index(False)
    assert first_failure_point(valid) == pytest.approx(float(ffp))
    assert ffp_stage(f, len(valid)) == stage
    assert failure_accumulation_rate(valid) == far
    assert far_bin(f, len(valid)) == b


def test_no_failure_values():
    assert first_failure_point([T, T]) is None
    assert first_failure_point([]) is None
    assert failure_accumulation_rate([T, T, T]) is None
    with pytest.raises(ValueError):
        ffp_stage(3, 3)


def test_stage_and_bin_boundaries_match_exact_fractions():
    for k in range(1, 40):
        for f in range(k):
            x = Fraction(f, k)
            want = "early" if x < Fraction(1, 3) else ("mid" if x < Fraction(2, 3) else "late")
            assert ffp_stage(f, k) == want, (f, k)
            assert far_bin(f, k) == min(int(x / Fraction(1, 5)), 4), (f, k)


def test_failure_cascade_stats_hand_built():
    s = failure_cascade_stats(hand_records())
    assert (s["n_records"], s["n_correct"], s["n_wrong"], s["answer_unjudged"]) == (13, 2, 10, 1)
    assert s["wrong"] == {"with_failure": 7, "no_failure": 1, "no_steps": 1, "unjudged": 1}
    assert s["wrong_judged"] == 8
    assert s["stage_counts"] == {"early": 2, "mid": 2, "late": 3}
    assert s["stage_shares"] == pytest.approx({"early": 2 / 7, "mid": 2 / 7, "late": 3 / 7})
    assert s["early_failure_share"] == pytest.approx(2 / 7)
    assert s["mean_ffp"] == pytest.approx(float(sum(x[2] for x in WRONG_WITH_FAILURE) / 7))
    assert s["far"]["counts"] == [1, 2, 1, 1, 1]
    assert s["far"]["mean"] == pytest.approx([1.0, 0.25, 0.5, 1.0, 0.0])
    assert s["far"]["bin_centers"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert s["far"]["undefined"] == 1
    assert s["far"]["overall"] == pytest.approx(0.5)
    assert s["step_validity"] == pytest.approx({"all": 30 / 44, "correct": 1 / 2, "wrong": 29 / 42})
    assert s["accuracy"] == pytest.approx(2 / 12)
    json.dumps(s)  # serialisable


def test_empty_and_all_correct():
    s = failure_cascade_stats([{"correct": True, "valid": [T]}])
    assert s["stage_shares"] == {"early": None, "mid": None, "late": None}
    assert s["early_failure_share"] != s["early_failure_share"]  # NaN for logging
    assert s["far"]["mean"] == [None] * 5 and s["far"]["overall"] is None
    assert failure_cascade_stats([])["n_records"] == 0


def test_counts_reduce_across_shards():
    recs = hand_records()
    a, b = cascade_counts(recs[:5]), cascade_counts(recs[5:])
    assert a.keys() == b.keys()
    merged = summary_from_counts({k: float(a[k] + b[k]) for k in a})  # all-reduce as float64
    whole = failure_cascade_stats(recs)
    for key in ("stage_counts", "stage_shares", "wrong", "far", "step_validity", "mean_ffp", "accuracy"):
        assert_nested_close(merged[key], whole[key], key)


def assert_nested_close(got, want, where: str) -> None:
    """Dicts and lists compared element by element; numbers to pytest.approx's default tolerance."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_nested_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_nested_close(g, w, f"{where}[{i}]")
    elif want is None:
        assert got is None, where
    else:
        assert got == pytest.approx(want, nan_ok=True), where


class FakeJudge:
    """A step is invalid when its text contains 'bad'; sample 'boom' fails; 'short' gets a wrong-length verdict."""

    def __init__(self):
        self.stats = JudgeStats()
        self.seen = []

    def judge(self, requests):
        out = []
        for r in requests:
            self.seen.append(r.sample_id)
            self.stats.requests += 1
            if r.sample_id == "boom":
                self.stats.failures += 1
                out.append(None)
            elif r.sample_id == "short":
                out.append(StepVerdict([1], [0]))
            else:
                bad = ["bad" in s for s in r.steps]
                out.append(StepVerdict([int(not x) for x in bad], [0] * len(bad)))
        return out


def _pred(id_, correct, steps):
    return {"id": id_, "problem": "q?", "solution": "yes", "image": None, "gold_reasoning": "", "dataset": "d",
            "answer_type": "closed", "correct": correct, "steps": steps}


def test_evaluate_reasoning_with_judge(tmp_path):
    preds = [_pred("a", False, ["good.", "bad.", "bad.", "good."]),   # early, FAR 1/2
             _pred("b", False, ["good.", "good.", "bad."]),           # late
             _pred("c", True, ["bad."]),                              # correct: not sent
             _pred("boom", False, ["good."]),                         # judge failure -> unjudged
             _pred("short", False, ["x.", "y."]),                     # wrong-length verdict -> unjudged
             _pred("e", False, [])]                                   # no steps: not sent
    judge = FakeJudge()
    s = evaluate_reasoning(preds, judge, out_dir=tmp_path)
    assert judge.seen == ["a", "b", "boom", "short"]
    assert s["sent_to_judge"] == 4 and s["unjudged"] == 2
    assert s["wrong"] == {"with_failure": 2, "no_failure": 0, "no_steps": 1, "unjudged": 2}
    assert s["stage_counts"] == {"early": 1, "mid": 0, "late": 1}
    assert s["judge_stats"]["failures"] == 1
    on_disk = json.loads((tmp_path / "reasoning.json").read_text())
    assert on_disk["stage_counts"] == s["stage_counts"]
    rows = [json.loads(x) for x in (tmp_path / "reasoning_steps.jsonl").read_text().splitlines()]
    assert rows[0]["valid"] == [T, F, F, T] and rows[2]["valid"] is None and rows[5]["valid"] == []

    judge_all = FakeJudge()
    s2 = evaluate_reasoning(preds, judge_all, judge_all=True)
    assert "c" in judge_all.seen and s2["step_validity"]["correct"] == 0.0


def test_rule_judge_on_synthetic_rationales():
    """Gold rationale steps are valid under the rule judge; a wrong first step makes an early failure."""
    from mrpo.data.synthetic import make_example
    from mrpo.judges.rule import RuleJudge
    from mrpo.rewards.steps import split_steps

    preds = []
    for i in range(6):
        rec, _ = make_example(0, "test", i)
        steps = [s.text for s in split_steps(rec["gold_reasoning"])]
        wrong_organ = "brain" if rec["facts"]["organ"] != "brain" else "liver"
        if i % 2:   # corrupt the first step's organ... via an extra leading false statement
            steps = [f"The image shows the {wrong_organ}."] + steps
        preds.append({**rec, "image": None, "steps": steps, "correct": False})
    s = evaluate_reasoning(preds, RuleJudge())
    assert s["wrong"]["unjudged"] == 0
    assert s["wrong"]["with_failure"] == 3 and s["stage_counts"]["early"] == 3


def test_evaluate_generations_writes_eval_layout(tmp_path):
    from mrpo.judges.rule import RuleJudge

    facts = {"modality": "ct", "organ": "lung", "lesion_count": 1, "side": "left", "size": "small",
             "question_type": "laterality", "answer_type": "closed", "asked": "left", "answer": "yes"}
    recs = [{"id": "r1", "problem": "Is the lesion on the left side?", "solution": "yes", "image": None,
             "gold_reasoning": "", "dataset": "synthetic", "answer_type": "closed", "facts": facts},
            {"id": "r2", "problem": "Is the lesion on the left side?", "solution": "yes", "image": None,
             "gold_reasoning": "", "dataset": "synthetic", "answer_type": "closed", "facts": facts}]
    texts = ["<think>The image is an MRI scan. The scan shows the lungs. There is one lesion on the right side."
             "</think><answer>no</answer>",
             "<think>The image is a CT scan. There is one lesion on the left side.</think><answer>yes</answer>"]
    s = evaluate_generations(recs, texts, RuleJudge(), "think", out_dir=tmp_path)
    assert s["n_correct"] == 1 and s["n_wrong"] == 1 and s["accuracy"] == 0.5
    assert s["stage_counts"]["early"] == 1 and s["wrong_judged"] == 1
    assert s["far"]["counts"][0] == 1 and s["far"]["mean"][0] == pytest.approx(0.5)  # steps 2,3: valid, invalid
    for name in ("predictions.jsonl", "answers.json", "reasoning.json", "reasoning_steps.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "answers.json").read_text())["overall"]["rule_accuracy"] == 0.5


def test_evaluate_over_ranks_on_one_process_is_evaluate_generations(tmp_path):
    """The trainer's evaluation (judging split over ranks; here one) writes what evaluate_generations writes,
    plus summary.json; the multi-rank split is tested on 2 ranks in tests/trainer/test_one_rank_faults_e2e.py."""
    from mrpo.eval.reasoning import evaluate_over_ranks
    from mrpo.judges.rule import RuleJudge

    facts = {"modality": "ct", "organ": "lung", "lesion_count": 1, "side": "left", "size": "small",
             "question_type": "laterality", "answer_type": "closed", "asked": "left", "answer": "yes"}
    recs = [{"id": f"r{i}", "problem": "Is the lesion on the left side?", "solution": "yes", "image": None,
             "gold_reasoning": "", "dataset": "synthetic", "answer_type": "closed", "facts": facts} for i in range(3)]
    texts = ["<think>The image is a CT scan. There is one lesion on the right side.</think><answer>no</answer>",
             "<think>There is one lesion on the left side.</think><answer>yes</answer>",
             "<think>The scan shows the lungs. The lesion is large.</think><answer>no</answer>"]
    expected = evaluate_generations(recs, texts, RuleJudge(), "think", out_dir=tmp_path / "plain")
    got = evaluate_over_ranks(recs, texts, RuleJudge(), "think", tmp_path / "ranks")
    assert json.dumps(got, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)
    for name in ("predictions.jsonl", "reasoning.json", "reasoning_steps.jsonl"):
        assert (tmp_path / "ranks" / name).read_text() == (tmp_path / "plain" / name).read_text(), name
    assert json.loads((tmp_path / "ranks" / "summary.json").read_text())["n_records"] == 3


def test_cli_reasoning_rule_judge(tmp_path, capsys):
    """python -m mrpo.eval reasoning on synthetic predictions, with and without LLM answer verdicts."""
    from mrpo.data.synthetic import make_example
    from mrpo.eval.__main__ import main
    from mrpo.infer import prediction_record

    preds = []
    for i in range(4):
        rec, _ = make_example(0, "test", i)
        f = rec["facts"]
        wrong_modality = "an MRI scan" if f["modality"] != "mri" else "a CT scan"
        first = f"The image is {wrong_modality}." if i < 2 else rec["gold_reasoning"].split(". ")[0] + "."
        text = f"<think>{first} The organ is the {f['organ']}.</think><answer>zzz</answer>"
        preds.append(prediction_record({**rec, "image": None}, text))
    pred = tmp_path / "eval" / "predictions.jsonl"
    pred.parent.mkdir()
    pred.write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert main(["reasoning", "--pred", str(pred), "--judge", "rule"]) == 0
    s = json.loads((tmp_path / "eval" / "reasoning.json").read_text())
    assert s["n_wrong"] == 4 and s["stage_counts"] == {"early": 2, "mid": 0, "late": 0}
    assert s["wrong"]["no_failure"] == 2 and s["unjudged"] == 0
    assert "early 100.0%" in capsys.readouterr().out

    verdicts = tmp_path / "answers_judged.jsonl"   # LLM says: r0 right, r1 unjudged, others wrong
    verdicts.write_text("".join(json.dumps({"id": p["id"], "llm_correct": v}) + "\n"
                                for p, v in zip(preds, [True, None, False, False])))
    out2 = tmp_path / "llm"
    assert main(["reasoning", "--pred", str(pred), "--judge", "rule", "--correct-from", str(verdicts),
                 "--out-dir", str(out2)]) == 0
    s2 = json.loads((out2 / "reasoning.json").read_text())
    assert (s2["n_correct"], s2["n_wrong"], s2["answer_unjudged"]) == (1, 2, 1)
    assert s2["stage_counts"]["early"] == 0 and s2["wrong"]["no_failure"] == 2


def test_answer_verdicts_keep_own_and_count_disagreements():
    from mrpo.eval.reasoning import answer_verdicts

    records = [
        {"id": "own-right", "solution": "yes", "correct": True},                       # no answer/text: kept
        {"id": "own-wrong", "solution": "yes", "correct": False, "answer": None},
        {"id": "agree", "solution": "yes", "answer": "Yes", "correct": True},
        {"id": "disagree", "solution": "yes", "text": "<answer>no</answer>", "correct": True},  # recomputed wins
        {"id": "no-own", "solution": "left lung", "answer": "left lung"},
        {"id": "nothing", "solution": "yes"},                                          # no verdict at all: wrong
    ]
    out, counts = answer_verdicts(records)
    assert [r["correct"] for r in out] == [True, False, True, False, True, False]
    assert counts == {"recomputed": 4, "own": 2, "disagreements": 1}
    assert records[3]["correct"] is True   # the input is not modified
    with pytest.raises(ValueError, match=r"record 0 \(id='x'\).*true, false or null.*'yes'"):
        answer_verdicts([{"id": "x", "correct": "yes"}])


def test_cli_reasoning_keeps_records_own_verdicts(tmp_path, capsys):
    """The issue's case: 400 predictions from another tool carry `correct` (276 wrong) but no answer or
    text; before, all 400 counted as wrong. Two more records have both and one of them disagrees."""
    from mrpo.eval.__main__ import main

    rows = [{"id": f"r{i}", "problem": "Is there a lesion?", "solution": "yes", "correct": i >= 276}
            for i in range(400)]
    rows += [{"id": "a", "problem": "p", "solution": "yes", "text": "<think>A.</think><answer>no</answer>",
              "correct": True},
             {"id": "b", "problem": "p", "solution": "yes", "answer": "yes", "correct": True}]
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["reasoning", "--pred", str(pred), "--judge", "rule"]) == 0
    s = json.loads((tmp_path / "reasoning.json").read_text())
    assert (s["n_records"], s["n_wrong"], s["n_correct"]) == (402, 277, 125)
    assert s["answer_verdicts"] == {"recomputed": 2, "own": 400, "disagreements": 1}
    out = capsys.readouterr().out
    assert "2 recomputed from answer/text, 400 the record's own" in out and "1 recomputed verdicts disagree" in out

    pred.write_text(json.dumps({"id": "bad", "solution": "yes", "correct": 1}) + "\n")
    with pytest.raises(SystemExit, match=r"predictions.jsonl: record 0 \(id='bad'\)"):
        main(["reasoning", "--pred", str(pred), "--judge", "rule"])
