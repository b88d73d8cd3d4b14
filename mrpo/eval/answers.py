"""Answer accuracy per data set and answer type (closed yes/no vs open), by rule and by an LLM judge.

Rule: `mrpo.rewards.answer.answers_match(answer, solution)` on the extracted <answer> (no answer =
wrong). LLM judge (optional): the paper's protocol (dmis-lab/MRPO Eval_code/Answer_Evaluation.py) asks
an OpenAI-compatible chat model, with the image when readable, whether the prediction matches the
ground truth or is a good enough answer, and takes a single-character verdict ("1" correct / "0"
wrong; the reference code's "O"/"X" are accepted too). Requests go through
mrpo.judges.openai_client.ChatCompletionClient: network errors, HTTP 429/5xx and malformed replies are
retried `max_retries` times with exponential backoff and jitter, other 4xx are not, 401/403/404 raise
RuntimeError; a record still failing is "unjudged": counted, never scored (its data set's LLM accuracy
is over judged records only).
Predictions without an extracted answer are wrong without asking the judge.

Integer answers are spelled out before matching, as the paper's answer evaluation does
(`to_words`: "3" -> "three" with num2words, for the prediction and the ground truth alike) before
the rule match and in the judge prompt. The paper's inference output (dmis-lab/MRPO inference.py:
a JSON list of {image, problem, solution, text, think, answer}) is read through `paper_predictions`.

Accuracies are fractions in [0, 1]; None when nothing was scored.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from mrpo.judges.base import Usage
from mrpo.judges.openai_client import ChatCompletionClient
from mrpo.judges.prompt import image_data_url
from mrpo.judges.ratelimit import RateGate

ANSWER_JUDGE_SYSTEM = (
    "Given a question about a medical image, there is a correct answer to the question and an answer "
    "to be determined. If the answer to be determined matches the correct answer or is a good enough "
    "answer to the question, output '1'; otherwise output '0'. Respond with a single character: "
    "'1' (correct) or '0' (incorrect)."
)
ANSWER_JUDGE_USER = (
    "Question:\n- question about the medical image: {problem}\n\n"
    "Answers:\n- correct answer (ground truth): {solution}\n- answer to be determined: {answer}\n\n"
    "Your response must be a single character: '1' (correct) or '0' (incorrect)."
)
_VERDICTS = {"1": True, "0": False, "O": True, "X": False}


def parse_verdict(content: str | None) -> bool | None:
    """'1'/'0' (or 'O'/'X') possibly wrapped in whitespace/quotes/period -> bool; anything else None."""
    s = (content or "").strip().strip("'\"`.").strip()
    return _VERDICTS.get(s)


def to_words(value) -> str:
    """An integer answer spelled out ("21" -> "twenty-one", "-3" -> "minus three"), anything else as
    its stripped text: the paper's normalisation (Eval_code/Answer_Evaluation.py `to_words`)."""
    from num2words import num2words

    text = str(value).strip()
    try:
        return num2words(int(text))
    except (ValueError, TypeError, OverflowError):
        return text


def rule_correct(rec: dict) -> bool:
    """Rule match of the record's extracted answer (or one extracted from "text") with "solution",
    both through `to_words` first."""
    from mrpo.rewards.answer import answers_match, extract_answer

    answer = rec["answer"] if "answer" in rec else extract_answer(rec.get("text") or "")
    return answer is not None and answers_match(to_words(answer), to_words(rec.get("solution", "")))


# data set named by a folder of the image path (the paper's Data_RAW/<folder>/...)
_PAPER_DATASETS = {"vqa-rad": "vqa_rad", "vqa_rad": "vqa_rad", "slake": "slake", "pathvqa": "pathvqa",
                   "path-vqa": "pathvqa"}


def paper_reasoning(row: dict) -> str:
    """Generated reasoning of a paper inference row: "think" (or Generated_Reasoning / reasoning), else
    the <think>/<thinking> blocks of "text" (Eval_code/Reasoning_Evaluation.py's order)."""
    import re

    for key in ("think", "Generated_Reasoning", "generated_reasoning", "reasoning"):
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    found = re.findall(r"<think(?:ing)?>([\s\S]*?)</think(?:ing)?>", str(row.get("text") or ""), flags=re.I)
    return " ".join(m.strip() for m in found if m.strip())


