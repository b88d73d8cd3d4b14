"""Step judge reading precomputed labels (e.g. produced offline by a large judge, or by annotators).

cfg.labels_path: JSONL, one object per line:
    {"id": str, "steps": [str, ...], "alignment": [0|1, ...], "contribution": [0|1, ...]}
A request matches a row by sample id and the exact list of steps (hashed). A request with no matching
row is unjudged (None) and counted in stats.failures; a malformed row raises ValueError naming the file
and the line.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Sequence

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict, Unjudged
from mrpo.judges.cache import judge_cached

log = logging.getLogger(__name__)


def steps_hash(steps: Sequence[str]) -> str:
    """sha256 of the JSON list of steps (the match key beside the sample id)."""
    return hashlib.sha256(json.dumps(list(steps), ensure_ascii=False).encode("utf-8")).hexdigest()


def _row_verdict(row: object, where: str) -> tuple[tuple[str, str], StepVerdict]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("id", "steps", "alignment", "contribution") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    steps = row["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"{where}: 'steps' must be a list of strings")
    labels = {}
    for name in ("alignment", "contribution"):
        v = row[name]
        if not isinstance(v, list) or len(v) != len(steps):
            raise ValueError(f"{where}: '{name}' must be a list of {len(steps)} labels (one per step)")
        if not all(isinstance(x, (int, bool)) and x in (0, 1) for x in v):
            raise ValueError(f"{where}: '{name}' labels must be 0 or 1, got {v}")
        labels[name] = [int(x) for x in v]
    return (str(row["id"]), steps_hash(steps)), StepVerdict(**labels)


class LabelsJudge:
    def __init__(self, cfg):
        if not cfg.labels_path:
            raise ValueError("LabelsJudge: judge.labels_path is not set")
        self.path = str(cfg.labels_path)
        self.stats = JudgeStats()
        self.labels: dict[tuple[str, str], StepVerdict] = {}
        try:
            f = open(self.path, encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"LabelsJudge: labels file not found: {self.path}") from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
                key, verdict = _row_verdict(row, where)
                old = self.labels.get(key)
                if old is not None and old != verdict:
                    raise ValueError(f"{where}: sample {key[0]!r} has conflicting labels for the same steps")
                self.labels[key] = verdict
        log.info("LabelsJudge: %d labelled completions from %s", len(self.labels), self.path)

    def __repr__(self) -> str:
        return f"LabelsJudge(path={self.path!r}, rows={len(self.labels)})"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """Verdicts looked up by (sample id, steps); None (counted) when no row matches."""
        def run(todo: list[JudgeRequest]) -> list[StepVerdict | None]:
            out = [self.labels.get((r.sample_id, steps_hash(r.steps))) or
                   Unjudged("no_label", f"sample {r.sample_id}: no row with these steps in {self.path}") for r in todo]
            missing = sum(isinstance(v, Unjudged) for v in out)
            if missing:
                log.warning("LabelsJudge: %d of %d requests have no labels in %s", missing, len(out), self.path)
            return out

        return judge_cached(list(requests), None, "labels", self.stats, run)
