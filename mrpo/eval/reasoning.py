"""Step-level reasoning evaluation: First Failure Point (FFP) and Failure Accumulation Rate (FAR).

For a completion with K judged steps (validity v_0..v_{K-1}, 0-based) whose answer is wrong:
    f   = index of the first invalid step
    FFP = f / K                      in [0, 1); stage: early [0, 1/3), mid [1/3, 2/3), late [2/3, 1]
    FAR = #invalid steps after f / (K - 1 - f)   (undefined when f = K - 1: excluded from FAR)
Stages and FAR bins are computed with integer arithmetic (3f < K, 5f // K), so step counts that land
exactly on a boundary (K = 3, f = 1 -> 1/3 -> mid) are binned without float error.

Wrong answers that cannot be placed on the FFP axis are reported in their own buckets and excluded
from the stage shares (shares are over wrong answers *with* a first failure):
    "no_failure": every step valid; "no_steps": K = 0 (no <think> block or nothing in it);
    "unjudged":   the step judge failed after its retries (never scored).
Records whose answer correctness is unknown (correct = None, e.g. the LLM answer judge failed) are
counted as "answer_unjudged" and left out.

Beside FFP/FAR the summary gives the paper's sentence-level figures (dmis-lab/MRPO
Eval_code/Reasoning_Evaluation.py): over every judged sentence, mean alignment, mean contribution and
mean score (score = 1 when the sentence is aligned or contributes). They cover the records sent to the
judge: wrong answers only by default, every record with judge_all (the paper judges every record
that has a gold rationale); unjudged records are counted, not scored as zeros.

The paper's input handling is available (`paper_filter`): a gold rationale file (its
medthink_test.json: a list of {image_path, question, answer, solution}, or our prepared JSONL with
gold_reasoning) keyed by (image, question, answer) with case and whitespace folded and SLAKE's
"xmlabN/source.jpg" = "xmlabN_source.jpg"; dedup keeps the first record per key; gold_only keeps
only records whose key has a gold rationale.

CLI: python -m mrpo.eval reasoning --pred PRED.jsonl --judge rule   (see mrpo/eval/__main__.py)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from mrpo.metrics_log import strict_json

STAGES = ("early", "mid", "late")
FAR_BIN_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
FAR_BIN_CENTERS = (0.1, 0.3, 0.5, 0.7, 0.9)


def first_failure_index(valid: Sequence[bool]) -> int | None:
    """0-based index of the first invalid step, or None when all steps are valid (or K = 0)."""
    for i, v in enumerate(valid):
        if not v:
            return i
    return None


def first_failure_point(valid: Sequence[bool]) -> float | None:
    """FFP = first invalid index / K, or None when there is no invalid step."""
    f = first_failure_index(valid)
    return None if f is None else f / len(valid)


def ffp_stage(f: int, k: int) -> str:
    """Stage of first failure index f among k steps: early [0,1/3), mid [1/3,2/3), late [2/3,1]."""
    if not 0 <= f < k:
        raise ValueError(f"first failure index {f} outside [0, {k})")
    if 3 * f < k:
        return "early"
    if 3 * f < 2 * k:
        return "mid"
    return "late"


def far_bin(f: int, k: int) -> int:
    """Index of the FAR curve bin [0.2*b, 0.2*(b+1)) holding FFP = f / k (last bin closed)."""
    if not 0 <= f < k:
        raise ValueError(f"first failure index {f} outside [0, {k})")
    return min(5 * f // k, len(FAR_BIN_CENTERS) - 1)


def failure_accumulation_rate(valid: Sequence[bool]) -> float | None:
    """Share of the steps after the first failure that are also invalid; None if undefined."""
    f = first_failure_index(valid)
    if f is None or f == len(valid) - 1:
        return None
    after = valid[f + 1:]
    return sum(1 for v in after if not v) / len(after)


def cascade_counts(records: Iterable[dict], correct_key: str = "correct", valid_key: str = "valid") -> dict:
    """Additive counts behind failure_cascade_stats (same keys for any input: sum them across ranks).

    records: dicts with `correct_key` (bool, or None = answer unjudged) and `valid_key`
        (list[bool] per step; [] = no steps; None or missing = not judged / judge failed).
    All values are integers except the sums ffp_sum and far_sum_bin{b} (floats).
    """
    c = {k: 0 for k in ("n_records", "n_correct", "n_wrong", "answer_unjudged", "wrong_with_failure",
                        "wrong_no_failure", "wrong_no_steps", "wrong_unjudged", "far_undefined")}
    c.update({f"stage_{s}": 0 for s in STAGES})
    c.update({f"far_n_bin{b}": 0 for b in range(len(FAR_BIN_CENTERS))})
    c.update({f"far_sum_bin{b}": 0.0 for b in range(len(FAR_BIN_CENTERS))})
    c.update({f"steps_{v}_{g}": 0 for v in ("valid", "total") for g in ("all", "correct", "wrong")})
    c["ffp_sum"] = 0.0
    for rec in records:
        c["n_records"] += 1
        correct, valid = rec.get(correct_key), rec.get(valid_key)
        if correct is None:
            c["answer_unjudged"] += 1
            continue
        group = "correct" if correct else "wrong"
        if valid is not None:
            for g in ("all", group):
                c[f"steps_valid_{g}"] += sum(1 for v in valid if v)
                c[f"steps_total_{g}"] += len(valid)
        if correct:
            c["n_correct"] += 1
            continue
        c["n_wrong"] += 1
        if valid is None:
            c["wrong_unjudged"] += 1
            continue
        k = len(valid)
        f = first_failure_index(valid)
        if k == 0:
            c["wrong_no_steps"] += 1
        elif f is None:
            c["wrong_no_failure"] += 1
        else:
            c["wrong_with_failure"] += 1
            c[f"stage_{ffp_stage(f, k)}"] += 1
            c["ffp_sum"] += f / k
            far = failure_accumulation_rate(valid)
            if far is None:
                c["far_undefined"] += 1
            else:
                b = far_bin(f, k)
                c[f"far_n_bin{b}"] += 1
                c[f"far_sum_bin{b}"] += far
    return c


def summary_from_counts(counts: dict) -> dict:
    """Failure-cascade summary from (possibly all-reduced) cascade_counts.

    Fractions in [0, 1]; in the nested entries None where a denominator is 0; the flat logging keys
    (accuracy, early/mid/late_failure_share, far_mean) use NaN instead so they format as numbers.
        n_records, n_correct, n_wrong, answer_unjudged, wrong_judged (= with a failure or all valid),
        wrong: {with_failure, no_failure, no_steps, unjudged}   counts of wrong answers,
        stage_counts / stage_shares: {early, mid, late}          over wrong answers with a failure,
        mean_ffp, far: {bin_edges, bin_centers, mean, counts, overall, undefined},
        step_validity: {all, correct, wrong}                    share of valid steps over judged records,
        accuracy (over records with a known answer verdict), counts (the input, for reduction).
    """
    c = {k: (v if k == "ffp_sum" or k.startswith("far_sum") else int(round(v))) for k, v in counts.items()}
    nb = len(FAR_BIN_CENTERS)
    div = lambda a, b: a / b if b else None  # noqa: E731
    nan = lambda x: float("nan") if x is None else x  # noqa: E731
    m = c["wrong_with_failure"]
    shares = {s: div(c[f"stage_{s}"], m) for s in STAGES}
    far_n = [c[f"far_n_bin{b}"] for b in range(nb)]
    far_sum = [c[f"far_sum_bin{b}"] for b in range(nb)]
    far_overall = div(sum(far_sum), sum(far_n))
    accuracy = div(c["n_correct"], c["n_correct"] + c["n_wrong"])
    return {
        "n_records": c["n_records"],
        "n_correct": c["n_correct"],
        "n_wrong": c["n_wrong"],
        "answer_unjudged": c["answer_unjudged"],
        "wrong_judged": c["wrong_with_failure"] + c["wrong_no_failure"],
        "wrong": {"with_failure": m, "no_failure": c["wrong_no_failure"], "no_steps": c["wrong_no_steps"],
                  "unjudged": c["wrong_unjudged"]},
        "stage_counts": {s: c[f"stage_{s}"] for s in STAGES},
        "stage_shares": shares,
        "mean_ffp": div(c["ffp_sum"], m),
        "far": {"bin_edges": list(FAR_BIN_EDGES), "bin_centers": list(FAR_BIN_CENTERS),
                "mean": [div(s_, n_) for s_, n_ in zip(far_sum, far_n)], "counts": far_n,
                "overall": far_overall, "undefined": c["far_undefined"]},
        "step_validity": {g: div(c[f"steps_valid_{g}"], c[f"steps_total_{g}"]) for g in ("all", "correct", "wrong")},
        "accuracy": nan(accuracy),
        "early_failure_share": nan(shares["early"]),
        "mid_failure_share": nan(shares["mid"]),
        "late_failure_share": nan(shares["late"]),
        "far_mean": nan(far_overall),
        "counts": counts,
    }


def failure_cascade_stats(records: Iterable[dict], correct_key: str = "correct",
                          valid_key: str = "valid") -> dict:
    """Failure-cascade summary of judged completions (see summary_from_counts for the keys).

    records: dicts with `correct_key` (bool, or None = answer unjudged) and `valid_key`
        (list[bool] per step; [] = no steps; None or missing = not judged / judge failed).
    """
    return summary_from_counts(cascade_counts(records, correct_key, valid_key))


# ----------------------------------------------------------------------------- the paper's protocol


def sentence_scores(rows: Iterable[dict]) -> dict:
    """The paper's sentence-level figures over judged rows (alignment/contribution lists set).

    Returns {records, sentences, mean_alignment, mean_contribution, mean_score} with means in [0, 1]
    (None when no sentence was judged); score = alignment OR contribution per sentence.
    """
    records = sentences = aligned = contributing = scored = 0
    for r in rows:
        a, c = r.get("alignment"), r.get("contribution")
        if a is None or c is None:
            continue
        records += 1
        sentences += len(a)
        aligned += sum(a)
        contributing += sum(c)
        scored += sum(1 for x, y in zip(a, c) if x or y)
    div = lambda x: x / sentences if sentences else None  # noqa: E731
    return {"records": records, "sentences": sentences, "mean_alignment": div(aligned),
            "mean_contribution": div(contributing), "mean_score": div(scored)}


def _fold(text) -> str:
    """The paper's question/answer key normalisation: whitespace collapsed, lower case."""
    return " ".join(str(text or "").split()).lower()


