"""benchmarks/compare_methods.py: statistics, plan / resume logic and collection (no training)."""
from __future__ import annotations

import importlib.util
import csv
import json
import sys
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_methods.py"
_spec = importlib.util.spec_from_file_location("compare_methods", _PATH)
cm = importlib.util.module_from_spec(_spec)
sys.modules["compare_methods"] = cm   # dataclasses look their module up
_spec.loader.exec_module(cm)


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_ci_constant_and_nan():
    assert cm.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    m, lo, hi = cm.bootstrap_ci([])
    assert math.isnan(m) and math.isnan(lo) and math.isnan(hi)
    assert cm.bootstrap_ci([0.5, float("nan")]) == pytest.approx((0.5, 0.5, 0.5))   # NaN dropped


def test_bootstrap_ci_bounds_and_determinism():
    x = [0.1, 0.5, 0.9]
    m, lo, hi = cm.bootstrap_ci(x, n_resamples=10_000, seed=3)
    assert m == pytest.approx(0.5)
    assert min(x) <= lo < m < hi <= max(x)
    assert cm.bootstrap_ci(x, n_resamples=10_000, seed=3) == (m, lo, hi)
    # 3 values: 10 distinct resample means; the 2.5% / 97.5% quantiles are near the extremes
    assert lo < 0.25 and hi > 0.75


def test_bootstrap_ci_matches_normal_theory_for_many_values():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=400)
    m, lo, hi = cm.bootstrap_ci(x, n_resamples=4000)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < m < hi


def _row(method, variant, seed, steps=60, **metrics):
    base = {k: 0.0 for k in cm.METRICS}
    base.update(metrics)
    return {"method": method, "variant": variant, "seed": seed, "steps": steps, **base}


def test_paired_differences_by_seed():
    rows = [_row("mrpo", "abs", 0, early=0.5), _row("grpo", "-", 0, early=0.7),
            _row("mrpo", "abs", 1, early=0.4), _row("grpo", "-", 1, early=0.45),
            _row("mrpo", "abs", 2, early=0.3),                      # no GRPO partner: left out
            _row("grpo", "-", 3, early=0.2),
            _row("mrpo", "signed", 0, early=0.1),
            _row("mrpo", "abs", 0, steps=180, early=0.9)]           # other length: left out
    d = cm.paired_differences(rows, "mrpo", "grpo", "early", 60)
    assert d == pytest.approx([-0.2, -0.05])
    assert cm.paired_differences(rows, "mrpo:signed", "mrpo", "early", 60) == pytest.approx([-0.4])


def test_summary_markdown_lists_groups_and_pairs():
    rows = [_row(m, v, s, accuracy=0.3 + 0.01 * s + (0.1 if m == "mrpo" else 0), early=0.5)
            for s in range(3) for m, v in (("mrpo", "abs"), ("grpo", "-"), ("gdpo", "-"))]
    for r in rows:
        r.update(unjudged=0, n_wrong_with_failure=100)
    starts = [_row("start", "-", s, steps=0, accuracy=0.37, early=0.7) | {"unjudged": 0, "n_wrong_with_failure": 160}
              for s in range(3)]
    md = cm.summary_markdown(rows, starts, n_resamples=500)
    assert "| start (after warm-up, before RL) | 0 | 3 | 37.0 [37.0, 37.0] | 70.0 [70.0, 70.0]" in md
    assert "| mrpo - grpo | 60 | 3 | 10.0 [10.0, 10.0] * | 0.0 [0.0, 0.0] |" in md
    assert "| gdpo - grpo | 60 | 3 |" in md


# ----------------------------------------------------------------------------- plan and resume


def test_parse_method():
    assert cm.parse_method("mrpo") == ("mrpo", "abs")
    assert cm.parse_method("mrpo:signed") == ("mrpo", "signed")
    assert cm.parse_method("grpo") == ("grpo", "-")
    for bad in ("ppo", "mrpo:bogus", "grpo:signed"):
        with pytest.raises(ValueError):
            cm.parse_method(bad)


def test_plan_is_seed_major_and_adds_long_runs():
    runs = cm.plan([0, 1], ["mrpo", "grpo"], 60, ["mrpo:signed"], 180, long_seeds=[0])
    assert [(r.label, r.seed, r.steps) for r in runs] == [
        ("mrpo", 0, 60), ("grpo", 0, 60), ("mrpo", 1, 60), ("grpo", 1, 60), ("mrpo:signed", 0, 180)]


