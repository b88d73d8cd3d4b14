"""Bound on unjudged samples during training: a judge outage stops the run instead of training on.

While the judge fails, every completion keeps only its outcome reward (process reward and MRPO shaping
are left out), so the run silently turns into plain GRPO. UnjudgedGuard watches the share of the
completions sent to the judge that came back unjudged over the last `window` RL steps and raises
JudgeOutageError once it exceeds `max_fraction`; the trainer saves a checkpoint and stops.

    guard = UnjudgedGuard.from_config(cfg.judge)          # judge.max_unjudged_fraction, judge.unjudged_window
    guard.update_from_metrics(step, metrics)              # after each RL step, with the all-reduced metrics

Fed with metrics averaged over ranks, every rank sees the same numbers and raises at the same step.
"""
from __future__ import annotations

from collections import deque

from mrpo.judges.base import FAILURE_CAUSES, format_causes


class JudgeOutageError(RuntimeError):
    """Too many unjudged completions; the message names the share, the steps, the causes and the keys."""

    def __init__(self, message: str, fraction: float, causes: dict):
        super().__init__(message)
        self.fraction = fraction
        self.causes = causes


class UnjudgedGuard:
    """max_fraction: share in [0, 1] of unjudged completions over the window above which update()
    raises (1.0 never raises). window: RL steps the share is measured over; nothing is raised before
    `window` steps with judge requests have been seen. judge: shown in the error (e.g. the judge's repr)."""

    def __init__(self, max_fraction: float = 0.5, window: int = 5, judge: str = ""):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"UnjudgedGuard: max_fraction={max_fraction} must be in [0, 1]")
        if window < 1:
            raise ValueError(f"UnjudgedGuard: window={window} must be >= 1 step")
        self.max_fraction, self.window, self.judge = float(max_fraction), int(window), judge
        self.history: deque[tuple[int, float, float, dict]] = deque(maxlen=self.window)

    @classmethod
    def from_config(cls, judge_cfg, judge: object = None) -> "UnjudgedGuard":
        return cls(judge_cfg.max_unjudged_fraction, judge_cfg.unjudged_window,
                   repr(judge) if judge is not None else f"judge.kind={judge_cfg.kind}")

    def fraction(self) -> float | None:
        """Unjudged share over the window; None before the window is full."""
        if len(self.history) < self.window:
            return None
        sent = sum(h[1] for h in self.history)
        return sum(h[2] for h in self.history) / sent if sent > 0 else 0.0

    def update(self, step: int, sent: float, unjudged: float, causes: dict | None = None) -> float | None:
        """Record one RL step (completions sent to the judge, how many came back unjudged, unjudged
        counts by cause); raise JudgeOutageError when the window's share exceeds max_fraction.
        Steps that sent nothing (no judge, or every completion without steps) are not counted.
        Returns the window's share (None before the window is full)."""
        if sent <= 0:
            return self.fraction()
        self.history.append((step, float(sent), float(unjudged), dict(causes or {})))
        frac = self.fraction()
        if frac is not None and frac > self.max_fraction:
            total: dict = {}
            for h in self.history:
                for c, n in h[3].items():
                    total[c] = total.get(c, 0) + n
            first, last = self.history[0][0], self.history[-1][0]
            sent_sum = sum(h[1] for h in self.history)
            raise JudgeOutageError(
                f"judge outage: {frac:.0%} of the {sent_sum:g} completions sent to the judge over steps "
                f"{first}-{last} came back unjudged (causes: {format_causes(total)}), more than "
                f"judge.max_unjudged_fraction={self.max_fraction:g} over judge.unjudged_window={self.window} steps. "
                f"Judge: {self.judge}. Unjudged samples get no process reward and no MRPO shaping, so the run "
                f"stopped instead of training on. Fix the judge (endpoint, key, quota), then rerun the same "
                f"command to resume from the checkpoint; or raise judge.max_unjudged_fraction (1.0 = never stop).",
                frac, total)
        return frac

    def update_from_metrics(self, step: int, metrics: dict) -> float | None:
        """update() from a step's metrics: judge_sent, unjudged and unjudged/<cause>
        (mrpo.rewards.judge_metrics), per-rank means or sums alike (the share is a ratio)."""
        causes = {c: metrics.get(f"unjudged/{c}", 0.0) for c in FAILURE_CAUSES}
        return self.update(step, metrics.get("judge_sent", 0.0), metrics.get("unjudged", 0.0), causes)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)


__all__ = ["JudgeOutageError", "UnjudgedGuard"]
