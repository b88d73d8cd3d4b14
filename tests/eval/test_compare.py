"""compare: table values (markdown + CSV), paper reference rows, PNG plots, eval-folder discovery."""
import csv
import json

import pytest

from mrpo.eval.answers import evaluate_answers
from mrpo.eval.compare import compare_runs, dataset_key, load_run
from mrpo.eval.reasoning import failure_cascade_stats

PNG = b"\x89PNG\r\n\x1a\n"


def _answers(ds_results):
    recs = []
    for ds, oks in ds_results.items():
        for i, ok in enumerate(oks):
            recs.append({"id": f"{ds}{i}", "dataset": ds, "answer_type": "closed", "solution": "yes",
                         "answer": "yes" if ok else "no"})
    return recs


def _make_run(root, name, ds_results, valids):
    ev = root / name / "eval"
    evaluate_answers(_answers(ds_results), out_dir=ev)
    stats = {"kind": "reasoning", **failure_cascade_stats([{"correct": False, "valid": v} for v in valids])}
    (ev / "reasoning.json").write_text(json.dumps(stats))
    return root / name


def test_compare_table_and_plots(tmp_path):
    T, F = True, False
    a = _make_run(tmp_path, "grpo", {"vqa_rad": [T, T, T, F], "synthetic": [T, F]},
                  [[F, T], [F, F, F], [T, F, T], [T, T, T, F]])      # early 2, mid 1, late 1
    b = _make_run(tmp_path, "mrpo", {"VQA-RAD": [T, F], "synthetic": [T, T]},
                  [[T, T, F], [T, F, F, F]])                          # late (2/3), early (1/4)
    res = compare_runs([a, b / "eval"], tmp_path / "cmp")
    for name in ("compare.md", "compare.csv", "accuracy.png", "ffp_stages.png", "far_vs_ffp.png"):
        assert res[name].is_file(), name
    for name in ("accuracy.png", "ffp_stages.png", "far_vs_ffp.png"):
        assert res[name].read_bytes()[:8] == PNG

    rows = {r["method"]: r for r in csv.DictReader(open(res["compare.csv"]))}
    # columns: paper data sets first (VQA-RAD and vqa_rad are one column), then the others
    assert res["columns"][:3] == ["method", "vqa_rad", "synthetic"]
    g, m = rows["grpo"], rows["mrpo"]
    assert float(g["vqa_rad"]) == 75.0 and float(g["synthetic"]) == 50.0
    assert float(g["all"]) == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert (float(g["early"]), float(g["mid"]), float(g["late"])) == (50.0, 25.0, 25.0)
    # FAR: [F,T] 0, [F,F,F] 1, [T,F,T] 0, [T,T,T,F] undefined (first failure is the last step)
    assert float(g["far"]) == pytest.approx(100 / 3, abs=1e-3)
    assert float(m["vqa_rad"]) == 50.0 and float(m["synthetic"]) == 100.0
    assert (float(m["early"]), float(m["mid"]), float(m["late"])) == (50.0, 0.0, 50.0)

    base = rows["paper: Qwen3-VL-8B base"]
    assert float(base["vqa_rad"]) == 43.0 and base["synthetic"] == "" and float(base["all"]) == 26.83
    assert (float(base["early"]), float(base["mid"]), float(base["late"])) == (64.0, 26.4, 9.6)
    assert float(rows["paper: Qwen3-VL-8B MRPO"]["early"]) == 13.0
    assert set(rows) == {"grpo", "mrpo", "paper: Qwen3-VL-8B base", "paper: Qwen3-VL-8B GRPO",
                         "paper: Qwen3-VL-8B GDPO", "paper: Qwen3-VL-8B MRPO"}

    md = res["compare.md"].read_text()
    assert "| grpo | 75.00 | 50.00 | 66.67 | 50.0 | 25.0 | 25.0 |" in md
    assert "paper: Qwen3-VL-8B MRPO" in md

    res2 = compare_runs([a, b], tmp_path / "cmp2", labels=["A", "B"], paper=False)
    assert [r["method"] for r in res2["rows"]] == ["A", "B"]


def test_compare_reads_trainer_summary_and_errors(tmp_path):
    ev = tmp_path / "run" / "eval" / "final"
    ev.mkdir(parents=True)
    s = failure_cascade_stats([{"correct": False, "valid": [False, True]}, {"correct": True, "valid": None}])
    (ev / "summary.json").write_text(json.dumps(s))
    run = load_run(ev)
    assert run["answers"]["overall"]["rule_accuracy"] == 0.5 and run["reasoning"]["stage_counts"]["early"] == 1
    run_folder = load_run(tmp_path / "run")   # a trainer run folder: RUN/eval/final/ is found
    assert run_folder["label"] == "run" and run_folder["reasoning"]["stage_counts"]["early"] == 1
    res = compare_runs([ev], tmp_path / "cmp", labels=["tiny"], paper=False)
    assert res["rows"][0]["all"] == 50.0 and res["rows"][0]["early"] == 100.0
    with pytest.raises(FileNotFoundError, match="no answers.json"):
        load_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="labels"):
        compare_runs([ev], tmp_path / "x", labels=["a", "b"])


def test_dataset_key():
    assert dataset_key("VQA-RAD") == dataset_key("vqa_rad") == "vqarad"
    assert dataset_key("PathVQA") == dataset_key("path_vqa")


def test_cli_compare(tmp_path, capsys):
    from mrpo.eval.__main__ import main

    a = _make_run(tmp_path, "a", {"synthetic": [True, False]}, [[False, True]])
    assert main(["compare", str(a), "--out", str(tmp_path / "out"), "--no-paper"]) == 0
    assert (tmp_path / "out" / "far_vs_ffp.png").is_file()
    assert "| a | 50.00 | 50.00 | 100.0 | 0.0 | 0.0 | 0.0 |" in capsys.readouterr().out