def paper_predictions(rows: Sequence, name: str) -> list[dict]:
    """Prediction records (mrpo.infer's fields) from the paper's inference output.

    rows: the JSON list of {image, problem, solution, text?, think?, answer?} objects; name: the file
    name, for ids "<name>:<1-based index>". dataset: the image path's Data_RAW folder (vqa-rad, slake,
    pathvqa) else "unknown"; answer_type: closed for yes/no solutions; steps: the reasoning split into
    sentences (mrpo.rewards.steps.split_steps); correct: `rule_correct`. Raises ValueError naming the
    index of a row that is not an object with image, problem and solution.
    """
    from mrpo.data.prepare import answer_type
    from mrpo.rewards.steps import split_steps

    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{name}: item {i}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("image", "problem", "solution") if k not in row]
        if missing:
            raise ValueError(f"{name}: item {i}: missing key(s) {missing} (not the paper's inference output)")
        image = str(row.get("image") or "")
        folders = [p.lower() for p in image.replace("\\", "/").split("/")]
        dataset = next((_PAPER_DATASETS[p] for p in reversed(folders) if p in _PAPER_DATASETS), "unknown")
        answer = row.get("answer")
        reasoning = paper_reasoning(row)
        rec = {"id": f"{name}:{i}", "dataset": dataset, "answer_type": answer_type(str(row["solution"])),
               "problem": str(row["problem"]), "solution": str(row["solution"]),
               "gold_reasoning": str(row.get("gold_reasoning") or ""), "image": image or None,
               "text": str(row.get("text") or ""), "reasoning": reasoning,
               "answer": None if answer is None or not str(answer).strip() else str(answer).strip(),
               "steps": [s.text for s in split_steps(reasoning)]}
        rec["correct"] = rule_correct(rec)
        out.append(rec)
    return out


def _strict_verdict(content: str) -> bool:
    verdict = parse_verdict(content)
    if verdict is None:
        raise ValueError(f"reply is not a single '1'/'0': {str(content)[:50]!r}")
    return verdict


class AnswerJudge:
    """LLM answer judge over an OpenAI-compatible /chat/completions endpoint.

    cfg: any object with base_url, model, api_key_env, max_concurrency, timeout_s, max_retries,
    backoff_s and optionally max_requests_per_minute, price_input_per_mtok, price_output_per_mtok (e.g.
    mrpo.config.JudgeConfig); keyword arguments override it. The API key is read from the environment
    variable named by api_key_env (no Authorization header when unset) and is never logged. stats:
    requests, retries, errors (failed attempts), failures (= unjudged records), skipped_no_answer;
    usage: HTTP requests sent and tokens billed (mrpo.judges.base.Usage), reported with the cost in
    evaluate_answers' summary. Images that do not exist are left out of the prompt.
    """

    def __init__(self, cfg=None, *, base_url: str | None = None, model: str | None = None,
                 api_key_env: str | None = None, max_concurrency: int | None = None,
                 timeout_s: float | None = None, max_retries: int | None = None,
                 backoff_s: float | None = None, include_image: bool = True):
        def pick(value, name, default):
            return value if value is not None else getattr(cfg, name, default)

        self.base_url = pick(base_url, "base_url", "https://api.openai.com/v1").rstrip("/")
        self.model = pick(model, "model", "gpt-5-mini")
        self.api_key_env = pick(api_key_env, "api_key_env", "OPENAI_API_KEY")
        self.max_concurrency = max(1, int(pick(max_concurrency, "max_concurrency", 8)))
        self.timeout_s = float(pick(timeout_s, "timeout_s", 60.0))
        self.max_retries = max(0, int(pick(max_retries, "max_retries", 3)))
        self.backoff_s = float(pick(backoff_s, "backoff_s", 1.0))
        self.include_image = include_image
        self.prices = (float(getattr(cfg, "price_input_per_mtok", 0.0) or 0.0),
                       float(getattr(cfg, "price_output_per_mtok", 0.0) or 0.0))   # USD per million tokens
        self.usage = Usage()
        self.client = ChatCompletionClient(self.base_url, self.model, self.api_key_env, self.timeout_s,
                                           self.max_retries, self.backoff_s, name="AnswerJudge", usage=self.usage,
                                           gate=RateGate(float(getattr(cfg, "max_requests_per_minute", 0) or 0)))
        self.stats = {"requests": 0, "retries": 0, "errors": 0, "failures": 0, "skipped_no_answer": 0}
        self.last_errors: list[str] = []   # up to 5 messages (no secrets), for the report
        self._lock = threading.Lock()

    def _count(self, name: str, error: str | None = None) -> None:
        with self._lock:
            self.stats[name] += 1
            if error is not None and len(self.last_errors) < 5:
                self.last_errors.append(error)

    def _messages(self, rec: dict) -> list[dict]:
        text = ANSWER_JUDGE_USER.format(problem=rec.get("problem", ""), solution=to_words(rec.get("solution", "")),
                                        answer=to_words(rec.get("answer")))
        content: list[dict] | str = text
        image = rec.get("image") or []
        paths = [p for p in ([image] if isinstance(image, str) else image) if os.path.isfile(p)]
        if self.include_image and paths:
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in paths]
        return [{"role": "system", "content": ANSWER_JUDGE_SYSTEM}, {"role": "user", "content": content}]

    def judge_one(self, rec: dict) -> bool | None:
        """Verdict for one prediction record (problem, solution, answer, image); None = unjudged."""
        if rec.get("answer") is None or not str(rec.get("answer")).strip():
            self._count("skipped_no_answer")
            return False

        def on_retry() -> None:
            self._count("retries")
            self._count("requests")

        self._count("requests")
        verdict = self.client.complete(self._messages(rec), _strict_verdict, on_retry=on_retry,
                                       on_error=lambda msg: self._count("errors", f"{rec.get('id')}: {msg}"))
        if verdict is None:
            self._count("failures")
        return verdict

    def judge(self, records: Sequence[dict]) -> list[bool | None]:
        """One verdict per record, in order (threads: max_concurrency)."""
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self.judge_one, records))


