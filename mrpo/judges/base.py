"""The step-judge interface shared by training (process reward, MRPO shaping) and evaluation (FFP/FAR).

A judge receives, per completion, the problem, its images (0..n), gold answer, gold rationale and the list of
reasoning steps, and returns per step `alignment` (consistent with the gold rationale) and
`contribution` (helps derive the gold answer). A step is valid when either is 1.
A judge that still fails after its retries returns None for that request: the caller marks the
sample "unjudged" (process reward excluded, plain advantage kept) and counts it. Never a silent 0.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
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


# Why a request ended unjudged; a fixed set, so every rank reports the same metric keys.
FAILURE_CAUSES = ("timeout", "connection", "rate_limited", "server_error", "rejected", "invalid_reply",
                  "no_label", "exception", "other")   # exception: a python judge's function raised


@dataclass
class Unjudged:
    """What a judge's inner `run` returns instead of a verdict when a request failed (see judge_cached)."""
    cause: str                     # one of FAILURE_CAUSES
    detail: str = ""               # the last error, for the summarised warning (never holds a secret)


class Usage:
    """What an LLM judge endpoint was sent and billed, from each reply's `usage` object (thread-safe).

    requests: HTTP requests sent (each retry is one); prompt_tokens / completion_tokens: summed over the
    replies that carried a `usage` object ({"prompt_tokens": int, "completion_tokens": int}; reasoning
    tokens are part of completion_tokens); unknown: replies (HTTP 2xx) without one, so their tokens are
    in neither count. Error replies (429, 5xx) and timeouts bill nothing and count only in requests."""

    FIELDS = ("requests", "prompt_tokens", "completion_tokens", "usage_unknown")

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.prompt_tokens = self.completion_tokens = self.usage_unknown = 0

    def add_request(self) -> None:
        with self._lock:
            self.requests += 1

    def add_reply(self, usage) -> None:
        """Count one 2xx reply's `usage` (the parsed object, or None when the reply had none)."""
        try:
            prompt, completion = int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0)
        except (TypeError, KeyError, ValueError, AttributeError):
            prompt = completion = None
        with self._lock:
            if prompt is None:
                self.usage_unknown += 1
            else:
                self.prompt_tokens += prompt
                self.completion_tokens += completion

    def as_dict(self) -> dict:
        with self._lock:
            return {f: getattr(self, f) for f in self.FIELDS}


@dataclass
class JudgeStats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0              # requests that ended unjudged (None)
    causes: dict = field(default_factory=lambda: dict.fromkeys(FAILURE_CAUSES, 0))   # failures by cause
    last_error: str = ""           # detail of the latest failure
    usage: Usage = field(default_factory=Usage)   # HTTP requests sent and tokens billed (LLM judges)

    def add_failure(self, cause: str, detail: str = "") -> None:
        self.failures += 1
        cause = cause if cause in FAILURE_CAUSES else "other"
        self.causes[cause] = self.causes.get(cause, 0) + 1
        if detail:
            self.last_error = detail

    def as_dict(self) -> dict:
        """The four counters (requests, cache_hits, retries, failures); causes are in `causes`."""
        return {"requests": self.requests, "cache_hits": self.cache_hits, "retries": self.retries,
                "failures": self.failures}


def format_causes(causes: dict) -> str:
    """'connection 40, timeout 3' (non-zero counts, largest first)."""
    items = sorted(((c, n) for c, n in causes.items() if n), key=lambda x: (-x[1], x[0]))
    return ", ".join(f"{c} {int(n) if float(n).is_integer() else round(n, 2)}" for c, n in items) or "none"


class StepJudge(Protocol):
    stats: JudgeStats

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = unjudged after retries (never scored)."""
        ...