def gold_key(image, question, answer) -> tuple[str, str, str]:
    """(image key, question, answer) matching key of the paper's reasoning evaluation."""
    from mrpo.data.readers.common import short_image_key

    return short_image_key(str(image or "")), _fold(question), _fold(answer)


def load_gold_reasoning(path: str | Path) -> dict[tuple[str, str, str], str]:
    """gold_key -> rationale from the paper's medthink_test.json (list of {image_path, question, answer,
    solution}) or a prepared JSONL (image, problem, solution, gold_reasoning); rows without a rationale
    are left out. Raises ValueError naming the file (and line) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gold reasoning file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON list or JSONL file: {e}") from None
    gold = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        if "gold_reasoning" in row:      # a prepared record
            key, reasoning = gold_key(row.get("image"), row.get("problem"), row.get("solution")), row["gold_reasoning"]
        else:                            # the paper's medthink_test.json
            key = gold_key(row.get("image_path") or row.get("image"), row.get("question"), row.get("answer"))
            reasoning = row.get("solution")
        if key[0] and key[1] and reasoning and str(reasoning).strip():
            gold.setdefault(key, " ".join(str(reasoning).split()))
    return gold


def paper_filter(records: Sequence[dict], gold: dict | None = None, dedup: bool = False,
                 gold_only: bool = False) -> tuple[list[dict], dict]:
    """The paper's input handling: attach gold rationales, dedup, keep gold overlaps.

    records: prediction records (image, problem, solution). gold: from load_gold_reasoning; a matching
    record gets its "gold_reasoning" (a record's own non-empty one is kept). dedup: keep the first record
    per (image, question, answer) key; gold_only: drop records whose key has no gold rationale (needs
    gold). Returns (records, counts {input, after_dedup, after_gold_overlap, with_gold}).
    """
    if gold_only and gold is None:
        raise ValueError("gold_only needs a gold rationale file")
    counts = {"input": len(records)}
    out, seen = [], set()
    for rec in records:
        key = gold_key(rec.get("image"), rec.get("problem"), rec.get("solution"))
        if dedup and key in seen:
            continue
        seen.add(key)
        if gold is not None and key in gold and not (rec.get("gold_reasoning") or "").strip():
            rec = {**rec, "gold_reasoning": gold[key]}
        out.append((rec, gold is not None and key in gold))
    counts["after_dedup"] = len(out)
    if gold_only:
        out = [(r, g) for r, g in out if g]
    counts["after_gold_overlap"] = len(out)
    counts["with_gold"] = sum(1 for r, _ in out if (r.get("gold_reasoning") or "").strip())
    return [r for r, _ in out], counts


# ----------------------------------------------------------------------------- answer verdicts


def answer_verdicts(records: Sequence[dict]) -> tuple[list[dict], dict]:
    """Right/wrong of every record, as `correct` (the rule match of mrpo.eval.answers.rule_correct).

    A record with an `answer` or a `text` is recomputed from it; one with neither keeps its own
    `correct` (predictions from other tools carry only the verdict; without one it is wrong, as before).
    Where a record has both and they disagree, the recomputed verdict wins and is counted.
    Returns (records with `correct` set, counts {recomputed, own, disagreements}); ValueError naming
    the record when its own `correct` is neither true, false nor null.
    """
    from mrpo.eval.answers import rule_correct

    out, counts = [], {"recomputed": 0, "own": 0, "disagreements": 0}
    for i, rec in enumerate(records):
        own = rec.get("correct")
        if own is not None and not isinstance(own, bool):
            raise ValueError(f"record {i} (id={rec.get('id')!r}): \"correct\" must be true, false or null, "
                             f"got {own!r}")
        if rec.get("answer") is None and not rec.get("text"):
            if own is not None:
                counts["own"] += 1
                out.append(rec)
                continue
        verdict = rule_correct(rec)
        counts["recomputed"] += 1
        counts["disagreements"] += own is not None and own != verdict
        out.append({**rec, "correct": verdict})
    return out, counts


# ----------------------------------------------------------------------------- judging records


def record_steps(rec: dict) -> list[str]:
    """The record's reasoning steps: its "steps" list, else segmented from "text"."""
    steps = rec.get("steps")
    if steps is not None:
        return list(steps)
    from mrpo.rewards.steps import segment_steps

    text = rec.get("text") or ""
    tag = "thinking" if "<thinking>" in text else "think"
    return [s.text for s in segment_steps(text, tag=tag)]


def judge_records(records: Sequence[dict], judge, judge_all: bool = False,
                  batch_size: int = 64) -> list[dict]:
    """Judge the steps of each record with a StepJudge (mrpo.judges.base interface; None = no judge:
    nothing is sent and every record stays unjudged).

    records: prediction records (mrpo.infer output: id, problem, image, solution, gold_reasoning,
        steps, correct, facts). Only wrong answers (correct is False) are sent unless judge_all.
    Returns one row per record: {id, dataset, answer_type, correct, steps, sent, valid, alignment,
    contribution}; sent: the row went to the judge; valid is None when not judged (judge failure,
    or a correct answer not sent), [] when the completion has no steps (nothing sent).
    """
    from mrpo.judges.base import JudgeRequest

    rows, pending = [], []
    for i, rec in enumerate(records):
        steps = record_steps(rec)
        row = {"id": rec.get("id"), "dataset": rec.get("dataset"), "answer_type": rec.get("answer_type"),
               "correct": rec.get("correct"), "steps": steps, "sent": False, "valid": None,
               "alignment": None, "contribution": None}
        rows.append(row)
        if not steps:
            row["valid"], row["alignment"], row["contribution"] = [], [], []
        elif judge is not None and (judge_all or rec.get("correct") is False):
            row["sent"] = True
            pending.append(i)

    for start in range(0, len(pending), batch_size):
        idx = pending[start:start + batch_size]
        reqs = [JudgeRequest(sample_id=str(records[i].get("id")), problem=records[i].get("problem", ""),
                             image=records[i].get("image"), gold_answer=str(records[i].get("solution", "")),
                             gold_reasoning=records[i].get("gold_reasoning") or "",
                             steps=rows[i]["steps"], facts=records[i].get("facts"))
                for i in idx]
        verdicts = judge.judge(reqs)
        if len(verdicts) != len(reqs):
            raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(reqs)} requests")
        for i, v in zip(idx, verdicts):
            if v is None or len(v.alignment) != len(rows[i]["steps"]):
                continue  # unjudged (a verdict of the wrong length is not scored either)
            rows[i]["alignment"] = [int(a) for a in v.alignment]
            rows[i]["contribution"] = [int(c) for c in v.contribution]
            rows[i]["valid"] = list(v.valid)
    return rows


