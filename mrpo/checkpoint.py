"""Checkpoint layout shared by every engine: model + optimizer state (the engine's writer), scheduler,
RNG, data position.

Layout: OUTPUT/checkpoints/step_000100/ holding the engine's files (DCP shards, or deepspeed/), trainer_state.pt (step, scheduler,
sampler, extras), rng_rank{r}.pt (one per rank) and a COMPLETE marker. Each checkpoint is written to
step_XXXXXX.tmp/ and renamed only once every rank has finished, so a crash mid-save never leaves a
folder that resume would pick. The last `keep_last` complete checkpoints are kept.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def write_checkpoint(root: str | Path, step: int, save_weights: Callable[[Path], None], trainer_state: dict,
                     keep_last: int) -> Path:
    """Write a complete checkpoint for `step` (every rank calls this).

    save_weights(folder): the engine's writer of model + optimizer state (DCP shards, or DeepSpeed's
    per-rank files). The folder is step_XXXXXX.tmp/ until every rank is done; then the COMPLETE marker is
    written and it is renamed, and checkpoints beyond the newest `keep_last` are removed."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_weights(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "COMPLETE").write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_checkpoint(path: str | Path, load_weights: Callable[[Path], None]) -> dict:
    """Restore a checkpoint folder through the engine's `load_weights(folder)` and this rank's RNG;
    returns the trainer state."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    load_weights(path)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'auto' -> newest complete checkpoint under root (or None); 'none' -> None; else that path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    return Path(resume)
