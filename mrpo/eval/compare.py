"""Side-by-side comparison of evaluated runs: markdown + CSV table and PNG plots.

Eval folder layout (written by `python -m mrpo.eval answers|reasoning` and by the trainer):
    EVAL/predictions.jsonl      mrpo.infer output (by convention; any path works)
    EVAL/answers.json           accuracy summary (mrpo.eval.answers.evaluate_answers)
    EVAL/answers_judged.jsonl   per-record LLM verdicts (only with an LLM answer judge)
    EVAL/reasoning.json         failure-cascade summary (mrpo.eval.reasoning.evaluate_reasoning)
    EVAL/reasoning_steps.jsonl  per-record step verdicts
    EVAL/summary.json           the trainer's evaluation (RUN/eval/<tag>/): reasoning summary + accuracy
where EVAL is RUN/eval for a training run's final evaluation. `compare` accepts, per run, the EVAL
folder itself, a RUN folder holding eval/, or one of the JSON files.

Table: one row per run (plus, optionally, the paper's published Qwen3-VL-8B rows), columns = accuracy
(%) per data set, overall accuracy ("all": micro average over the run's records; for paper rows the
published AVG), FFP stage shares (% of wrong answers with an invalid step) and the mean FAR (%).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Sequence

from mrpo.eval import plots

# Published figures: Jung et al. 2026, "Breaking Failure Cascades" (arXiv 2606.31825), percentages.
PAPER_DATASETS = ("VQA-RAD", "SLAKE", "PathVQA", "PMC-VQA", "VQA-Med", "Quilt-VQA", "Rad-VQA", "MIMIC-VQA")
PAPER_ACCURACY = {  # backbone -> method -> (per PAPER_DATASETS ..., AVG)
    "Qwen2.5-VL-7B": {
        "base": (42.00, 58.29, 17.10, 28.35, 5.18, 19.06, 27.20, 15.08, 23.36),
        "GRPO": (44.00, 65.27, 20.52, 31.05, 3.76, 20.99, 29.30, 16.71, 26.06),
        "GDPO": (42.50, 66.29, 19.60, 28.60, 7.76, 20.17, 32.00, 16.47, 25.92),
        "MRPO": (41.50, 65.89, 21.30, 30.85, 5.65, 22.79, 29.65, 18.65, 26.79),
    },
    "Qwen3-VL-8B": {
        "base": (43.00, 59.69, 21.48, 31.00, 9.41, 23.90, 33.15, 15.31, 26.83),
        "GRPO": (45.00, 67.14, 20.11, 30.25, 9.65, 24.03, 40.60, 18.79, 28.69),
        "GDPO": (42.50, 67.28, 19.09, 32.10, 12.47, 22.51, 40.10, 21.46, 29.01),
        "MRPO": (41.50, 68.27, 20.43, 33.00, 12.00, 23.90, 40.20, 17.46, 29.09),
    },
    "InternVL3-8B": {
        "base": (45.50, 64.73, 22.97, 30.00, 7.59, 22.24, 37.60, 15.20, 28.07),
        "GRPO": (42.00, 68.27, 28.15, 30.50, 7.76, 23.48, 38.75, 19.49, 30.84),
        "GDPO": (39.50, 71.95, 26.18, 30.90, 10.12, 23.20, 37.85, 17.46, 30.11),
        "MRPO": (41.00, 71.78, 29.54, 31.60, 7.59, 24.31, 39.15, 20.42, 31.94),
    },
}
# Failure cascades, Qwen3-VL-8B only: early / mid / late shares of wrong answers; FAR at FFP 0.1..0.9
# (FAR read off the paper's figure; base at 0.7 is approximate).
PAPER_STAGES = {"base": (64.0, 26.4, 9.6), "GDPO": (21.4, 37.4, 41.3), "GRPO": (21.2, 35.1, 43.6),
                "MRPO": (13.0, 39.9, 47.0)}
PAPER_FAR = {"base": (64.6, 70.6, 66.1, 55.0, 39.8), "MRPO": (43.3, 51.7, 52.4, 56.0, 31.7)}
PAPER_METHODS = ("base", "GRPO", "GDPO", "MRPO")


def dataset_key(name: str) -> str:
    """'VQA-RAD', 'vqa_rad', 'VqaRad' -> 'vqarad' (matches run data set names to the paper's)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _from_summary(data: dict, run: dict) -> None:
    """Fill run's answers/reasoning from one summary file: answers.json, reasoning.json, or the
    trainer's summary.json (a reasoning summary with overall accuracy, no per-data-set split)."""
    if "stage_shares" in data:
        run["reasoning"] = data
        if run["answers"] is None and data.get("accuracy") is not None and "overall" not in data:
            acc = data["accuracy"]
            acc = None if acc != acc else acc   # NaN -> None
            run["answers"] = {"overall": {"n": data.get("n_records"), "rule_accuracy": acc}, "by_dataset": {}}
    elif "overall" in data:
        run["answers"] = data
    else:
        raise ValueError(f"{run['path']}: not an answers/reasoning summary (keys: {sorted(data)[:8]})")


def load_run(path: str | Path, label: str | None = None) -> dict:
    """{label, path, answers: dict | None, reasoning: dict | None} from an eval folder (answers.json,
    reasoning.json, or the trainer's summary.json), a run folder holding eval/ or the trainer's
    eval/final/, or one such file."""
    p = Path(path)
    run = {"label": label, "path": str(p), "answers": None, "reasoning": None}
    if p.is_file():
        _from_summary(_read_json(p), run)
        run["label"] = label or (p.parent.parent.name if p.parent.name == "eval" else p.parent.name)
        return run
    for folder in (p, p / "eval", p / "eval" / "final"):
        for name in ("answers.json", "reasoning.json", "summary.json"):
            f = folder / name
            if f.is_file() and (name != "summary.json" or run["reasoning"] is None):
                _from_summary(_read_json(f), run)
        if run["answers"] is not None or run["reasoning"] is not None:
            break
    if run["answers"] is None and run["reasoning"] is None:
        raise FileNotFoundError(f"{p}: no answers.json, reasoning.json or summary.json "
                                f"(looked in {p}, {p / 'eval'} and {p / 'eval' / 'final'})")
    run["label"] = label or (p.parent.name if p.name == "eval" else p.name)
    return run


def _pct(x):
    return None if x is None else 100.0 * x


def _run_row(run: dict, datasets: list[str], metric: str) -> dict:
    row = {"method": run["label"]}
    ans, rea = run["answers"], run["reasoning"]
    acc_key = f"{metric}_accuracy"
    by_key = {dataset_key(k): v for k, v in (ans or {}).get("by_dataset", {}).items()}
    for ds in datasets:
        g = by_key.get(dataset_key(ds))
        row[ds] = _pct(g.get(acc_key)) if g else None
    row["all"] = _pct(ans["overall"].get(acc_key)) if ans else None
    for s in ("early", "mid", "late"):
        row[s] = _pct(rea["stage_shares"][s]) if rea else None
    row["far"] = _pct(rea["far"]["overall"]) if rea else None
    row["n_wrong_with_failure"] = rea["wrong"]["with_failure"] if rea else None
    return row


def _paper_rows(datasets: list[str], backbone: str) -> list[dict]:
    col = {dataset_key(d): i for i, d in enumerate(PAPER_DATASETS)}
    rows = []
    for method in PAPER_METHODS:
        acc = PAPER_ACCURACY[backbone][method]
        row = {"method": f"paper: {backbone} {method}"}
        for ds in datasets:
            i = col.get(dataset_key(ds))
            row[ds] = None if i is None else acc[i]
        row["all"] = acc[-1]
        stages = PAPER_STAGES.get(method) if backbone == "Qwen3-VL-8B" else None
        for s, v in zip(("early", "mid", "late"), stages or (None, None, None)):
            row[s] = v
        row["far"] = None
        row["n_wrong_with_failure"] = None
        rows.append(row)
    return rows


def _fmt(x, digits=2) -> str:
    return "" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def compare_runs(paths: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None,
                 paper: bool = True, metric: str = "rule", paper_backbone: str = "Qwen3-VL-8B") -> dict:
    """Write out_dir/compare.md, compare.csv, accuracy.png, ffp_stages.png, far_vs_ffp.png.

    metric: "rule" or "llm" accuracy. Returns {"rows": [...], "columns": [...], <file name>: Path}.
    """
    if metric not in ("rule", "llm"):
        raise ValueError(f"metric must be 'rule' or 'llm', got {metric!r}")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    if paper_backbone not in PAPER_ACCURACY:
        raise ValueError(f"paper_backbone {paper_backbone!r} not one of {sorted(PAPER_ACCURACY)}")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]

    # data set columns: paper order first, then the others by name; one column per normalised name
    seen: dict[str, str] = {}
    for run in runs:
        for ds in (run["answers"] or {}).get("by_dataset", {}):
            seen.setdefault(dataset_key(ds), ds)
    order = {dataset_key(d): i for i, d in enumerate(PAPER_DATASETS)}
    datasets = [seen[k] for k in sorted(seen, key=lambda k: (order.get(k, len(order)), k))]

    rows = [_run_row(r, datasets, metric) for r in runs]
    if paper:
        rows += _paper_rows(datasets, paper_backbone)
    columns = ["method", *datasets, "all", "early", "mid", "late", "far", "n_wrong_with_failure"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row[c] is None else (round(row[c], 4) if isinstance(row[c], float) else row[c])
                        for c in columns])
    md = [f"Accuracy ({metric} match) and first-failure stages, in %.", "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        md.append("| " + " | ".join(_fmt(row[c], 1 if c in ("early", "mid", "late", "far") else 2)
                                    for c in columns) + " |")
    md += ["", "all: accuracy over all records of the run (paper rows: the published AVG). "
           "early/mid/late: share of wrong answers whose first invalid step falls in [0,1/3), [1/3,2/3), "
           "[2/3,1] of the reasoning (wrong answers with no invalid step, no steps or unjudged excluded). "
           "far: mean Failure Accumulation Rate."]
    if paper:
        md.append("Paper rows: Jung et al. 2026 (arXiv 2606.31825), as published; stage shares are "
                  "reported for Qwen3-VL-8B only.")
    (out / "compare.md").write_text("\n".join(md) + "\n")

    dashed = [r["method"] for r in rows if r["method"].startswith("paper:")]
    acc_series = {r["method"]: [r[d] for d in datasets] + [r["all"]] for r in rows}
    stage_series = {r["method"]: {s: r[s] for s in ("early", "mid", "late")} for r in rows
                    if any(r[s] is not None for s in ("early", "mid", "late"))}
    far_series = {r["label"]: [_pct(x) for x in r["reasoning"]["far"]["mean"]] for r in runs if r["reasoning"]}
    if paper and paper_backbone == "Qwen3-VL-8B":
        far_series.update({f"paper: {paper_backbone} {m}": v for m, v in PAPER_FAR.items()})
    files = {
        "compare.md": out / "compare.md",
        "compare.csv": out / "compare.csv",
        "accuracy.png": plots.plot_accuracy([*datasets, "all"], acc_series, out / "accuracy.png", dashed),
        "ffp_stages.png": plots.plot_ffp_stages(stage_series, out / "ffp_stages.png", dashed),
        "far_vs_ffp.png": plots.plot_far_curves(far_series, out / "far_vs_ffp.png", dashed=dashed),
    }
    return {"rows": rows, "columns": columns, **files}
