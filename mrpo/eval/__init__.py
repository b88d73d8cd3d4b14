"""Evaluation: answer accuracy (rule / LLM judge), step-level failure cascades (FFP, FAR), run comparison.

    python -m mrpo.infer --model PATH --data test.jsonl --out RUN/eval/predictions.jsonl
    python -m mrpo.eval answers   --pred RUN/eval/predictions.jsonl [--llm-judge --judge-model M --judge-url URL]
    python -m mrpo.eval reasoning --pred RUN/eval/predictions.jsonl --judge rule|http|local|labels
    python -m mrpo.eval compare RUN_A RUN_B ... --out compare/

Each command writes a JSON summary next to the predictions (EVAL/answers.json, EVAL/reasoning.json;
layout in mrpo/eval/compare.py) that `compare` reads.
"""
from mrpo.eval.answers import AnswerJudge, accuracy_summary, evaluate_answers, rule_correct
from mrpo.eval.reasoning import (
    cascade_counts,
    evaluate_generations,
    evaluate_reasoning,
    failure_accumulation_rate,
    failure_cascade_stats,
    ffp_stage,
    first_failure_point,
    summary_from_counts,
)

__all__ = [
    "AnswerJudge", "accuracy_summary", "evaluate_answers", "rule_correct", "cascade_counts",
    "evaluate_generations", "evaluate_reasoning", "failure_accumulation_rate", "failure_cascade_stats",
    "ffp_stage", "first_failure_point", "summary_from_counts",
]
