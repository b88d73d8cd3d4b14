"""On-disk cache of step verdicts, so reruns and resumes do not pay a judge twice.

Key: sha256 of (judge model name, prompt version, problem, sha256 of each image file's bytes, gold
answer, gold rationale, steps). The sample id, API keys and URLs are not part of it. One JSON file per
entry, sharded by the key's first two hex digits: <cache_dir>/ab/ab12...ef.json; writes are atomic
(temporary file + os.replace), so concurrent writers and crashes never leave a torn file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from mrpo.judges.base import JudgeRequest, StepVerdict, Unjudged
from mrpo.judges.prompt import PROMPT_VERSION

log = logging.getLogger(__name__)


class JudgeCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._image_hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def _image_hash(self, path: str | None, sample_id: str) -> str:
        if not path:
            return ""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"judge cache: image of sample {sample_id!r} not found: {path}") from None
        memo = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            h = self._image_hashes.get(memo)
        if h is None:
            h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            with self._lock:
                self._image_hashes[memo] = h
        return h

    def key(self, model: str, req: JudgeRequest, prompt_version: str = PROMPT_VERSION) -> str:
        """Hex sha256 of the judge's inputs (see module docstring)."""
        hashes = [self._image_hash(p, req.sample_id) for p in req.image_paths]
        # one image keeps the key of the single-image format, so existing caches stay valid
        images = hashes[0] if len(hashes) == 1 else hashes if hashes else ""
        material = [model, prompt_version, req.problem, images,
                    req.gold_answer, req.gold_reasoning, list(req.steps)]
        return hashlib.sha256(json.dumps(material, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> StepVerdict | None:
        """The cached verdict, or None on a miss (an unreadable entry counts as a miss and is logged)."""
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return StepVerdict(alignment=[int(x) for x in data["alignment"]],
                               contribution=[int(x) for x in data["contribution"]])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("judge cache: ignoring unreadable entry %s (%s)", path, e)
            return None

    def put(self, key: str, verdict: StepVerdict) -> None:
        """Store a verdict atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"alignment": list(verdict.alignment), "contribution": list(verdict.contribution)})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def judge_cached(requests, cache: JudgeCache | None, model: str, stats, run,
                 prompt_version: str = PROMPT_VERSION) -> list[StepVerdict | None]:
    """The common judge loop: K = 0 -> empty verdict (no call), cache hits, `run` on the misses.

    run: callable(list[JudgeRequest]) -> list[StepVerdict | Unjudged | None] (Unjudged(cause) or None =
    failed after retries; None counts as cause "other"). prompt_version: part of the cache key (the
    judge's JudgePrompt.version; for a python judge, its function's). Updates stats (requests, cache_hits, failures
    and their causes) and stores new verdicts in the cache. Failed requests come back as None.
    """
    results: list[StepVerdict | None] = [None] * len(requests)
    keys: list[str | None] = [None] * len(requests)
    todo: list[int] = []
    stats.requests += len(requests)
    for i, req in enumerate(requests):
        if not req.steps:
            results[i] = StepVerdict(alignment=[], contribution=[])
            continue
        if cache is not None:
            keys[i] = cache.key(model, req, prompt_version)
            hit = cache.get(keys[i])
            if hit is not None and len(hit.alignment) == len(req.steps):
                results[i] = hit
                stats.cache_hits += 1
                continue
        todo.append(i)
    if todo:
        for i, verdict in zip(todo, run([requests[i] for i in todo])):
            if verdict is None or isinstance(verdict, Unjudged):
                failed = verdict or Unjudged("other")
                stats.add_failure(failed.cause, failed.detail)
                continue
            results[i] = verdict
            if cache is not None:
                cache.put(keys[i], verdict)
    return results
