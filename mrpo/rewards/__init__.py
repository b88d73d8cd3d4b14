"""Rewards of a batch of completions: answer, process (step judge), length, format, and yours (reward.custom).

The enabled rewards (weight > 0; custom ones: weight != 0) are the columns of RewardModel.columns, in a
fixed order: answer, process, length, format, then custom rewards in config order. A value can be
MISSING for a completion: the process reward when the judge failed on it ("unjudged"), a custom reward
that returned None or whose call failed (mrpo.rewards.custom). Missing never means 0:
    total (logged)   = sum over the present values of weight * reward
    advantage        = mrpo.algo.advantages.compute_advantages(reward_matrix, weights=column weights),
                       which puts a missing value at its group's mean (GDPO: normalises it to 0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from mrpo.config import BUILTIN_REWARDS
from mrpo.judges.base import FAILURE_CAUSES, JudgeRequest, StepVerdict, Usage
from mrpo.rewards.answer import AnswerScorer, extract_answer
from mrpo.rewards.custom import CUSTOM_FAILURE_CAUSES, CustomRewards
from mrpo.rewards.format import format_reward
from mrpo.rewards.length import length_reward
from mrpo.rewards.process import process_reward
from mrpo.rewards.steps import Step, segment_steps

REWARD_COLUMNS = BUILTIN_REWARDS   # the built-in rewards, in column order (named in mrpo.config, which has no torch)


@dataclass
class ScoredCompletion:
    steps: list[Step]              # K reasoning steps, char spans in the completion text
    answer: str | None             # extracted answer (None when absent)
    r_answer: float                # [0, 1]
    r_process: float | None        # [0, 1]; None when unjudged or no judge
    r_length: float                # <= 0
    r_format: float                # 0 or 1
    total: float                   # weighted sum of the enabled rewards present (a missing one is left out)
    answer_correct: bool           # r_answer > tau (MRPO shaping: plain advantage when correct)
    step_valid: list[bool] | None  # [K] per-step validity; None when unjudged or no judge
    judged: bool                   # the judge returned a verdict (K = 0 counts as judged)
    custom: dict[str, float | None] = field(default_factory=dict)   # custom rewards by name; None = missing

    def value(self, name: str) -> float | None:
        """The unweighted reward called `name` (a built-in of REWARD_COLUMNS or a custom one); None = missing."""
        if name in REWARD_COLUMNS:
            return getattr(self, f"r_{name}")
        return self.custom.get(name)


class RewardModel:
    """Scores completions against their data records.

    reward_cfg: answer_weight, process_weight, length_weight, format_weight, k_min, k_max,
    bert_model_path, custom (RewardConfig; custom = normalised [{name, function, weight}], imported here). judge: a StepJudge, or None (then no process reward and no step
    validity). reasoning_tag: "think" ("thinking" for Qwen3-VL). tau: answer counts as correct above it.
    """

    def __init__(self, reward_cfg, judge=None, reasoning_tag: str = "think", tau: float = 0.6):
        if reward_cfg.process_weight > 0 and judge is None:
            raise ValueError("RewardModel: reward.process_weight > 0 needs a step judge (judge.kind is 'none')")
        self.cfg, self.judge, self.tag, self.tau = reward_cfg, judge, reasoning_tag, tau
        self.weights = {"answer": reward_cfg.answer_weight, "process": reward_cfg.process_weight,
                        "length": reward_cfg.length_weight, "format": reward_cfg.format_weight}
        self.columns: list[tuple[str, float]] = [(name, w) for name, w in self.weights.items() if w != 0]
        self.custom = CustomRewards.from_config(getattr(reward_cfg, "custom", None) or [])
        self.columns += [(r.name, r.weight) for r in self.custom.rewards]
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"  # BERTScore
        self.answer_scorer = AnswerScorer(getattr(reward_cfg, "bert_model_path", None), device=device)

    def _requests(self, steps: list[list[Step]], records: list[dict]) -> list[JudgeRequest]:
        reqs = []
        for i, (st, rec) in enumerate(zip(steps, records)):
            missing = [k for k in ("id", "problem", "solution") if k not in rec]
            if missing:
                raise KeyError(f"RewardModel: record {i} (id={rec.get('id')!r}) lacks key(s) {missing}")
            reqs.append(JudgeRequest(sample_id=str(rec["id"]), problem=rec["problem"], image=rec.get("image"),
                                     gold_answer=str(rec["solution"]), gold_reasoning=rec.get("gold_reasoning") or "",
                                     steps=[s.text for s in st], facts=rec.get("facts")))
        return reqs

    def score(self, completions: list[str], records: list[dict],
              special_tokens: Sequence[str] = ()) -> tuple[list[ScoredCompletion], dict]:
        """Score completions[i] against records[i] (keys id, image, problem, solution, gold_reasoning, facts).
        special_tokens: strings (EOS, pad, chat end; mrpo.rewards.steps.special_token_strings) that never
        become part of a step, so neither the step texts nor the judge's prompts hold them.

        The judge is called once with every completion that has K > 0 steps (K = 0 is judged locally:
        process reward 0). Returns the scores and per-call counts: n, unjudged, zero_steps,
        answer_correct, judge_sent (completions sent to the judge), unjudged_<cause> for every cause in
        mrpo.judges.base.FAILURE_CAUSES (0 when none; the same keys on every call), and the judge's
        stats for this call (judge_requests, judge_cache_hits, judge_retries, judge_failures), judge_usage
        (this call's mrpo.judges.base.Usage counts: HTTP requests sent, tokens billed), and
        custom_failed: {custom reward name: {cause: completions whose value a failed call lost}}.
        Custom rewards are called after the judge, once per reward, on the whole batch.
        """
        if len(completions) != len(records):
            raise ValueError(f"RewardModel.score: {len(completions)} completions but {len(records)} records")
        steps = [segment_steps(c, self.tag, special_tokens) for c in completions]
        requests = self._requests(steps, records)
        answers = [extract_answer(c) for c in completions]
        r_answer = self.answer_scorer.score_many(answers, [r.gold_answer for r in requests])

        verdicts: list[StepVerdict | None] = [None] * len(completions)
        stats = {"n": len(completions), "judge_sent": 0, **{f"unjudged_{c}": 0 for c in FAILURE_CAUSES}}
        if self.judge is not None:
            before = self.judge.stats.as_dict()
            causes_before = dict(getattr(self.judge.stats, "causes", {}))
            usage = getattr(self.judge.stats, "usage", None)
            usage_before = usage.as_dict() if usage is not None else {}
            ask = [i for i, st in enumerate(steps) if st]
            stats["judge_sent"] = len(ask)
            got = self.judge.judge([requests[i] for i in ask]) if ask else []
            if len(got) != len(ask):
                raise RuntimeError(f"RewardModel: judge {self.judge!r} returned {len(got)} verdicts for "
                                   f"{len(ask)} requests")
            for i, v in zip(ask, got):
                if v is not None and len(v.alignment) != len(steps[i]):
                    raise RuntimeError(f"RewardModel: judge {self.judge!r} returned {len(v.alignment)} labels for "
                                       f"{len(steps[i])} steps (sample {requests[i].sample_id!r})")
                verdicts[i] = v
            for i, st in enumerate(steps):
                if not st:
                    verdicts[i] = StepVerdict(alignment=[], contribution=[])
            after = self.judge.stats.as_dict()
            stats.update({f"judge_{k}": after[k] - before.get(k, 0) for k in after})
            if usage is not None:
                stats["judge_usage"] = {k: v - usage_before.get(k, 0) for k, v in usage.as_dict().items()}
            for cause, count in getattr(self.judge.stats, "causes", {}).items():
                key = f"unjudged_{cause if cause in FAILURE_CAUSES else 'other'}"
                stats[key] += count - causes_before.get(cause, 0)

        plain_texts = [_without(c, special_tokens) for c in completions]   # as TRL's skip_special_tokens
        custom, stats["custom_failed"] = self.custom.score(plain_texts, answers, [r.steps for r in requests], records)
        scored = []
        for i, c in enumerate(completions):
            judged = verdicts[i] is not None
            s = ScoredCompletion(
                steps=steps[i], answer=answers[i], r_answer=r_answer[i], r_process=process_reward(verdicts[i]),
                r_length=length_reward(len(steps[i]), self.cfg.k_min, self.cfg.k_max),
                r_format=format_reward(c, self.tag), total=0.0, answer_correct=r_answer[i] > self.tau,
                step_valid=verdicts[i].valid if judged else None, judged=judged,
                custom={name: values[i] for name, values in custom.items()})
            s.total = self.weighted_total(s)
            scored.append(s)
        stats["unjudged"] = sum(1 for s in scored if self.judge is not None and not s.judged)
        stats["zero_steps"] = sum(1 for st in steps if not st)
        stats["answer_correct"] = sum(s.answer_correct for s in scored)
        return scored, stats

    def weighted_total(self, s: ScoredCompletion) -> float:
        """The logged reward: sum of weight * value over the columns whose value is present."""
        return float(sum(w * v for name, w in self.columns if (v := s.value(name)) is not None))

    def reward_matrix(self, scored: list[ScoredCompletion]) -> torch.Tensor:
        """[n, len(columns)] float32 UNWEIGHTED rewards, one column per entry of `columns` (a disabled
        reward is not a column); NaN where a value is missing (unjudged). The advantages take the column
        weights separately: compute_advantages(matrix, ..., weights=[w for _, w in columns])."""
        out = torch.full((len(scored), len(self.columns)), float("nan"), dtype=torch.float32)
        for i, s in enumerate(scored):
            for j, (name, _) in enumerate(self.columns):
                if (v := s.value(name)) is not None:
                    out[i, j] = v
        return out


# the step metrics that count completions (failures, missing values): summed over ranks, not averaged
COUNT_METRICS = ("judge_sent", "unjudged", "reward_missing/", "reward_failed/")


def judge_metrics(stats: dict) -> dict:
    """Per-step judge metrics from RewardModel.score's counts, with the same keys on every rank and step:
    judge_sent, unjudged, unjudged/<cause> for each cause in FAILURE_CAUSES (counts of completions), and
    this rank's usage: judge/requests (HTTP requests sent, retries included; 0 for judges that send none),
    judge/cache_hits (verdicts read from judge.cache_dir), judge/prompt_tokens, judge/completion_tokens
    and judge/usage_unknown (replies without a `usage` object). mrpo.judges.spend.JudgeSpend turns the
    usage into sums over ranks after the step's all-reduce."""
    out = {"judge_sent": float(stats.get("judge_sent", 0)), "unjudged": float(stats.get("unjudged", 0))}
    out.update({f"unjudged/{c}": float(stats.get(f"unjudged_{c}", 0)) for c in FAILURE_CAUSES})
    usage = stats.get("judge_usage", {})
    out.update({f"judge/{k}": float(usage.get(k, 0)) for k in Usage.FIELDS})
    out["judge/cache_hits"] = float(stats.get("judge_cache_hits", 0))
    return out


def _without(text: str, special_tokens: Sequence[str]) -> str:
    for token in special_tokens:
        text = text.replace(token, "")
    return text


def custom_reward_metrics(scored: list[ScoredCompletion], stats: dict) -> dict:
    """Per custom reward (the names in stats["custom_failed"], so the same keys on every rank and step):
    reward/<name> (mean of the present values, NaN when none), reward_missing/<name> (completions without
    a value: None returned or the call failed) and reward_failed/<name>/<cause> for every cause in
    CUSTOM_FAILURE_CAUSES (completions whose value a failed call lost)."""
    out = {}
    for name, causes in stats.get("custom_failed", {}).items():
        present = [v for s in scored if (v := s.custom.get(name)) is not None]
        out[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
        out[f"reward_missing/{name}"] = float(len(scored) - len(present))
        out.update({f"reward_failed/{name}/{c}": float(causes.get(c, 0)) for c in CUSTOM_FAILURE_CAUSES})
    return out


__all__ = ["COUNT_METRICS", "REWARD_COLUMNS", "RewardModel", "ScoredCompletion", "Step", "custom_reward_metrics", "judge_metrics"]
