"""CLI: python -m mrpo.eval answers|reasoning|compare ...  (see mrpo/eval/__init__.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace


def read_predictions(path: str | Path) -> list[dict]:
    """Prediction JSONL (mrpo.infer output), or the paper's inference output (a JSON list of {image,
    problem, solution, text, think, answer}; mrpo.eval.answers.paper_predictions). In JSONL a truncated
    last line is skipped with a warning; any other bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: prediction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        from mrpo.eval.answers import paper_predictions

        try:
            return paper_predictions(json.loads(text), path.name)
        except ValueError as e:  # JSONDecodeError included
            raise SystemExit(f"error: {path}: {e}")
    lines = text.split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if i == last:
                print(f"warning: {path}:{i + 1}: truncated last line skipped", file=sys.stderr)
                continue
            raise SystemExit(f"error: {path}:{i + 1}: {e}")
        for key in ("id", "solution"):
            if key not in row:
                raise SystemExit(f"error: {path}:{i + 1}: missing key '{key}' (not an mrpo.infer prediction)")
        rows.append(row)
    return rows


def _judge_cfg(args, kind: str):
    """A JudgeConfig (mrpo.config) with the CLI's values; a plain namespace if config is unavailable."""
    values = {"kind": kind}
    for name in ("model", "base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s",
                 "cache_dir", "labels_path", "local_model_path", "function", "prompt_template",
                 "price_input_per_mtok", "price_output_per_mtok", "max_requests_per_minute"):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    try:
        from mrpo.config import JudgeConfig
    except ImportError:  # pragma: no cover
        return SimpleNamespace(**values)
    return JudgeConfig(**values)


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge endpoint (OpenAI-compatible; key read from the env var, never logged)")
    g.add_argument("--judge-model", dest="model")
    g.add_argument("--judge-url", dest="base_url", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    g.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    g.add_argument("--max-concurrency", type=int)
    g.add_argument("--timeout-s", type=float)
    g.add_argument("--max-retries", type=int)
    g.add_argument("--backoff-s", type=float)
    g.add_argument("--max-requests-per-minute", type=float, help="cap on requests per minute (0 = none)")
    g.add_argument("--price-input-per-mtok", type=float, help="USD per million prompt tokens (for the cost line)")
    g.add_argument("--price-output-per-mtok", type=float, help="USD per million completion tokens")


def _preflight(cfg) -> None:
    """Fail fast, naming the cause, when the judge's key is missing or its endpoint does not answer."""
    from mrpo.judges.preflight import JudgeUnavailableError, check_endpoint

    try:
        check_endpoint(cfg.base_url, cfg.model, cfg.api_key_env, timeout_s=min(float(cfg.timeout_s), 10.0))
    except JudgeUnavailableError as e:
        raise SystemExit(f"error: LLM judge unavailable: {e}") from None


def format_usage(usage: dict) -> str:
    """'judge usage: 120 HTTP requests, 51,200 prompt + 3,100 completion tokens (2 replies without usage),
    $0.0190' (the cost only when priced)."""
    unknown = f" ({usage['usage_unknown']} replies without usage)" if usage.get("usage_unknown") else ""
    cost = f", ${usage['cost_usd']:.4f}" if "cost_usd" in usage else ""
    return (f"judge usage: {usage['requests']} HTTP requests, {usage['prompt_tokens']:,} prompt + "
            f"{usage['completion_tokens']:,} completion tokens{unknown}{cost}")


def cmd_answers(args) -> None:
    from mrpo.eval.answers import AnswerJudge, evaluate_answers, format_answers

    records = read_predictions(args.pred)
    judge = AnswerJudge(_judge_cfg(args, "http"), include_image=not args.no_image) if args.llm_judge else None
    if judge is not None:
        _preflight(judge)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.pred).parent
    summary = evaluate_answers(records, judge, out_dir=out_dir, predictions=str(args.pred))
    print(format_answers(summary))
    if judge is not None:
        s = summary["llm_judge"]
        print(f"LLM judge {s['model']}: {s['requests']} requests, {s['retries']} retries, "
              f"{s['failures']} unjudged (not scored), {s['skipped_no_answer']} without an answer (wrong)")
        print(format_usage(s["usage"]))
    print(f"wrote {out_dir / 'answers.json'}" + (f" and {out_dir / 'answers_judged.jsonl'}" if judge else ""))


