"""What the LLM judge costs during training, and a budget that stops the run before it is passed.

    spend = JudgeSpend.from_config(cfg.judge)   # judge.price_input_per_mtok, price_output_per_mtok, max_cost_usd
    spend.check()                               # before the first step of a (resumed) run; may raise
    metrics = spend.account(metrics)            # after each RL step, with the all-reduced metrics
    spend.check()                               # after the step is logged (the trainer saves, then re-raises)
    bar.set_postfix(..., **spend.postfix())     # "judge $1.23" on the console when a price is set

Prices are USD per million tokens (0 and 0 = cost not shown). The step's usage comes from
mrpo.rewards.judge_metrics (judge/requests, judge/cache_hits, judge/prompt_tokens,
judge/completion_tokens, judge/usage_unknown: per-rank counts, summed over ranks by the step's all-reduce,
USAGE_KEYS); account() adds judge/cost_usd (the step) and judge/cost_usd_total
(the run so far, kept in the checkpoint's trainer state). Replies without a `usage` object cost an
unknown amount: they are counted (judge/usage_unknown, one warning) and left out of the cost.

The budget (judge.max_cost_usd, 0 = none): after each step, and before the first step of a resumed
run, the next step's cost is estimated as the largest of the last `window` steps' costs; when the spend
so far plus that estimate would pass the budget, JudgeBudgetError is raised (the trainer saves a
checkpoint first; mrpo.train exits 4). A rerun with a higher budget resumes and goes on. Every rank
sees the same all-reduced numbers, so every rank raises at the same step.
"""
from __future__ import annotations

import logging
from collections import deque

from mrpo.errors import JudgeBudgetError
from mrpo.judges.base import Usage
from mrpo.judges.outage import JudgeOutageError

log = logging.getLogger(__name__)

USAGE_KEYS = tuple(f"judge/{k}" for k in (*Usage.FIELDS, "cache_hits"))
JUDGE_STOPS = (JudgeOutageError, JudgeBudgetError)   # the judge stops after which the trainer saves and exits 4


def cost_usd(prompt_tokens: float, completion_tokens: float, price_input_per_mtok: float,
             price_output_per_mtok: float) -> float:
    """USD for the tokens at the prices (USD per million tokens)."""
    return (prompt_tokens * price_input_per_mtok + completion_tokens * price_output_per_mtok) / 1e6


def usage_report(usage: dict, price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0) -> dict:
    """A Usage.as_dict() (or a difference of two) with cost_usd added when a price is set (evaluation reports)."""
    out = dict(usage)
    if price_input_per_mtok or price_output_per_mtok:
        out["cost_usd"] = cost_usd(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                   price_input_per_mtok, price_output_per_mtok)
    return out


def usage_since(judge, before: dict | None = None) -> dict | None:
    """A step judge's Usage counts since `before` (an earlier return of this function; None = since it
    was built), with cost_usd when its config has prices; None for a judge without usage."""
    usage = getattr(getattr(judge, "stats", None), "usage", None)
    if usage is None:
        return None
    delta = {k: v - (before or {}).get(k, 0) for k, v in usage.as_dict().items()}
    cfg = getattr(judge, "cfg", None)
    return usage_report(delta, getattr(cfg, "price_input_per_mtok", 0.0) or 0.0,
                        getattr(cfg, "price_output_per_mtok", 0.0) or 0.0)


class JudgeSpend:
    """Running judge cost of a training run and its budget (see the module docstring).

    price_input_per_mtok / price_output_per_mtok: USD per million prompt / completion tokens.
    max_cost_usd: budget in USD (0 = none). window: recent steps the next step's cost is estimated from."""

    def __init__(self, price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0,
                 max_cost_usd: float = 0.0, window: int = 5):
        self.price_in, self.price_out = float(price_input_per_mtok), float(price_output_per_mtok)
        self.max_cost_usd = float(max_cost_usd)
        self.total_usd = 0.0
        self.recent: deque[float] = deque(maxlen=window)   # cost of each of the last steps (USD)
        self.steps = 0                                      # RL steps counted
        self._warned_unknown = False

    @classmethod
    def from_config(cls, judge_cfg) -> "JudgeSpend":
        return cls(judge_cfg.price_input_per_mtok, judge_cfg.price_output_per_mtok, judge_cfg.max_cost_usd)

    @property
    def priced(self) -> bool:
        return self.price_in > 0 or self.price_out > 0

    def estimate_next_usd(self) -> float:
        """The next step's cost as the largest of the recent steps' (0 before any step)."""
        return max(self.recent, default=0.0)

    def account(self, metrics: dict) -> dict:
        """Add the step's judge cost and the running total (when priced) to the step's metrics, whose
        USAGE_KEYS the trainer's all-reduce has already summed over ranks. Returns metrics (updated in place)."""
        step_usd = cost_usd(metrics.get("judge/prompt_tokens", 0.0), metrics.get("judge/completion_tokens", 0.0),
                            self.price_in, self.price_out)
        self.total_usd += step_usd
        self.recent.append(step_usd)
        self.steps += 1
        if self.priced:
            metrics["judge/cost_usd"] = step_usd
            metrics["judge/cost_usd_total"] = self.total_usd
        if metrics.get("judge/usage_unknown", 0) > 0 and not self._warned_unknown and self.priced:
            self._warned_unknown = True
            log.warning("judge: %d replies this step carried no `usage` object; their tokens are not in "
                        "judge/prompt_tokens, judge/completion_tokens or the cost (judge/usage_unknown counts them)",
                        int(metrics["judge/usage_unknown"]))
        return metrics

    def check(self) -> None:
        """Raise JudgeBudgetError when the spend so far plus the next step's estimate would pass the budget."""
        if not self.max_cost_usd:
            return
        nxt = self.estimate_next_usd()
        if self.total_usd + nxt > self.max_cost_usd or self.total_usd >= self.max_cost_usd:
            raise JudgeBudgetError(
                f"judge budget: the step judge has cost ${self.total_usd:.4f} so far and the next step could cost "
                f"about ${nxt:.4f} (the largest of the last {len(self.recent)} steps), which would pass "
                f"judge.max_cost_usd={self.max_cost_usd:g}; a checkpoint is saved: rerun the same command with a "
                f"higher judge.max_cost_usd to go on", self.total_usd)

    def postfix(self) -> dict:
        """Progress-bar fields: judge=$<total> when a price is set, else none."""
        return {"judge": f"${self.total_usd:.2f}"} if self.priced else {}

    def state_dict(self) -> dict:
        return {"total_usd": self.total_usd, "recent": list(self.recent), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_usd = float(state.get("total_usd", 0.0))
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.recent.maxlen)
        self.steps = int(state.get("steps", 0))


__all__ = ["JUDGE_STOPS", "JudgeSpend", "USAGE_KEYS", "cost_usd", "usage_report", "usage_since"]
