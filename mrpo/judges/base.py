"""The step-judge interface shared by training (process reward, MRPO shaping) and evaluation (FFP/FAR).

A judge receives, per completion, the problem, its images (0..n), gold answer, gold rationale and the list of
reasoning steps, and returns per step `alignment` (consistent with the gold rationale) and
`contribution` (helps derive the gold answer). A step is valid when either is 1.
A judge that still fails after its retries returns None for that request: the caller marks the
sample "unjudged" (process reward excluded, plain advantage kept) and counts it. Never a silent 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class JudgeRequest:
    sample_id: str                 # stable id of the data record (for logs and caches)
    problem: str                   # question text
    image: str | list[str] | None  # image file path(s) of the record, in order (None or [] for text-only)
    gold_answer: str
    gold_reasoning: str            # gold rationale (MedThink-style), "" when unknown
    steps: list[str]               # reasoning steps of one completion, in order
    facts: dict | None = None      # ground-truth facts (synthetic data only; used by the rule judge)

    @property
    def image_paths(self) -> list[str]:
        """All image paths, in order ([] for text-only)."""
        if not self.image:
            return []
        return [self.image] if isinstance(self.image, str) else list(self.image)


@dataclass
class StepVerdict:
    alignment: list[int]           # [K] 0/1 per step
    contribution: list[int]        # [K] 0/1 per step

    @property
    def valid(self) -> list[bool]:
        return [bool(a) or bool(c) for a, c in zip(self.alignment, self.contribution)]


@dataclass
class JudgeStats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0              # requests that ended unjudged (None)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StepJudge(Protocol):
    stats: JudgeStats

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = unjudged after retries (never scored)."""
        ...