def evaluate_reasoning(records: Sequence[dict], judge, out_dir: str | Path | None = None,
                       judge_all: bool = False, batch_size: int = 64, input_counts: dict | None = None,
                       verdict_counts: dict | None = None) -> dict:
    """Judge steps and compute failure-cascade stats; optionally write the eval files.

    Writes (when out_dir is given) out_dir/reasoning.json (the summary returned here) and
    out_dir/reasoning_steps.jsonl (one judged row per record, see judge_records). input_counts (e.g.
    paper_filter's) is stored in the summary as "input", verdict_counts (answer_verdicts' counts) as
    "answer_verdicts".
    """
    from mrpo.judges.spend import usage_since

    before = usage_since(judge)
    rows = judge_records(records, judge, judge_all=judge_all, batch_size=batch_size)
    summary = _summary(rows, judge, judge_all, before)
    if input_counts is not None:
        summary["input"] = input_counts
    if verdict_counts is not None:
        summary["answer_verdicts"] = verdict_counts
    if out_dir is not None:
        _write_jsonl(Path(out_dir) / "reasoning_steps.jsonl", rows)
        _write_json(Path(out_dir) / "reasoning.json", summary)
    return summary


def _summary(rows: list[dict], judge, judge_all: bool, usage_before: dict | None = None) -> dict:
    """usage_before: the judge's usage (mrpo.judges.spend.usage_since) before judging these rows."""
    from mrpo.judges.spend import usage_since

    stats_obj = getattr(judge, "stats", None)
    return {"judge_usage": usage_since(judge, usage_before), "kind": "reasoning", **failure_cascade_stats(rows), "sentence_level": sentence_scores(rows),
            "judge": None if judge is None else type(judge).__name__,
            "sent_to_judge": sum(r["sent"] for r in rows),
            "unjudged": sum(r["sent"] and r["valid"] is None for r in rows),
            "judge_stats": stats_obj.as_dict() if hasattr(stats_obj, "as_dict") else None,
            "judged_all": judge_all}


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(data), indent=2, allow_nan=False))


