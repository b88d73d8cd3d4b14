"""A research option: a step judge that is wrong part of the time (judge.noise_flip_rate).

NoisyJudge wraps any judge and flips each step verdict (valid <-> invalid) with probability `rate`. A
flipped valid step becomes alignment = contribution = 0; a flipped invalid step becomes alignment =
contribution = 1. Whether step k of a request flips is a pure function of (judge.noise_seed, sample id,
the steps' text, k) through a keyed hash: the same completion always gets the same verdicts (like a
temperature-0 judge with a blind spot), a resumed run sees the flips it saw before, and ranks agree.
Unjudged requests (None) stay unjudged. It is a training-time option: evaluation (FFP, FAR) uses the
clean inner judge (`NoisyJudge.clean`), so the study measures what the noisy training signal did.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from mrpo.judges.base import JudgeRequest, StepVerdict


def flip_uniform(seed: int, sample_id: str, steps: Sequence[str], k: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample_id, steps, k)."""
    h = hashlib.blake2b(digest_size=8, key=str(int(seed)).encode())
    h.update(sample_id.encode())
    for s in steps:
        h.update(b"\x1f" + s.encode())
    h.update(b"\x1e" + str(k).encode())
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


class NoisyJudge:
    """Flip a `rate` share of the inner judge's step verdicts, seeded (see the module docstring)."""

    def __init__(self, inner, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"judge.noise_flip_rate must be a share in [0, 1], got {rate}")
        self.clean, self.rate, self.seed = inner, float(rate), int(seed)
        self.flipped = 0            # step verdicts flipped so far
        self.seen = 0               # step verdicts passed through so far

    @property
    def stats(self):
        return self.clean.stats

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        out = []
        for req, v in zip(requests, self.clean.judge(requests)):
            if v is None:
                out.append(None)
                continue
            valid = v.valid
            flips = [flip_uniform(self.seed, req.sample_id, req.steps, k) < self.rate for k in range(len(valid))]
            self.seen += len(valid)
            self.flipped += sum(flips)
            if not any(flips):
                out.append(v)
                continue
            align = [int(not ok) if f else a for ok, f, a in zip(valid, flips, v.alignment)]
            contrib = [int(not ok) if f else c for ok, f, c in zip(valid, flips, v.contribution)]
            out.append(StepVerdict(alignment=align, contribution=contrib))
        return out


def clean_judge(judge):
    """The judge evaluation should use: the inner judge of a NoisyJudge, else the judge itself."""
    return getattr(judge, "clean", judge)
