"""Checkpoint layout shared by every engine: model + optimizer state (the engine's writer), scheduler,
RNG, data position; integrity checks, crash-safe writes and a disk-space check.

Layout: OUTPUT/checkpoints/step_000100/ holding the engine's files (DCP shards, or deepspeed/),
trainer_state.pt (step, scheduler, sampler, extras), rng_rank{r}.pt (one per rank) and the COMPLETE
marker, a JSON manifest {"step", "checksum": "crc32", "files": {relative path: {"size", "crc32"}}}.

Writing (every rank): files go to step_XXXXXX.tmp/; each rank fsyncs and checksums a share of them; rank
0 writes the marker last (fsynced), renames the folder into place and only then removes checkpoints
beyond the newest `keep_last`. A kill at any point leaves either the previous checkpoints untouched and a
.tmp folder (removed at the next start) or the new checkpoint complete. A checkpoint of the same step is
replaced by renaming the old one to step_XXXXXX.replaced first (restored at the next start if the kill
came between the two renames).

Reading: `resolve_resume` verifies each file's presence, size and crc32 against the marker before a
checkpoint is used. With resume=auto a broken checkpoint is named (with the file at fault), moved to
checkpoints/broken/ by rank 0, and the next older one is tried; an explicit path that is broken raises
CheckpointError. Markers of earlier versions ("<step>\\n", no manifest) still load: only the presence of
trainer_state.pt and the engine's files can be checked for them.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from mrpo.errors import CheckpointError, UserInputError  # noqa: F401  (CheckpointError re-exported)

log = logging.getLogger("mrpo")

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MARKER = "COMPLETE"
BROKEN = "broken"
_BLOCK = 4 * 2**20          # bytes read per crc32 update
SPACE_MARGIN = 1.1          # a checkpoint or export needs its expected size plus 10% free




def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(obj):
    """Rank 0's `obj` on every rank (a small picklable value)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


# ---------------------------------------------------------------------------------------------- integrity
def file_crc32(path: Path, fsync: bool = False) -> str:
    """crc32 of a file's bytes as 8 hex digits, read in 4 MiB blocks; fsync=True flushes it to disk first."""
    crc = 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _files(folder: Path) -> list[str]:
    """Every file under folder, as sorted POSIX paths relative to it (the marker excluded)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def read_manifest(path: Path) -> dict | None:
    """The checkpoint's marker as a manifest; None for an earlier version's plain "<step>" marker."""
    try:
        manifest = json.loads((path / MARKER).read_text())
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


_verified: dict[tuple, str | None] = {}   # (folder, its files' names, sizes, mtimes) -> verify_checkpoint's answer


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong, naming the file: missing, size mismatch or
    checksum mismatch (sizes are checked before any checksum). Reads every file once; an answer is
    remembered while no file of the folder changes (name, size and mtime)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    if not (path / MARKER).is_file():
        return f"{MARKER}: missing (the save did not finish)"
    key = (str(path.resolve()), *((str(p.relative_to(path)), st.st_size, st.st_mtime_ns)
                                  for p in sorted(path.rglob("*")) if p.is_file() and (st := p.stat())))
    if key not in _verified:
        _verified[key] = _check_files(path)
    return _verified[key]


def _check_files(path: Path) -> str | None:
    manifest = read_manifest(path)
    if manifest is None:   # written by an earlier version: presence is all that can be checked
        log.info("%s has no checksums (written by an earlier version): only the presence of its files is checked",
                 path)
        if not (path / "trainer_state.pt").is_file():
            return "trainer_state.pt: missing"
        if not ((path / ".metadata").is_file() or (path / "deepspeed").is_dir()):
            return "the engine's files (.metadata or deepspeed/): missing"
        return None
    files = manifest["files"]
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel}: size mismatch ({size} bytes, {want['size']} recorded)"
    for rel, want in files.items():
        crc = file_crc32(path / rel)
        if crc != want["crc32"]:
            return f"{rel}: checksum mismatch (crc32 {crc}, {want['crc32']} recorded)"
    return None


def checkpoint_bytes(path: Path) -> int:
    """Bytes a checkpoint folder holds (from its manifest, else by listing)."""
    manifest = read_manifest(path)
    if manifest is not None:
        return sum(int(f["size"]) for f in manifest["files"].values())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- disk space
def space_problem(folder: str | Path, needed: int, what: str) -> str | None:
    """None when folder's file system has `needed` bytes (times SPACE_MARGIN) free, else a message naming
    the folder and the bytes needed and free."""
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * SPACE_MARGIN)
    if free >= want:
        return None
    return (f"not enough disk space for {what} in {folder}: about {want / 2**20:.1f} MiB needed "
            f"({want} bytes: the expected size {needed} + 10%), {free / 2**20:.1f} MiB ({free} bytes) free")


# ---------------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under root that hold a COMPLETE marker, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def clean_partial(root: str | Path) -> None:
    """Rank 0: remove step_*.tmp folders of saves that never finished, and settle a replacement that was
    cut between its two renames (the old checkpoint comes back when the new one is not in place)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.glob("step_*.tmp")):
        log.warning("removing the unfinished checkpoint %s (a save that was cut off)", p)
        shutil.rmtree(p, ignore_errors=True)
    for old in sorted(root.glob("step_*.replaced")):
        final = old.with_suffix("")
        if (final / MARKER).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            old.rename(final)