def cmd_reasoning(args) -> None:
    from mrpo.eval.reasoning import (answer_verdicts, evaluate_reasoning, format_reasoning, load_gold_reasoning,
                                     paper_filter)

    _check_step_judge_args(args)
    records = read_predictions(args.pred)
    try:
        gold = load_gold_reasoning(args.gold) if args.gold else None
        records, input_counts = paper_filter(records, gold, dedup=args.dedup, gold_only=args.gold_only)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.correct_from:
        verdicts = {str(r["id"]): r.get("llm_correct") for r in read_predictions_loose(args.correct_from)}
        missing = [r["id"] for r in records if str(r["id"]) not in verdicts]
        if missing:
            raise SystemExit(f"error: {args.correct_from}: no verdict for {len(missing)} ids, e.g. {missing[:3]}")
        records = [{**r, "correct": verdicts[str(r["id"])]} for r in records]
        verdict_counts = None
    else:  # the rule verdict as `answers` gives it (integers spelled out first), else the record's own
        try:
            records, verdict_counts = answer_verdicts(records)
        except ValueError as e:
            raise SystemExit(f"error: {args.pred}: {e}")
    judge = _build_step_judge(args)
    if judge is None:
        raise SystemExit("error: --judge none gives no step verdicts; pick rule, http, local, labels or python")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.pred).parent
    summary = evaluate_reasoning(records, judge, out_dir=out_dir, judge_all=args.judge_all,
                                 batch_size=args.batch_size, input_counts=input_counts,
                                 verdict_counts=verdict_counts)
    c = input_counts
    print(f"records: {c['input']} read, {c['after_dedup']} after dedup, {c['after_gold_overlap']} after gold "
          f"overlap, {c['with_gold']} with a gold rationale")
    if verdict_counts is not None:
        v = verdict_counts
        print(f"answer verdicts: {v['recomputed']} recomputed from answer/text, {v['own']} the record's own "
              f"\"correct\" (no answer/text); {v['disagreements']} recomputed verdicts disagree with the "
              f"record's own \"correct\" (the recomputed one is used)")
    print(format_reasoning(summary))
    print(f"judge {summary['judge']}: {summary['sent_to_judge']} completions sent, {summary['unjudged']} unjudged")
    if summary.get("judge_usage") and summary["judge_usage"]["requests"]:
        print(format_usage(summary["judge_usage"]))
    print(f"wrote {out_dir / 'reasoning.json'} and {out_dir / 'reasoning_steps.jsonl'}")


def _check_step_judge_args(args) -> None:
    """Before any work: a bad --judge-function / --judge-prompt-template exits 2 in one line."""
    from mrpo.judges.prompt import JudgePrompt
    from mrpo.plugins import PluginError

    if args.judge == "python" and not args.function:
        _usage_error("--judge python needs --judge-function pkg.module:fn")
    if args.function and args.judge != "python":
        _usage_error(f"--judge-function is used by --judge python only (got --judge {args.judge})")
    if args.prompt_template and args.judge not in ("http", "local"):
        _usage_error(f"--judge-prompt-template is used by --judge http or local only (got --judge {args.judge})")
    try:
        if args.prompt_template:
            JudgePrompt.from_file(args.prompt_template)
        if args.function:
            from mrpo.judges.python import load_judge_function

            load_judge_function(args.function)
    except (PluginError, ValueError) as e:   # PromptTemplateError is a ValueError
        _usage_error(str(e))