def evaluate_generations(records: Sequence[dict], texts: Sequence[str], judge, reasoning_tag: str = "think",
                         out_dir: str | Path | None = None, judge_all: bool = False,
                         rows: list[dict] | None = None) -> dict:
    """Evaluation of already generated completions (the trainer's periodic / final evaluation).

    records: input records; texts: one completion text per record (special tokens kept).
    judge: StepJudge or None. Wrong answers are step-judged (all with judge_all).
    Returns the reasoning summary (failure_cascade_stats keys incl. accuracy, early_failure_share,
    wrong_judged and the additive `counts`: all-reduce them across ranks, then summary_from_counts).
    With out_dir: writes predictions.jsonl, answers.json, reasoning.json, reasoning_steps.jsonl there
    (the layout mrpo.eval.compare reads; pass it only where `records` is the whole evaluation set).
    rows: judge_records' rows of these completions when they are already judged (evaluate_over_ranks).
    """
    from mrpo.infer import prediction_record

    if len(records) != len(texts):
        raise ValueError(f"{len(texts)} completions for {len(records)} records")
    preds = [prediction_record(r, t, reasoning_tag) for r, t in zip(records, texts)]
    from mrpo.judges.spend import usage_since

    before = usage_since(judge)
    rows = judge_records(preds, judge, judge_all=judge_all) if rows is None else rows
    summary = _summary(rows, judge, judge_all, before)
    if out_dir is not None:
        from mrpo.eval.answers import evaluate_answers

        out = Path(out_dir)
        _write_jsonl(out / "predictions.jsonl", preds)
        evaluate_answers(preds, None, out_dir=out, predictions=str(out / "predictions.jsonl"))
        _write_jsonl(out / "reasoning_steps.jsonl", rows)
        _write_json(out / "reasoning.json", summary)
    return summary