def _group_stats(rule: list[bool], llm: list[bool | None] | None) -> dict:
    n = len(rule)
    out = {"n": n, "rule_correct": sum(rule), "rule_accuracy": sum(rule) / n if n else None}
    if llm is not None:
        judged = [v for v in llm if v is not None]
        out.update(llm_judged=len(judged), llm_unjudged=n - len(judged), llm_correct=sum(judged),
                   llm_accuracy=sum(judged) / len(judged) if judged else None)
    return out


def accuracy_summary(records: Sequence[dict], llm: Sequence[bool | None] | None = None) -> dict:
    """Accuracy overall, per answer type, per data set and per (data set, answer type).

    records: prediction records (dataset, answer_type, solution, answer or text).
    llm: optional LLM verdict per record (None = unjudged).
    Returns {overall: G, by_answer_type: {type: G}, by_dataset: {ds: G + {by_answer_type: {type: G}}}}
    with G = {n, rule_correct, rule_accuracy[, llm_judged, llm_unjudged, llm_correct, llm_accuracy]}.
    """
    if llm is not None and len(llm) != len(records):
        raise ValueError(f"{len(llm)} LLM verdicts for {len(records)} records")
    rule = [rule_correct(r) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        ds, at = str(r.get("dataset") or "unknown"), str(r.get("answer_type") or "unknown")
        for key in (("all",), ("type", at), ("ds", ds), ("ds_type", ds, at)):
            groups.setdefault(key, []).append(i)

    def g(key):
        idx = groups.get(key, [])
        return _group_stats([rule[i] for i in idx], None if llm is None else [llm[i] for i in idx])

    datasets = sorted({k[1] for k in groups if k[0] == "ds"})
    types = sorted({k[1] for k in groups if k[0] == "type"})
    by_dataset = {}
    for ds in datasets:
        by_dataset[ds] = {**g(("ds", ds)), "by_answer_type": {
            at: g(("ds_type", ds, at)) for at in types if ("ds_type", ds, at) in groups}}
    return {"overall": g(("all",)), "by_answer_type": {at: g(("type", at)) for at in types},
            "by_dataset": by_dataset}


def evaluate_answers(records: Sequence[dict], answer_judge: AnswerJudge | None = None,
                     out_dir: str | Path | None = None, predictions: str | None = None) -> dict:
    """Rule (and optionally LLM) accuracy; writes out_dir/answers.json and, with a judge,
    out_dir/answers_judged.jsonl ({id, dataset, answer_type, rule_correct, llm_correct}) when out_dir.
    With a judge, summary["llm_judge"]["usage"]: requests sent, prompt/completion tokens, replies without
    usage (usage_unknown), and cost_usd when the judge has prices."""
    from mrpo.judges.spend import usage_report

    llm = answer_judge.judge(records) if answer_judge is not None else None
    summary = {"kind": "answers", "predictions": predictions, **accuracy_summary(records, llm)}
    if answer_judge is not None:
        summary["llm_judge"] = {"model": answer_judge.model, "base_url": answer_judge.base_url,
                                **answer_judge.stats, "error_samples": answer_judge.last_errors,
                                "usage": usage_report(answer_judge.usage.as_dict(), *answer_judge.prices)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "answers.json").write_text(json.dumps(summary, indent=2))
        if llm is not None:
            with open(out / "answers_judged.jsonl", "w", encoding="utf-8") as f:
                for r, v in zip(records, llm):
                    f.write(json.dumps({"id": r.get("id"), "dataset": r.get("dataset"),
                                        "answer_type": r.get("answer_type"),
                                        "rule_correct": rule_correct(r), "llm_correct": v}) + "\n")
    return summary


def format_answers(summary: dict) -> str:
    """Plain-text table: data set x answer type, rule (and LLM) accuracy in %."""
    pct = lambda x: "   n/a" if x is None else f"{100 * x:6.2f}"  # noqa: E731
    has_llm = "llm_accuracy" in summary["overall"]
    head = f"{'data set':<20} {'type':<8} {'n':>6} {'rule%':>6}" + (f" {'llm%':>6} {'unjudged':>8}" if has_llm else "")
    lines = [head]

    def line(ds, at, g):
        s = f"{ds:<20} {at:<8} {g['n']:>6} {pct(g['rule_accuracy'])}"
        if has_llm:
            s += f" {pct(g['llm_accuracy'])} {g['llm_unjudged']:>8}"
        lines.append(s)

    for ds, g in summary["by_dataset"].items():
        line(ds, "all", g)
        for at, gt in g["by_answer_type"].items():
            line("", at, gt)
    for at, g in summary["by_answer_type"].items():
        line("ALL", at, g)
    line("ALL", "all", summary["overall"])
    return "\n".join(lines)