def _build_step_judge(args):
    """The --judge of `reasoning` (arguments checked by _check_step_judge_args); an http judge's endpoint is
    checked first."""
    from mrpo.judges import build_judge
    from mrpo.plugins import PluginError

    try:
        cfg = _judge_cfg(args, args.judge)
        if args.judge == "http":
            _preflight(cfg)
        return build_judge(cfg)
    except (PluginError, ValueError) as e:   # PromptTemplateError is a ValueError
        _usage_error(str(e))


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_predictions_loose(path: str | Path) -> list[dict]:
    """JSONL rows with an 'id' (e.g. answers_judged.jsonl)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise SystemExit(f"error: {path}:{i + 1}: {e}")
    return rows


def cmd_compare(args) -> None:
    from mrpo.eval.compare import compare_runs

    labels = args.labels.split(",") if args.labels else None
    try:
        res = compare_runs(args.runs, args.out, labels=labels, paper=not args.no_paper, metric=args.metric,
                           paper_backbone=args.paper_backbone)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(res["compare.md"].read_text())
    print("wrote " + ", ".join(str(res[k]) for k in ("compare.md", "compare.csv", "accuracy.png",
                                                     "ffp_stages.png", "far_vs_ffp.png")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrpo.eval", description="MRPO evaluation")
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("answers", help="accuracy per data set and answer type (rule, optional LLM judge)")
    a.add_argument("--pred", required=True, help="prediction JSONL from python -m mrpo.infer, or the paper's "
                   "inference.py output (JSON list)")
    a.add_argument("--out-dir", help="where answers.json goes (default: the predictions' folder)")
    a.add_argument("--llm-judge", action="store_true", help="also score with an LLM answer judge")
    a.add_argument("--no-image", action="store_true", help="do not send the image to the LLM judge")
    _add_judge_args(a)
    a.set_defaults(func=cmd_answers)

    r = sub.add_parser("reasoning", help="step verdicts, First Failure Point, Failure Accumulation Rate")
    r.add_argument("--pred", required=True, help="as for answers")
    r.add_argument("--out-dir", help="where reasoning.json goes (default: the predictions' folder)")
    r.add_argument("--judge", default="rule", choices=["http", "local", "rule", "labels", "python"])
    r.add_argument("--judge-function", dest="function", help="your step judge \"pkg.module:fn\" (--judge python; "
                   "README \"Your own rewards and judges\")")
    r.add_argument("--judge-prompt-template", dest="prompt_template", help="YAML {system, user} replacing the "
                   "http/local judge's prompt (judge.prompt_template)")
    r.add_argument("--labels-path", help="precomputed step labels (--judge labels)")
    r.add_argument("--local-model-path", help="local judge model folder (--judge local)")
    r.add_argument("--cache-dir", help="judge cache folder")
    r.add_argument("--judge-all", action="store_true", help="judge correct answers too (step validity)")
    r.add_argument("--correct-from", help="answers_judged.jsonl: use the LLM answer verdicts for right/wrong "
                   "(default: the rule match, as `answers` scores it)")
    r.add_argument("--batch-size", type=int, default=64, help="requests per judge call")
    r.add_argument("--gold", help="gold rationales: the paper's medthink_test.json or a prepared test.jsonl")
    r.add_argument("--dedup", action="store_true", help="keep the first record per (image, question, answer)")
    r.add_argument("--gold-only", action="store_true", help="keep only records with a --gold rationale")
    _add_judge_args(r)
    r.set_defaults(func=cmd_reasoning)

    c = sub.add_parser("compare", help="side-by-side table (markdown, CSV) and PNG plots of runs")
    c.add_argument("runs", nargs="+", help="eval folders, run folders holding eval/, or summary JSON files")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--labels", help="comma-separated names, one per run (default: folder names)")
    c.add_argument("--metric", default="rule", choices=["rule", "llm"])
    c.add_argument("--no-paper", action="store_true", help="leave out the paper's published numbers")
    c.add_argument("--paper-backbone", default="Qwen3-VL-8B", choices=["Qwen2.5-VL-7B", "Qwen3-VL-8B", "InternVL3-8B"])
    c.set_defaults(func=cmd_compare)

    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
