"""Custom rewards: user functions named in reward.custom, each its own reward column.

    reward:
      custom:
        - {name: brevity, function: "myrewards:brevity", weight: 0.5}

Calling convention (keyword arguments, modelled on TRL's `reward_funcs`), one call per reward and
batch of n completions, every argument a list of length n in completion order:
    prompts      the records' question text ("problem")
    completions  the decoded completion text, without the tokenizer's special tokens (EOS, pad, chat end)
    answers      the extracted answer (text inside <answer>...</answer>), None when absent
    steps        the reasoning steps, a list of str per completion
    **columns    every key of the data records (id, image, solution, gold_reasoning, facts, dataset,
                 answer_type, ...), one value per completion (None where a record lacks the key)
A function without **kwargs receives only the arguments it names (mrpo.plugins.KeywordCall).
It returns n values: a finite float, or None = "not applicable" (a missing value, never a 0). Missing values are imputed by the advantage computation like an unjudged process reward.

Execution: `async def` rewards run concurrently with each other (asyncio.gather on one event loop that
lives for the whole run, so clients bound to it can be reused across steps) while the plain ones run
one after the other in the calling thread (the trainer's judge thread).

Failures never stop the run: a call that raises, returns a result of the wrong length, or a value that
is neither a finite number nor None (NaN and infinities are invalid values) loses all n values of that call (missing), is counted
per cause in CUSTOM_FAILURE_CAUSES, and is logged in one WARNING per batch naming the reward, the cause
and the error.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from mrpo.plugins import EventLoopThread, KeywordCall, is_async, load_function

log = logging.getLogger(__name__)

# Why a custom reward call lost its values; a fixed set, so every rank logs the same metric keys.
CUSTOM_FAILURE_CAUSES = ("exception", "wrong_length", "invalid_value")
FIXED_ARGUMENTS = ("prompts", "completions", "answers", "steps")


class CustomRewardFailure(Exception):
    """One call's result is unusable; cause in CUSTOM_FAILURE_CAUSES."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause, self.detail = cause, detail


@dataclass
class CustomReward:
    name: str                  # column and metric name: reward/<name>
    function: str              # "pkg.module:fn" as configured
    weight: float
    call: Callable             # KeywordCall around the user function
    is_async: bool

    @classmethod
    def from_config(cls, item: dict, index: int) -> "CustomReward":
        """item: a normalised reward.custom entry {name, function, weight}; PluginError if the function
        cannot be loaded."""
        key = f"reward.custom[{index}].function"
        fn = load_function(item["function"], key)
        return cls(item["name"], item["function"], float(item["weight"]), KeywordCall(fn, None, key, item["function"]),
                   is_async(fn))


def _values(out, n: int) -> list[float | None]:
    """A call's result as n floats or None; CustomRewardFailure when unusable."""
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):   # torch / numpy arrays
        out = out.tolist()
    if isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise CustomRewardFailure("invalid_value", f"returned a {type(out).__name__}, expected a list of "
                                                   f"{n} floats or None")
    if len(out) != n:
        raise CustomRewardFailure("wrong_length", f"returned {len(out)} values for {n} completions")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise CustomRewardFailure("invalid_value", f"value {i} is {v!r} ({type(v).__name__}), expected a float "
                                                       f"or None")
        v = float(v)
        if not math.isfinite(v):   # not a silent "missing": a NaN is usually a bug in the reward (README)
            raise CustomRewardFailure("invalid_value", f"value {i} is {v} (return None for not applicable)")
        values.append(v)
    return values


class CustomRewards:
    """The configured custom rewards (weight != 0), called on each batch.

    rewards: CustomReward list in config order."""

    def __init__(self, rewards: Sequence[CustomReward]):
        self.rewards = list(rewards)
        self._loop = EventLoopThread("mrpo-custom-rewards")

    @classmethod
    def from_config(cls, items: Sequence[dict]) -> "CustomRewards":
        """From reward.custom (normalised by mrpo.config); rewards with weight 0 are left out."""
        return cls([CustomReward.from_config(item, i) for i, item in enumerate(items) if float(item["weight"]) != 0])

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def __bool__(self) -> bool:
        return bool(self.rewards)

    @staticmethod
    def arguments(completions: list[str], answers: list[str | None], steps: list[list[str]],
                  records: list[dict]) -> dict:
        """The keyword arguments of a call: the fixed ones and every record column, each a list of n."""
        columns: dict[str, list] = {}
        for rec in records:
            for k in rec:
                columns.setdefault(k, None)
        kwargs = {k: [rec.get(k) for rec in records] for k in columns if k not in FIXED_ARGUMENTS}
        kwargs.update(prompts=[rec.get("problem") for rec in records], completions=list(completions),
                      answers=list(answers), steps=[list(s) for s in steps])
        return kwargs

    def score(self, completions: list[str], answers: list[str | None], steps: list[list[str]],
              records: list[dict]) -> tuple[dict[str, list[float | None]], dict[str, dict[str, int]]]:
        """Every reward's n values (None = missing) and, per reward, the completions whose values a failed
        call lost, by cause ({name: {cause: count}} with every cause of CUSTOM_FAILURE_CAUSES)."""
        n = len(completions)
        kwargs = self.arguments(completions, answers, steps, records)
        values: dict[str, list[float | None]] = {}
        failed: dict[str, dict[str, int]] = {r.name: dict.fromkeys(CUSTOM_FAILURE_CAUSES, 0) for r in self.rewards}
        errors: list[str] = []

        def record(reward: CustomReward, result=None, error: BaseException | None = None) -> None:
            try:
                if error is not None:
                    raise CustomRewardFailure("exception", f"raised {type(error).__name__}: {' '.join(str(error).split())}")
                values[reward.name] = _values(result, n)
            except CustomRewardFailure as f:
                values[reward.name] = [None] * n
                failed[reward.name][f.cause] += n
                errors.append(f"'{reward.name}' ({reward.function}) {f.cause}: {f.detail}")

        async def call_async(reward: CustomReward):
            return await reward.call(**kwargs)

        async def gather():
            return await asyncio.gather(*(call_async(r) for r in self.rewards if r.is_async), return_exceptions=True)

        pending = self._loop.submit(gather()) if any(r.is_async for r in self.rewards) else None
        for reward in self.rewards:           # plain functions in order, while the async ones run
            if reward.is_async:
                continue
            try:
                out = reward.call(**kwargs)
                if inspect.isawaitable(out):   # e.g. a plain function returning a coroutine
                    out = self._loop.run(out)
            except Exception as e:
                record(reward, error=e)
                continue
            record(reward, out)
        if pending is not None:
            for reward, out in zip([r for r in self.rewards if r.is_async], pending.result()):
                if isinstance(out, BaseException) and not isinstance(out, Exception):
                    raise out                  # KeyboardInterrupt, SystemExit: not the reward's failure
                if isinstance(out, Exception):
                    record(reward, error=out)
                else:
                    record(reward, out)
        if errors:
            log.warning("custom rewards: %d of %d calls failed on %d completions, their values are missing: %s",
                        len(errors), len(self.rewards), n, "; ".join(errors))
        return {r.name: values[r.name] for r in self.rewards}, failed


__all__ = ["CUSTOM_FAILURE_CAUSES", "CustomReward", "CustomRewards"]