def _fake_eval(eval_dir: Path, accuracy=0.5, early=0.25, ks=(4, 6)):
    eval_dir.mkdir(parents=True)
    (eval_dir / "summary.json").write_text(json.dumps({
        "accuracy": accuracy, "early_failure_share": early, "mid_failure_share": 0.5, "late_failure_share": 0.25,
        "far_mean": 0.6, "unjudged": 1, "n_wrong": 8, "wrong": {"with_failure": 4}}))
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps({"steps": ["s"] * k}) + "\n" for k in ks))


def test_pending_skips_finished_runs_and_collect_reads_them(tmp_path):
    runs = cm.plan([0], ["mrpo", "grpo", "mrpo:zero"], 60)
    done = runs[0].run_dir(tmp_path)
    _fake_eval(done / "eval" / "final")
    (done / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "num_steps": 5.0}) + "\n" + json.dumps({"phase": "eval", "step": 1}) + "\n"
        + json.dumps({"step": 2, "num_steps": 7.0}) + "\n" + '{"trunc')   # a cut-off last line is skipped
    (done / "wall_s.txt").write_text("12.5\n")
    half = runs[1].run_dir(tmp_path)                       # started, not finished: still to do
    (half / "checkpoints" / "step_000020").mkdir(parents=True)
    _fake_eval(tmp_path / "seed0" / "sft" / "eval" / "start", accuracy=0.37, early=0.7)
    assert cm.pending(runs, tmp_path) == runs[1:]

    rows = cm.collect(tmp_path, sft_steps=100)
    assert len(rows) == 1
    r = rows[0]
    assert (r["method"], r["variant"], r["seed"], r["steps"]) == ("mrpo", "abs", 0, 60)
    assert r["accuracy"] == 0.5 and r["mean_k"] == 5.0 and r["unjudged"] == 1 and r["n_wrong_with_failure"] == 4
    assert r["rollout_k_last10"] == 6.0 and r["wall_s"] == 12.5
    assert r["start_accuracy"] == 0.37 and r["start_early"] == 0.7
    starts = cm.start_rows(tmp_path)
    assert [(s["method"], s["seed"], s["early"]) for s in starts] == [("start", 0, 0.7)]

    cm.write_csv(rows, tmp_path / "out" / "runs.csv")
    back = cm.read_csv(tmp_path / "out" / "runs.csv")
    assert back[0]["accuracy"] == 0.5 and back[0]["seed"] == 0 and back[0]["variant"] == "abs"


def test_collect_parses_method_names_with_underscores(tmp_path):
    for spec in (cm.RunSpec("dr_grpo", "-", 1, 30), cm.RunSpec("mrpo", "signed", 1, 30)):
        _fake_eval(spec.run_dir(tmp_path) / "eval" / "final")
    got = sorted((r["method"], r["variant"]) for r in cm.collect(tmp_path))
    assert got == [("dr_grpo", "-"), ("mrpo", "signed")]


def test_sft_ready_needs_checkpoint_and_start_eval(tmp_path):
    sft = tmp_path / "seed0" / "sft"
    _fake_eval(sft / "eval" / "start")
    assert not cm.sft_ready(sft)
    (sft / "checkpoints" / "step_000000").mkdir(parents=True)
    assert not cm.sft_ready(sft)
    (sft / "checkpoints" / "step_000000" / "COMPLETE").write_text("0\n")
    assert cm.sft_ready(sft)


def test_lock_keeps_two_invocations_apart(tmp_path):
    import os
    import subprocess

    run = tmp_path / "seed0" / "mrpo_abs_60steps"
    assert cm.acquire(run) and cm.acquire(run)            # our own lock: re-entrant
    other = subprocess.Popen(["sleep", "30"])
    try:
        (run / cm.LOCK_NAME).write_text(f"{other.pid}\n")       # held by a live process
        assert not cm.acquire(run)
    finally:
        other.kill()
        other.wait()
    assert cm.acquire(run)                                 # its holder is gone: taken over
    assert (run / cm.LOCK_NAME).read_text().strip() == str(os.getpid())
    cm.release(run)
    assert not (run / cm.LOCK_NAME).exists()


