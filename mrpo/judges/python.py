"""Step judge as your own Python function: judge.kind=python, judge.function="pkg.module:fn".

    def my_judge(steps, question, images, gold_reasoning, **extra): ...

Called once per completion with keyword arguments: steps (list[str], K >= 1), question (str), images
(list of image paths, [] for text-only), gold_reasoning (str, "" when unknown) and, as extra, gold_answer,
sample_id and facts (the record's ground-truth facts or None). A function without **kwargs receives
only the arguments it names. It returns one of
    {"alignment": [0|1] * K, "contribution": [0|1] * K}     the paper's two labels per step
    {"valid": [bool] * K}  or a plain list of K bools/0/1   validity only (stored as alignment =
                                                            contribution = valid: same validity, same
                                                            process reward)
    a StepVerdict, or None (declines: unjudged, cause "no_label").
A call that raises is unjudged with cause "exception", a reply of another shape or length with cause
"invalid_reply": never a silent 0, and counted like an HTTP judge's failures (judge_metrics, the
outage guard judge.max_unjudged_fraction). Plain functions run one request after the other; `async
def` ones run concurrently, at most judge.max_concurrency at once, on one event loop kept for the run.

Verdicts are cached like the other judges' (judge.cache_dir): the key holds "python:<function>" and a
hash of the function's source code, so editing the function invalidates its entries (edits to helpers
it calls do not: clear the cache folder then).
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from typing import Callable, Sequence

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict, Unjudged, format_causes
from mrpo.judges.cache import JudgeCache, judge_cached
from mrpo.plugins import EventLoopThread, KeywordCall, is_async, load_function

log = logging.getLogger(__name__)

ARGUMENTS = ("steps", "question", "images", "gold_reasoning", "gold_answer", "sample_id", "facts")


def load_judge_function(spec: str) -> KeywordCall:
    """The judge function of judge.function wrapped for keyword calls; PluginError naming judge.function."""
    return KeywordCall(load_function(spec, "judge.function"), ARGUMENTS, "judge.function", spec)


def _labels(values, name: str, k: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"'{name}' is a {type(values).__name__}, expected a list of {k} labels")
    values = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(values) != k:
        raise ValueError(f"'{name}' has {len(values)} labels for {k} steps")
    if not all(v in (0, 1) and not isinstance(v, (str, bytes)) for v in values):
        raise ValueError(f"'{name}' labels must be 0/1 or bools, got {values[:8]}")
    return [int(v) for v in values]


def to_verdict(reply, k: int) -> StepVerdict | None:
    """A judge function's reply as a StepVerdict for k steps (None = declined); ValueError when unusable."""
    if reply is None:
        return None
    if isinstance(reply, StepVerdict):
        return StepVerdict(_labels(reply.alignment, "alignment", k), _labels(reply.contribution, "contribution", k))
    if isinstance(reply, dict):
        if "alignment" in reply or "contribution" in reply:
            missing = [n for n in ("alignment", "contribution") if n not in reply]
            if missing:
                raise ValueError(f"reply has no '{missing[0]}' list (give both, or 'valid')")
            return StepVerdict(_labels(reply["alignment"], "alignment", k),
                               _labels(reply["contribution"], "contribution", k))
        if "valid" in reply:
            valid = _labels(reply["valid"], "valid", k)
            return StepVerdict(valid, list(valid))
        raise ValueError(f"reply has keys {sorted(reply)[:5]}, expected alignment + contribution, or valid")
    valid = _labels(reply, "reply", k)
    return StepVerdict(valid, list(valid))


def _source_hash(fn: Callable) -> str:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):   # no source (builtin, C extension, interactive): the name only
        source = ""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


class PythonJudge:
    """cfg (JudgeConfig): function ("pkg.module:fn"), cache_dir (None = no cache), max_concurrency
    (async functions: requests in flight at once)."""

    def __init__(self, cfg):
        self.spec = cfg.function
        self.call = load_judge_function(self.spec)
        self.is_async = is_async(self.call.fn)
        self.max_concurrency = max(1, int(getattr(cfg, "max_concurrency", 1)))
        self.model = f"python:{self.spec}"
        self.version = f"python-judge-source-{_source_hash(self.call.fn)}"
        self.cache = JudgeCache(cfg.cache_dir) if getattr(cfg, "cache_dir", None) else None
        self.stats = JudgeStats()
        self._loop = EventLoopThread("mrpo-python-judge")

    def __repr__(self) -> str:
        return f"PythonJudge(function={self.spec!r})"

    @staticmethod
    def _arguments(req: JudgeRequest) -> dict:
        return {"steps": list(req.steps), "question": req.problem, "images": req.image_paths,
                "gold_reasoning": req.gold_reasoning, "gold_answer": req.gold_answer, "sample_id": req.sample_id,
                "facts": req.facts}

    @staticmethod
    def _outcome(req: JudgeRequest, reply=None, error: Exception | None = None) -> StepVerdict | Unjudged:
        if error is not None:
            return Unjudged("exception", f"sample {req.sample_id}: raised {type(error).__name__}: "
                                         f"{' '.join(str(error).split())}")
        try:
            verdict = to_verdict(reply, len(req.steps))
        except ValueError as e:
            return Unjudged("invalid_reply", f"sample {req.sample_id}: {e}")
        return Unjudged("no_label", f"sample {req.sample_id}: the function returned None") if verdict is None else verdict

    def _run(self, todo: list[JudgeRequest]) -> list[StepVerdict | Unjudged]:
        if self.is_async:
            return self._loop.run(self._run_async(todo))
        out = []
        for req in todo:
            try:
                reply = self.call(**self._arguments(req))
                if inspect.isawaitable(reply):
                    reply = self._loop.run(reply)
            except Exception as e:
                out.append(self._outcome(req, error=e))
                continue
            out.append(self._outcome(req, reply))
        return out

    async def _run_async(self, todo: list[JudgeRequest]) -> list[StepVerdict | Unjudged]:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(req: JudgeRequest):
            async with limit:
                try:
                    return self._outcome(req, await self.call(**self._arguments(req)))
                except Exception as e:
                    return self._outcome(req, error=e)

        return list(await asyncio.gather(*(one(r) for r in todo)))

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = unjudged (raised, declined or unusable reply)."""
        before, before_causes = self.stats.failures, dict(self.stats.causes)
        out = judge_cached(list(requests), self.cache, self.model, self.stats, self._run, self.version)
        failed = self.stats.failures - before
        if failed:
            causes = {c: n - before_causes.get(c, 0) for c, n in self.stats.causes.items()}
            log.warning("PythonJudge %s: %d of %d requests unjudged (%s); last error: %s", self.spec, failed,
                        len(out), format_causes(causes), self.stats.last_error)
        return out


__all__ = ["PythonJudge", "load_judge_function", "to_verdict"]
