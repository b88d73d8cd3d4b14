"""Checkpoint layout shared by every engine: model + optimizer state (the engine's writer), scheduler,
RNG, data position; integrity checks, crash-safe writes, rewinds and a disk-space check.

Layout: OUTPUT/checkpoints/step_000100/ holding the engine's files (DCP shards, or deepspeed/),
trainer_state.pt (step, scheduler, sampler, extras), rng_rank{r}.pt (one per rank) and the COMPLETE
marker, a JSON manifest {"step", "world_size", "checksum": "crc32", "files": {relative path: {"size",
"crc32"}}}. Beside them: broken/ (checkpoints found damaged) and abandoned/ (checkpoints of a timeline a
rewind left); neither is ever resumed by `auto` nor counted by retention.

Writing (every rank): files go to step_XXXXXX.tmp/; each rank fsyncs and checksums a share of them; rank
0 writes the marker last (fsynced), renames the folder into place (the parent folder fsynced after every
mkdir and rename) and only then removes checkpoints beyond the newest `keep_last`. A kill at any point
leaves either the previous checkpoints untouched and a .tmp folder (removed at the next start) or the new
checkpoint complete. A checkpoint of the same step is replaced by renaming the old one to
step_XXXXXX.replaced first (restored at the next start if the kill came between the two renames).

Reading (`resolve_resume`, every rank, after the process group exists): each rank checksums a share of
the candidate's files (balanced by bytes), so verifying takes 1/world of the time one reader would. A
marker that is neither a manifest nor an earlier version's "<step>" (truncated, garbage) makes the
checkpoint broken. With resume=auto the log names each skipped checkpoint and why; broken ones move to
checkpoints/broken/ once an intact one is found; when none is intact the run stops (CheckpointError,
exit 2) instead of starting over. An explicit path must be intact; resuming it (a rewind) or
resume=none moves the checkpoints after its step to checkpoints/abandoned/. Markers of earlier versions
("<step>\\n") still load: only the presence of trainer_state.pt and the engine's files can be checked.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
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
BROKEN, ABANDONED = "broken", "abandoned"   # sub-folders of checkpoints/ never resumed by auto
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


def _files(folder: Path) -> dict[str, int]:
    """Every file under folder (the marker excluded): sorted POSIX path relative to it -> size in bytes."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files of a checkpoint (relative path -> bytes), balanced by bytes: largest first, each to
    the least-loaded rank (ties to the lowest rank). Every rank computes the same split from the same sizes."""
    load, mine = [0] * world, []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += sizes[rel]
        if r == rank:
            mine.append(rel)
    return mine


def _step_of_name(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def read_marker(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a valid manifest; (None, None) for an earlier version's "<step>" marker;
    (None, what is wrong) for anything else: missing, empty, truncated or garbage, which makes the
    checkpoint broken (a garbage marker must not switch the checksums off)."""
    try:
        text = (path / MARKER).read_text(errors="replace")
    except FileNotFoundError:
        return None, f"{MARKER}: missing (the save did not finish)"
    except OSError as e:
        return None, f"{MARKER}: unreadable ({e.strerror})"
    if re.fullmatch(r"\d+\n?", text):   # what earlier versions wrote
        step = _step_of_name(path)
        if step is not None and int(text) != step:
            return None, f"{MARKER}: records step {int(text)} in the folder of step {step}"
        return None, None
    what = f"{MARKER}: neither a manifest nor an earlier version's '<step>' marker"
    try:
        manifest = json.loads(text)
    except ValueError:
        return None, f"{what} ({len(text)} bytes, truncated or garbage: {text[:40]!r})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("crc32"), str)
            for v in files.values()):
        return None, f"{what} (JSON without a valid 'files' table)"
    return manifest, None


def read_manifest(path: Path) -> dict | None:
    """The checkpoint's marker as a manifest; None for an earlier version's or a broken marker."""
    return read_marker(Path(path))[0]