# ----------------------------------------------------------------------------- the pre-registered study (study.py)

_SPATH = Path(__file__).resolve().parents[2] / "benchmarks" / "study.py"
_sspec = importlib.util.spec_from_file_location("study", _SPATH)
st = importlib.util.module_from_spec(_sspec)
sys.modules["study"] = st
_sspec.loader.exec_module(st)


def _t(mean, lo, hi, p, n=8):
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "p_wilcoxon": p}


def test_study_decision_rule():
    assert st.decide(_t(-0.06, -0.09, -0.03, 0.008)).startswith("MRPO cuts early failures")
    assert st.decide(_t(0.04, 0.01, 0.07, 0.02)).startswith("MRPO raises early failures")
    assert st.decide(_t(0.0, -0.03, 0.04, 0.6)).startswith("no effect of practical size")
    assert st.decide(_t(-0.03, -0.08, 0.01, 0.2)).startswith("undecided")
    assert st.decide(_t(-0.06, -0.09, -0.03, 0.03, n=6)).startswith("(on 6 of 8 registered seeds")


def test_study_paired_and_far_bins(tmp_path):
    rows = [{"method": "mrpo", "seed": 0, "early": 0.5}, {"method": "grpo", "seed": 0, "early": 0.7},
            {"method": "mrpo", "seed": 1, "early": 0.4}, {"method": "grpo", "seed": 2, "early": 0.1}]
    assert st.paired(rows, "mrpo", "grpo", "early") == ([0], [pytest.approx(-0.2)])
    (tmp_path / "summary.json").write_text(json.dumps({"counts": {
        "far_n_bin0": 4, "far_sum_bin0": 2.0, "far_n_bin1": 0, "far_sum_bin1": 0.0, "far_n_bin2": 1,
        "far_sum_bin2": 1.0}}))
    got = st.far_bins(tmp_path)
    assert got[0] == 0.5 and math.isnan(got[1]) and got[2] == 1.0 and math.isnan(got[4])


def test_study_report_on_fake_runs(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        _fake_eval(runs / "study" / f"seed{seed}" / "sft" / "eval" / "start", accuracy=0.36, early=0.8)
        for m, early in (("mrpo", 0.6 + 0.01 * seed), ("grpo", 0.7)):
            spec = cm.RunSpec(*cm.parse_method(m), seed, st.RL_STEPS)
            _fake_eval(spec.run_dir(runs / "study") / "eval" / "final", accuracy=0.4, early=early)
    out = tmp_path / "out"
    out.mkdir()
    md = st.report(runs, out, n_resamples=200)
    assert "| 0 | 80.0 | 60.0 | 70.0 | -10.0 | 40.0 | 40.0 | 5.00 | 5.00 |" in md
    assert "two-sided p = 0.2500 (primary)" in md                     # 3 of 3 negative: 2/8
    assert "(on 3 of 8 registered seeds: a deviation) undecided" in md
    back = list(csv.DictReader(open(out / "runs.csv")))
    assert {(r["method"], r["seed"]) for r in back} >= {("mrpo", "0"), ("grpo", "2"), ("start", "1")}
    assert (out / "ffp_stages_ci.png").is_file() and (out / "far_by_ffp.png").is_file()


def test_study_post_hoc_leaves_out_collapsed_seeds():
    rows = []
    for s, (em, eg, km, acc) in enumerate([(0.5, 0.7, 5.0, 0.4), (0.6, 0.7, 5.0, 0.4), (0.2, 0.9, 25.0, 0.0)]):
        rows += [{"method": "mrpo", "seed": s, "early": em, "mean_k": km, "accuracy": acc},
                 {"method": "grpo", "seed": s, "early": eg, "mean_k": 5.0, "accuracy": 0.4}]
    assert st.collapsed(rows[4]) and not st.collapsed(rows[0])
    line = " ".join(st.post_hoc_lines(rows, [0, 1, 2], n_resamples=200))
    assert "seed(s) [2] (mrpo seed 2)" in line and "-15.0 [-20.0, -10.0] points over 2 seeds" in line
    assert st.post_hoc_lines(rows[:4], [0, 1], n_resamples=200) == []
