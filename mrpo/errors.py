"""The error types users see: the ground floor of the package (imports nothing from mrpo).

A `UserInputError` is a failure caused by the user's input (a config key, a data or model file, a
checkpoint), not by our code: mrpo.train prints its one-line message (naming the file, key or row, and the
fix) and exits 2, without a traceback. Modules raise these kinds; they never import config.py for them.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """A failure caused by the user's input; the message names the file, key or row and the fix."""


class ConfigError(UserInputError):
    """A bad configuration value; the message names the key and where it came from."""


class CheckpointError(UserInputError):
    """An explicitly requested checkpoint (checkpoint.resume=PATH) is missing or broken; names the file."""


class LoraError(UserInputError):
    """A LoRA setting that cannot work with this model; the message names the `lora.*` key."""


class PlanDoesNotFit(UserInputError):
    """The memory plan's peak exceeds device memory (mrpo.train exits 2 with this message)."""


class JudgeBudgetError(RuntimeError):
    """The step judge's spend would pass judge.max_cost_usd (mrpo.judges.spend): the trainer saves a
    checkpoint and mrpo.train exits 4; a rerun with a higher budget resumes. The message names the key
    and the spend so far."""

    def __init__(self, message: str, spent_usd: float):
        super().__init__(message)
        self.spent_usd = spent_usd
