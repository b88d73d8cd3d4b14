"""Process reward: the share of reasoning steps the step judge found valid (alignment or contribution)."""
from __future__ import annotations

from mrpo.judges.base import StepVerdict


def process_reward(verdict: StepVerdict | None) -> float | None:
    """Valid steps / K in [0, 1]; 0.0 for K = 0; None when unjudged (the caller excludes it, never 0)."""
    if verdict is None:
        return None
    if len(verdict.alignment) != len(verdict.contribution):
        raise ValueError(f"process_reward: verdict has {len(verdict.alignment)} alignment labels but "
                         f"{len(verdict.contribution)} contribution labels")
    valid = verdict.valid
    return sum(valid) / len(valid) if valid else 0.0