def write_checkpoint(root: str | Path, step: int, save_weights: Callable[[Path], None], trainer_state: dict,
                     keep_last: int, expected_bytes: int | None = None) -> Path | None:
    """Write a complete checkpoint for `step` (every rank calls this); None when it was skipped for lack
    of disk space (all ranks agree; nothing is written, the run goes on).

    save_weights(folder): the engine's writer of model + optimizer state (DCP shards, or DeepSpeed's
    per-rank files). expected_bytes: the checkpoint's expected size (None: no space check); the newest
    complete checkpoint's size is used when there is one."""
    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    problem = None
    if _rank() == 0:
        clean_partial(root)
        previous = complete_checkpoints(root)
        if previous:
            expected_bytes = checkpoint_bytes(previous[-1])
        if expected_bytes is not None:
            problem = space_problem(root, expected_bytes, f"checkpoint step {step}")
    problem = _from_rank0(problem)
    if problem is not None:
        if _rank() == 0:
            log.error("%s: checkpoint skipped, the run goes on and the next save point tries again", problem)
        return None
    if _rank() == 0:
        tmp.mkdir(parents=True)
    _barrier()
    save_weights(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    files = _from_rank0(_files(tmp) if _rank() == 0 else None)   # one listing; each rank takes every world-th file
    mine = {rel: {"size": (tmp / rel).stat().st_size, "crc32": file_crc32(tmp / rel, fsync=True)}
            for rel in files[_rank()::_world()]}
    shares = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if _rank() == 0:
        manifest = {"step": step, "checksum": "crc32", "files": dict(sorted(kv for s in shares for kv in s.items()))}
        with open(tmp / MARKER, "w") as f:   # the marker last, on disk before the rename
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for d in {tmp, *((tmp / rel).parent for rel in files)}:
            _fsync_dir(d)
        replaced = root / f"{final.name}.replaced"
        if final.exists():
            final.rename(replaced)
        tmp.rename(final)
        _fsync_dir(root)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in complete_checkpoints(root)[:-keep_last]:   # only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, load_weights: Callable[[Path], None]) -> dict:
    """Restore a checkpoint folder through the engine's `load_weights(folder)` and this rank's RNG;
    returns the trainer state. (Integrity is checked by resolve_resume before.)"""
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    load_weights(path)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)


def _quarantine(path: Path) -> Path:
    """Move a broken checkpoint to checkpoints/broken/ (a numbered name if that exists already)."""
    dest_dir = path.parent / BROKEN
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / path.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{path.name}.{n}", n + 1
    path.rename(dest)
    return dest


def resolve_resume(resume: str, root: str | Path, move_broken: bool = True) -> Path | None:
    """The checkpoint to resume from, verified (see the module docstring). Call it on rank 0 only (it
    reads every file of the checkpoints it verifies); `agree_resume` shares its answer with all ranks.

    'none' -> None; 'auto' -> the newest intact checkpoint under root, or None: broken ones are logged
    with the file at fault and moved to root/broken/ (move_broken); unfinished saves are removed;
    else the path itself, which must be intact (CheckpointError naming the file otherwise)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.resume={resume}: broken checkpoint: {problem}; point "
                                  f"checkpoint.resume at an intact checkpoint, or use auto (the newest intact one)")
        return path
    if move_broken:
        clean_partial(root)
    for path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        where = f"moved to {_quarantine(path)}" if move_broken else "skipped"
        log.warning("checkpoint %s is broken (%s): %s; trying the previous one", path, problem, where)
    return None


def agree_resume(resume: str, root: str | Path) -> Path | None:
    """resolve_resume on rank 0; every rank gets its answer (or raises its CheckpointError)."""
    answer = None
    if _rank() == 0:
        try:
            path = resolve_resume(resume, root)
            answer = ("path", None if path is None else str(path))
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = _from_rank0(answer)
    if kind == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)