def verify_checkpoint(path: str | Path, rank: int = 0, world: int = 1) -> str | None:
    """None when the checkpoint is intact, else what is wrong, naming the file: the marker, a missing file,
    a size mismatch (every file's size is checked before any checksum), a checksum mismatch. Only the
    files of share(rank, world) are checksummed: `verify_together` runs this on every rank."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    manifest, problem = read_marker(path)
    if problem is not None:
        return problem
    if manifest is None:   # written by an earlier version: presence is all that can be checked
        if rank == 0:
            log.info("%s has no checksums (written by an earlier version): only the presence of its files is "
                     "checked", path)
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
    for rel in share({rel: want["size"] for rel, want in files.items()}, rank, world):
        crc = file_crc32(path / rel)
        if crc != files[rel]["crc32"]:
            return f"{rel}: checksum mismatch (crc32 {crc}, {files[rel]['crc32']} recorded)"
    return None


def verify_together(path: str | Path) -> str | None:
    """verify_checkpoint split over the ranks (every rank calls; one all_gather): each checksums its share,
    all get the same answer (the lowest rank's problem, if any)."""
    mine = verify_checkpoint(path, _rank(), _world())
    if not dist.is_initialized():
        return mine
    problems = [None] * _world()
    dist.all_gather_object(problems, mine)
    return next((p for p in problems if p is not None), None)


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


# ---------------------------------------------------------------------------------------------- durable moves
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """mkdir -p whose new entries survive a power cut: the parent of every folder created is fsynced."""
    path = Path(path)
    if path.is_dir():
        return
    make_dir(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)


def move(src: Path, dest: Path) -> None:
    """Rename src to dest (same file system), durably: both parent folders fsynced."""
    src.rename(dest)
    _fsync_dir(dest.parent)
    if src.parent != dest.parent:
        _fsync_dir(src.parent)


def set_aside(path: Path, kind: str) -> Path:
    """Move a checkpoint to checkpoints/<kind>/ (broken or abandoned; a numbered name if that exists)."""
    dest_dir = path.parent / kind
    make_dir(dest_dir)
    dest, n = dest_dir / path.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{path.name}.{n}", n + 1
    move(path, dest)
    return dest


# ---------------------------------------------------------------------------------------------- writing
def step_folders(root: str | Path) -> list[Path]:
    """step_XXXXXX folders directly under root (the current timeline), oldest first, marker or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=_step_of_name)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under root that hold a COMPLETE marker, oldest first (not verified)."""
    return [p for p in step_folders(root) if (p / MARKER).exists()]


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
            move(old, final)


def write_checkpoint(root: str | Path, step: int, save_weights: Callable[[Path], None], trainer_state: dict,
                     keep_last: int, expected_bytes: int | None = None) -> Path | None:
    """Write a complete checkpoint for `step` (every rank calls this); None when it was skipped for lack
    of disk space (all ranks agree; nothing is written, the run goes on). Rank 0 logs the step, the size
    and the seconds it took.

    save_weights(folder): the engine's writer of model + optimizer state (DCP shards, or DeepSpeed's
    per-rank files). expected_bytes: the checkpoint's expected size (None: no space check); the newest
    complete checkpoint's size is used when there is one."""
    t0 = time.perf_counter()
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
        make_dir(tmp)
    _barrier()
    save_weights(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    sizes = _from_rank0(_files(tmp) if _rank() == 0 else None)   # one listing, split by bytes over the ranks
    mine = {rel: {"size": sizes[rel], "crc32": file_crc32(tmp / rel, fsync=True)}
            for rel in share(sizes, _rank(), _world())}
    shares = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if _rank() == 0:
        files = dict(sorted(kv for s in shares for kv in s.items()))
        manifest = {"step": step, "world_size": _world(), "checksum": "crc32", "files": files}
        with open(tmp / MARKER, "w") as f:   # the marker last, on disk before the rename
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for d in {tmp, *((tmp / rel).parent for rel in files)}:
            _fsync_dir(d)
        replaced = root / f"{final.name}.replaced"
        if final.exists():
            move(final, replaced)
        move(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in complete_checkpoints(root)[:-keep_last]:   # only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s: step %d, %.1f MiB, %.2f s", final, step,
                 sum(f["size"] for f in files.values()) / 2**20, time.perf_counter() - t0)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, load_weights: Callable[[Path], None]) -> dict:
    """Restore a checkpoint folder through the engine's `load_weights(folder)` and this rank's RNG;
    returns the trainer state. (Integrity is checked by resolve_resume before.) A rank the checkpoint
    has no RNG file for (it was written by fewer processes) keeps its seeded RNG."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    load_weights(path)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    if _rank() == 0:
        log.info("resumed from %s (step %d)", path, state["step"])
    return state


def saved_world_size(path: Path) -> int | None:
    """How many processes wrote a checkpoint: its manifest's world_size, else (earlier versions) the number
    of DeepSpeed optimizer partitions or rng_rank files."""
    manifest = read_manifest(path)
    if manifest and isinstance(manifest.get("world_size"), int):
        return manifest["world_size"]
    n = len(list(path.glob("deepspeed/*zero_pp_rank_*_optim_states.pt"))) or len(list(path.glob("rng_rank*.pt")))
    return n or None


def checkpoint_step(path: Path) -> int:
    """The RL step a checkpoint holds: from its folder name, else its manifest, else its trainer state."""
    step = _step_of_name(path)
    if step is None:
        manifest = read_manifest(path)
        step = manifest.get("step") if manifest else None
    if step is None:
        step = torch.load(path / "trainer_state.pt", weights_only=False)["step"]
    return int(step)


def abandon_after(root: Path, step: int, why: str, resumed: Path | None = None) -> list[Path]:
    """Rank 0: move the checkpoints of steps after `step` (and another folder of `step` itself than the
    `resumed` one) to root/abandoned/: they belong to the timeline a rewind leaves, which retention and
    resume=auto must not see; logs each one. Returns their new paths."""
    keep = resumed.resolve() if resumed is not None else None
    moved = [set_aside(p, ABANDONED) for p in step_folders(root)
             if _step_of_name(p) > step or (_step_of_name(p) == step and p.resolve() != keep)]
    if moved:
        log.warning("%s: moved the checkpoints of the timeline it leaves aside (out of retention and resume=auto): "
                    "%s (delete them when no longer needed)", why, ", ".join(str(p) for p in moved))
    return moved


def resume_candidate(resume: str, root: str | Path) -> Path | None:
    """Without reading any checkpoint file: the checkpoint resolve_resume would try first ('none' -> None,
    'auto' -> the newest with a marker, else the path), for checking the saved config at start-up."""
    if resume == "none":
        return None
    if resume != "auto":
        return Path(resume)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """The checkpoint to resume from, verified, the same on every rank (every rank calls; collective once
    the process group exists; each rank checksums a share of the files). See the module docstring.

    'none' -> None: a new run (the checkpoints already in root move to root/abandoned/);
    'auto' -> the newest intact checkpoint under root, None when root holds none at all; the ones skipped
    are logged with the reason and moved to root/broken/; CheckpointError when there are checkpoints but
    none is intact (naming each and how to start over: nothing is ever restarted from scratch silently);
    a path -> that checkpoint, which must be intact (CheckpointError naming the file otherwise); the
    checkpoints of later steps in root move to root/abandoned/ (a rewind)."""
    root = Path(root)
    if _rank() == 0:
        clean_partial(root)   # first: a restored step_N.replaced belongs to the timeline it was cut from
    if resume == "none":
        if _rank() == 0:
            abandon_after(root, -1, "checkpoint.resume=none starts a new run")
        _barrier()
        return None
    if resume != "auto":
        _barrier()
        path = Path(resume)
        problem = verify_together(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.resume={resume}: broken checkpoint: {problem}; point "
                                  f"checkpoint.resume at an intact checkpoint, or use auto (the newest intact one)")
        if _rank() == 0:
            abandon_after(root, checkpoint_step(path), f"rewind to {path}", resumed=path)
        _barrier()
        return path
    names = _from_rank0([p.name for p in step_folders(root)] if _rank() == 0 else None)
    chosen, skipped = None, []
    for name in reversed(names):
        problem = verify_together(root / name)
        if problem is None:
            chosen = root / name
            break
        skipped.append((root / name, problem))
        if _rank() == 0:
            log.warning("checkpoint %s is broken (%s): skipped", root / name, problem)
    if chosen is None and skipped:
        listed = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(
            f"checkpoint.resume=auto: no intact checkpoint in {root} ({listed}); the run does not start over by "
            f"itself: resume an intact copy with checkpoint.resume=PATH, or start over on purpose with a fresh "
            f"output_dir or checkpoint.resume=none (which moves these to {root / ABANDONED})")
    if _rank() == 0:
        for path, _ in skipped:
            log.warning("checkpoint %s moved to %s; resuming from %s", path, set_aside(path, BROKEN), chosen)
    _barrier()
    return chosen
