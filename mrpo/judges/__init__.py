"""Step judges behind one interface (mrpo.judges.base.StepJudge), chosen by judge.kind.

    http    OpenAI-compatible chat completions endpoint (mrpo.judges.http.HTTPJudge)
    local   local Hugging Face model (mrpo.judges.local.LocalJudge)
    rule    ground-truth facts of synthetic data (mrpo.judges.rule.RuleJudge)
    labels  precomputed labels from a JSONL file (mrpo.judges.labels.LabelsJudge)
    python  your function judge.function = "pkg.module:fn" (mrpo.judges.python.PythonJudge)
    none    no judge (GRPO/GDPO without process reward)

judge.noise_flip_rate > 0 wraps any of them in mrpo.judges.noisy.NoisyJudge (seeded verdict flips, training only).
"""
from __future__ import annotations

from mrpo.errors import UserInputError
from mrpo.judges.base import JudgeRequest, JudgeStats, StepJudge, StepVerdict
from mrpo.judges.noisy import NoisyJudge, clean_judge


def _http(cfg):
    from mrpo.judges.http import HTTPJudge
    return HTTPJudge(cfg)


def _local(cfg):
    from mrpo.judges.local import LocalJudge
    return LocalJudge(cfg)


def _rule(cfg):
    from mrpo.judges.rule import RuleJudge
    return RuleJudge(cfg)


def _labels(cfg):
    from mrpo.judges.labels import LabelsJudge
    return LabelsJudge(cfg)


def _python(cfg):
    from mrpo.judges.python import PythonJudge
    return PythonJudge(cfg)


JUDGES = {"http": _http, "local": _local, "rule": _rule, "labels": _labels, "python": _python,
          "none": lambda cfg: None}


# the key naming what a judge reads at set-up, for the one-line error when it cannot be read
_SOURCE_KEY = {"local": "judge.local_model_path", "labels": "judge.labels_path"}


def build_judge(cfg) -> StepJudge | None:
    """The judge for cfg.kind (a JudgeConfig or anything with the same attributes); None for "none".
    With cfg.noise_flip_rate > 0 it is wrapped in mrpo.judges.noisy.NoisyJudge (its .clean is the judge).
    A labels file or local model that cannot be read raises UserInputError naming the key."""
    kind = getattr(cfg, "kind", None)
    if kind not in JUDGES:
        raise ValueError(f"judge.kind={kind!r} is not one of {', '.join(repr(k) for k in JUDGES)}")
    try:
        judge = JUDGES[kind](cfg)
        rate = float(getattr(cfg, "noise_flip_rate", 0.0) or 0.0)
        if rate and judge is not None:   # research option: a judge wrong part of the time (training only)
            judge = NoisyJudge(judge, rate, getattr(cfg, "noise_seed", 0))
        return judge
    except (OSError, ValueError) as e:
        if kind not in _SOURCE_KEY or isinstance(e, UserInputError):
            raise
        key = _SOURCE_KEY[kind]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"judge.kind={kind}: {key}={getattr(cfg, key.split('.')[1], None)}: {first}; "
                             f"fix the file or point {key} at a readable one") from None


__all__ = ["JudgeRequest", "JudgeStats", "StepJudge", "StepVerdict", "build_judge", "clean_judge", "NoisyJudge",
           "JUDGES"]
