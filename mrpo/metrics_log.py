"""Metrics of a run: OUTPUT/metrics.jsonl (every row), tensorboard and Weights & Biases (RL-step rows).

    logger = MetricsLogger(out_dir, cfg, is_main=rank == 0)
    logger.truncate_after(step, sft_done)      # on resume, before anything is logged
    logger.log({"step": 3, "loss": 0.1, ...})  # RL step: all three sinks; rows with "phase" (sft, eval)
    logger.close()                              #   go to metrics.jsonl only

Identity: run name = logging.run_name or the output folder's name, used as the W&B run name and the
tensorboard folder (OUTPUT/tensorboard/<run name>/). The W&B run id is stored in OUTPUT/wandb_run_id, so
a resumed run continues the same W&B run (wandb.init(id=..., resume="allow")).
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger("mrpo")

WANDB_ID_FILE = "wandb_run_id"


def _drop(row: dict, step: int, sft_done: bool, sft_step: int) -> bool:
    """Whether a metrics row will be written again by a run resumed at `step` (see truncate_after)."""
    phase = row.get("phase")
    if phase == "sft":
        return not sft_done and isinstance(row.get("sft_step"), (int, float)) and row["sft_step"] >= sft_step
    s = row.get("step")
    if not isinstance(s, (int, float)):
        return False
    if phase == "eval":
        return s > step or (step == 0 and row.get("tag") == "start")
    return s > step


def strict_json(value):
    """`value` with every non-finite float (NaN: no value this step, e.g. a reward none of whose completions
    had one; +-inf) replaced by None, in nested dicts / lists too: metrics.jsonl is strict JSON (null), which
    every parser reads (json.dumps writes the non-standard NaN / Infinity otherwise)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsLogger:
    """out_dir: the run folder. cfg: the run's Config (logging.* settings; the whole config goes to W&B).
    is_main: only the main rank writes; elsewhere every method is a no-op."""

    def __init__(self, out_dir: str | os.PathLike, cfg, is_main: bool = True):
        self.out = Path(out_dir)
        self.cfg = cfg
        self.lcfg = cfg.logging
        self.is_main = is_main
        self.run_name = self.lcfg.run_name or self.out.resolve().name
        self.path = self.out / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        self._purge_step: int | None = None

    # ---------------------------------------------------------------- resume
    def truncate_after(self, step: int, sft_done: bool = True, sft_step: int = 0) -> int:
        """Before a run resumed at RL `step` logs anything: move the rows it will write again out of
        metrics.jsonl (RL and eval rows of later steps; with step 0 the "start" evaluation; when the
        warm-up is not done, SFT rows from warm-up step `sft_step` on) to metrics.dropped.jsonl, so no
        step appears twice and nothing is lost. A torn last line (crash mid-write) is moved too. Tensorboard events of later steps are
        purged when its writer opens. Returns the number of rows moved."""
        if not self.is_main:
            return 0
        if self._file is not None:
            raise RuntimeError("MetricsLogger.truncate_after must run before the first log()")
        self._purge_step = step + 1
        if not self.path.is_file():
            return 0
        keep, dropped = [], []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                dropped.append(line)
                continue
            (dropped if isinstance(row, dict) and _drop(row, step, sft_done, sft_step) else keep).append(line)
        if not dropped:
            return 0
        with open(self.out / "metrics.dropped.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        log.info("metrics.jsonl: resumed at step %d, moved %d rows of later steps to metrics.dropped.jsonl",
                 step, len(dropped))
        return len(dropped)

    # ---------------------------------------------------------------- logging
    def log(self, metrics: dict) -> None:
        """Append one row (with a wall-clock "time", s since the epoch; NaN / inf written as null) to
        metrics.jsonl; an RL-step row
        (a "step" and no "phase") also goes, finite numbers only, to tensorboard and W&B."""
        if not self.is_main:
            return
        if self._file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(strict_json({"time": time.time(), **metrics}), allow_nan=False) + "\n")
        self._file.flush()
        if "step" not in metrics or metrics.get("phase") is not None:
            return
        step = int(metrics["step"])
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        if self.lcfg.tensorboard:
            for k, v in scalars.items():
                self.tensorboard().add_scalar(k, v, step)
        if self.lcfg.wandb:
            self.wandb().log(scalars, step=step)

    def tensorboard(self):
        """The SummaryWriter of OUTPUT/tensorboard/<run name>/ (opened on first use)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard" / self.run_name), purge_step=self._purge_step)
        return self._tb

    def wandb(self):
        """The W&B run (started on first use; the same run id as before when resumed)."""
        if self._wandb is None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb=true needs `pip install wandb`") from None
            id_file = self.out / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            if not run_id:
                run_id = secrets.token_hex(4)   # W&B ids: short, lower-case alphanumeric
                self.out.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=self.lcfg.wandb_project, entity=self.lcfg.wandb_entity, name=self.run_name,
                tags=list(self.lcfg.tags) or None, group=self.lcfg.group, id=run_id, resume="allow",
                dir=str(self.out), config=self.cfg.to_dict())
        return self._wandb

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


__all__ = ["MetricsLogger", "WANDB_ID_FILE", "strict_json"]