def evaluate_over_ranks(records: Sequence[dict], texts: Sequence[str], judge, reasoning_tag: str,
                        out_dir: str | Path) -> dict | None:
    """evaluate_generations with the step judging split over the ranks (rank r judges records[r::world])
    and its files, plus summary.json, written by rank 0, which alone gets the summary (None elsewhere).

    A rank that finishes its share first waits for the others without a collective
    (mrpo.distributed.wait_for_all_ranks), so a judge slower than the process-group timeout does not end
    the run; the rows are then gathered at once. judge_stats in the summary are summed over ranks.
    """
    import torch.distributed as dist

    from mrpo.distributed import wait_for_all_ranks
    from mrpo.infer import prediction_record

    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    mine = [prediction_record(r, t, reasoning_tag) for r, t in zip(records[rank::world], texts[rank::world])]
    rows = judge_records(mine, judge)
    stats = getattr(getattr(judge, "stats", None), "as_dict", dict)()
    parts = [(rows, stats)]
    if world > 1:
        wait_for_all_ranks(f"eval:{Path(out_dir).name}")
        parts = [None] * world
        dist.all_gather_object(parts, (rows, stats))
    if rank != 0:
        return None
    rows = [parts[i % world][0][i // world] for i in range(len(records))]
    summary = evaluate_generations(records, texts, judge, reasoning_tag, out_dir=out_dir, rows=rows)
    if summary.get("judge_stats") is not None:
        summary["judge_stats"] = {k: sum(p[1].get(k, 0) for p in parts) for k in summary["judge_stats"]}
        _write_json(Path(out_dir) / "reasoning.json", summary)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def format_reasoning(summary: dict) -> str:
    """A few human-readable lines for the CLI."""
    sh, w = summary["stage_shares"], summary["wrong"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    far = ", ".join(f"{c:.1f}:{pct(m)}" for c, m in zip(summary["far"]["bin_centers"], summary["far"]["mean"]))
    sl = summary.get("sentence_level")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    sentences = ("" if not sl else
                 f"\nsentences judged: {sl['sentences']} in {sl['records']} records: mean alignment "
                 f"{fmt(sl['mean_alignment'])}, mean contribution {fmt(sl['mean_contribution'])}, "
                 f"mean score {fmt(sl['mean_score'])}")
    return (f"wrong answers: {summary['n_wrong']} of {summary['n_records']} "
            f"(with failure {w['with_failure']}, no failure {w['no_failure']}, no steps {w['no_steps']}, "
            f"unjudged {w['unjudged']})\n"
            f"first failure stage: early {pct(sh['early'])} / mid {pct(sh['mid'])} / late {pct(sh['late'])}\n"
            f"FAR by FFP bin: {far}; overall {pct(summary['far']['overall'])}" + sentences)
