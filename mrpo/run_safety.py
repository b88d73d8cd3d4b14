"""Run safety: one run per output folder, resume only into the same experiment, no orphan workers,
signals honoured in every phase, a final line that lists only what exists.

    OutputLock(output_dir).acquire()        exclusive lock on OUTPUT/.lock for the run's life
    check_resume_config(cfg, checkpoint)    refuse a resume whose saved config changes the experiment
    watch_launcher()                        workers exit when torchrun (their parent) dies
    GracefulStop().install()                SIGTERM/SIGINT -> a flag every phase polls (sync() across ranks)
    describe_outputs(output_dir)            "outputs in DIR: config.yaml, metrics.jsonl (...), ..."
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mrpo")

LOCK_NAME = ".lock"
EXIT_LAUNCHER_DIED = 70          # a worker that exits because its launcher is gone


# ----------------------------------------------------------------------------- output-folder lock


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder; the message names it."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    """Whether process pid exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe_holder(h: dict) -> str:
    cmd = " ".join(h.get("argv", []))[:200]
    return (f"pid {h.get('pid')} on {h.get('host')} (started {h.get('started')}"
            + (f", launcher pid {h['launcher_pid']}" if h.get("launcher_pid") else "")
            + (f", command: {cmd}" if cmd else "") + ")")


class OutputLock:
    """Exclusive lock on OUTPUT/.lock, held from start-up until the run ends.

    fcntl.flock is released by the kernel whenever the holding process dies (kill -9 included), so a
    lock is never left held by a dead process. The file also records the holder (pid, host, start time,
    launcher pid, command line) so that a second run can name it, and is emptied on a clean release: a
    file still naming a holder when the lock is free was left by a run that died; acquire() reports it
    (`stale` holds that record) before taking over. Without fcntl (or on a file system that refuses
    flock) the record alone decides: a live pid on this host, or any holder on another host, refuses.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.stale: dict | None = None
        self._fd: int | None = None

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"pid": None, "host": "?", "started": "?", "argv": [f"unreadable lock file: {text[:80]!r}"]}

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "launcher_pid": os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None,
                "argv": [sys.executable, *sys.argv]}

    def acquire(self) -> "OutputLock":
        """Take the lock or raise OutputLockedError naming the holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        flocked = False
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except ImportError:
            pass
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                holder = self._read()
                raise OutputLockedError(
                    f"output_dir {self.dir} is in use by another run: {_describe_holder(holder)}. Wait for it to "
                    f"finish or stop it, or give this run another output_dir=...", holder) from None
            log.warning("%s: file locking unsupported here (%s); relying on the holder record", self.path, e)
        previous = self._read()
        if previous.get("pid") is not None or previous.get("argv"):
            same_host = previous.get("host") == socket.gethostname()
            if not flocked and (not same_host or (isinstance(previous.get("pid"), int) and _pid_alive(previous["pid"]))):
                os.close(fd)
                raise OutputLockedError(
                    f"output_dir {self.dir} is in use by another run: {_describe_holder(previous)}"
                    + ("" if same_host else f"; it runs on another host, so it cannot be checked from here: "
                                            f"if it is gone, delete {self.path}"), previous)
            self.stale = previous
            log.warning("%s: stale lock of a run that ended without releasing it (%s, process gone); taking over",
                        self.path, _describe_holder(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)   # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- resume config check

# Keys that change how the run is scheduled, logged, or computed, not what it learns: a resume may
# change them (logged). Everything else (algorithm, rewards, G, model, data, loss, optimizer, seed,
# engine) changes the experiment. An entry ending in "." covers a whole section.
RESUME_ALLOWED = (
    "output_dir", "optim.max_steps", "optim.epochs", "checkpoint.", "logging.",
    "judge.max_concurrency", "judge.timeout_s", "judge.max_retries", "judge.backoff_s", "judge.cache_dir",
    "judge.api_key_env", "judge.base_url", "judge.max_unjudged_fraction", "judge.unjudged_window",
    "judge.price_input_per_mtok", "judge.price_output_per_mtok", "judge.max_cost_usd", "judge.max_requests_per_minute",
    "model.attn_implementation", "model.gradient_checkpointing", "loss.backend", "loss.chunk_size",
    "distributed.gather_for_generation", "distributed.timeout_s", "plan.",
)


class ResumeConfigError(RuntimeError):
    """The saved config of the checkpoint differs in keys that change the experiment."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_ALLOWED)


def config_differences(saved: dict, cfg) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(experiment, schedule) lists of (dotted key, saved value, new value) between a saved config
    (nested dict, e.g. config.yaml) and cfg (Config). A key the saved config lacks (written by an older
    version) counts as holding its dataclass default."""
    from mrpo.config import Config, flatten

    old, new, defaults = flatten(saved), flatten(cfg), flatten(Config())
    experiment, schedule = [], []
    for key in sorted(new):
        before = old.get(key, defaults.get(key))
        after = new[key]
        if isinstance(before, tuple):
            before = list(before)
        if isinstance(after, tuple):
            after = list(after)
        if before == after:
            continue
        (schedule if _allowed(key) else experiment).append((key, before, after))
    return experiment, schedule


def saved_config_path(checkpoint: str | os.PathLike) -> Path:
    """OUTPUT/config.yaml of a checkpoint folder OUTPUT/checkpoints/step_XXXXXX (or a checkpoint set aside
    in OUTPUT/checkpoints/abandoned/ or broken/)."""
    parent = Path(checkpoint).resolve().parent
    if parent.name in ("abandoned", "broken") and parent.parent.name == "checkpoints":
        parent = parent.parent
    return parent.parent / "config.yaml"


def check_resume_config(cfg, checkpoint: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """Compare the config saved beside `checkpoint` with cfg before resuming from it.

    Differences in experiment keys raise ResumeConfigError listing them, unless
    cfg.checkpoint.resume_ignore_config (then they are logged as a warning). Schedule-only differences
    (RESUME_ALLOWED) are logged. Returns every difference (key, saved, new). A checkpoint without a saved
    config (copied alone) is resumed with a warning.
    """
    import yaml

    path = saved_config_path(checkpoint)
    if not path.is_file():
        log.warning("resume from %s: no saved config at %s, cannot check that the experiment is unchanged",
                    checkpoint, path)
        return []
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ResumeConfigError(f"cannot check the resume from {checkpoint}: the saved config {path} is not valid "
                                f"YAML ({type(e).__name__}); restore it, or start a new run (another output_dir, "
                                f"or checkpoint.resume=none)", []) from None
    if not isinstance(saved, dict):
        raise ResumeConfigError(f"cannot check the resume from {checkpoint}: the saved config {path} is not a "
                                f"mapping; restore it, or start a new run (checkpoint.resume=none)", [])
    experiment, schedule = config_differences(saved, cfg)
    show = lambda diffs: "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)   # noqa: E731
    if experiment and not cfg.checkpoint.resume_ignore_config:
        raise ResumeConfigError(
            f"refusing to resume {checkpoint}: the config differs from the one it was trained with ({path}) in "
            f"keys that change the experiment: {show(experiment)}. Start a new run (another output_dir, or "
            f"checkpoint.resume=none), or accept the change with checkpoint.resume_ignore_config=true.",
            experiment)
    if experiment:
        log.warning("resuming %s with a changed experiment (checkpoint.resume_ignore_config=true): %s",
                    checkpoint, show(experiment))
    if schedule:
        log.info("resuming %s with changed settings: %s", checkpoint, show(schedule))
    return experiment + schedule


def archive_config(output_dir: str | os.PathLike) -> Path | None:
    """Before a resumed run with a changed config overwrites OUTPUT/config.yaml: keep the old one as
    OUTPUT/config_history/config_<UTC time>.yaml. Returns the copy (None when there was nothing)."""
    src = Path(output_dir) / "config.yaml"
    if not src.is_file():
        return None
    dst = Path(output_dir) / "config_history" / time.strftime("config_%Y%m%dT%H%M%SZ.yaml", time.gmtime())
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


# ----------------------------------------------------------------------------- launcher death


_PR_SET_PDEATHSIG = 1


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def launcher_alive(launcher_pid: int) -> bool:
    """Whether our parent is still the launcher (a dead parent's children are re-parented)."""
    return os.getppid() == launcher_pid


def _exit_launcher_died(launcher_pid: int) -> None:
    log.error("launcher (pid %d) is gone: exiting now without a checkpoint, so no orphaned worker keeps "
              "training; rerun the command to resume from the last complete checkpoint", launcher_pid)
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except Exception:   # noqa: BLE001 - exiting anyway
            pass
    os._exit(EXIT_LAUNCHER_DIED)


def watch_launcher(poll_s: float = 0.5, force: bool = False) -> int | None:
    """Make this worker exit within about poll_s seconds once its launcher (torchrun) dies.

    torchrun starts workers in their own session, so killing torchrun's process group leaves them
    running. Linux: prctl(PR_SET_PDEATHSIG, SIGTERM) has the kernel signal us when the launcher dies
    (GracefulStop's handler then exits at once instead of stopping gracefully); everywhere: a daemon
    thread polls os.getppid(). Only under torchrun (or force=True): a plain `nohup python -m mrpo.train`
    must survive its shell. Returns the launcher's pid, or None when not watching.
    """
    if not (force or launched_by_torchrun()):
        return None
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d; polling only", ctypes.get_errno())
        except (OSError, AttributeError):
            pass
    if not launcher_alive(launcher):   # died between getppid() and prctl (torchrun may itself be PID 1)
        _exit_launcher_died(launcher)

    def poll() -> None:
        while True:
            time.sleep(poll_s)
            if not launcher_alive(launcher):
                _exit_launcher_died(launcher)

    threading.Thread(target=poll, name="mrpo-launcher-watch", daemon=True).start()
    global _LAUNCHER_PID
    _LAUNCHER_PID = launcher
    return launcher


_LAUNCHER_PID: int | None = None


# ----------------------------------------------------------------------------- graceful stop


class GracefulStop:
    """SIGTERM/SIGINT -> a stop flag that every phase (warm-up, rollout, evaluation, export) polls.

    The first signal sets the flag and notes the time (a signal that reaches this rank after another
    rank's stop was synced still counts as its first): torchrun gives workers `grace_s` seconds (30 s
    by default) between forwarding the signal and SIGKILL, so a phase should save only if
    `can_save(estimate_s)`. A second signal raises KeyboardInterrupt at once (no checkpoint). If the
    launcher is gone (watch_launcher) the handler exits immediately instead.

    requested / poll(): this rank's flag (cheap, local; only for can_save). sync(): a collective
    (all_reduce MAX over ranks when torch.distributed is initialized), called at the same places on
    every rank; `stopping` is its last answer, the same on every rank, so every decision to stop (or to
    save, skip an evaluation or an export because of a stop) is taken from it: a signal that reaches
    one rank between two syncs is acted on by every rank at the next one.
    """

    def __init__(self, grace_s: float = 30.0):
        self.grace_s = float(grace_s)
        self.signal_name: str | None = None
        self.received_at: float | None = None     # time.monotonic() of the first signal
        self.reason: str | None = None            # set by request() or by the handler
        self._flag = False
        self.stopping = False                     # the synced flag (sync()): what every stop decision reads
        self._previous: dict = {}

    def install(self) -> "GracefulStop":
        """Install the handlers (main thread only); returns self."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if _LAUNCHER_PID is not None and not launcher_alive(_LAUNCHER_PID):
            _exit_launcher_died(_LAUNCHER_PID)
        name = signal.Signals(signum).name
        if self.signal_name is not None:   # a second signal to this rank (not the first after another rank's)
            log.warning("%s again: exiting now without a checkpoint", name)
            raise KeyboardInterrupt(name)
        self.request(f"{name} received", name)
        self.signal_name = name
        log.warning("%s: stopping at the next safe point; a checkpoint is saved if it fits in the %.0f s grace",
                    name, self.grace_s)

    def request(self, reason: str, signal_name: str | None = None) -> None:
        """Ask for a stop from code (e.g. a fatal condition), as a signal would."""
        if not self._flag:
            self._flag, self.reason, self.received_at = True, reason, time.monotonic()
            self.signal_name = signal_name

    @property
    def requested(self) -> bool:
        return self._flag

    def poll(self) -> bool:
        return self._flag

    def sync(self, device: Any = None) -> bool:
        """True if any rank has the flag (collective when torch.distributed is initialized); sets
        `stopping`. Once stopping, it stays so without further collectives (every rank agrees on that)."""
        if self.stopping:
            return True
        try:
            import torch
            import torch.distributed as dist
        except ImportError:
            self.stopping = self._flag
            return self._flag
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(self._flag)], device=device or "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self._flag:
                self.request("a stop signal on another rank")
        self.stopping = self._flag
        return self._flag

    def time_left(self) -> float | None:
        """Seconds of the launcher's grace left (None when no stop was requested)."""
        if self.received_at is None:
            return None
        return self.grace_s - (time.monotonic() - self.received_at)

    def can_save(self, estimate_s: float, margin_s: float = 3.0) -> bool:
        """Whether a checkpoint expected to take estimate_s seconds fits in the grace left."""
        left = self.time_left()
        return left is None or left > estimate_s + margin_s

    def save_in_grace(self, save, estimate_s: float, device: Any = None) -> str | None:
        """After an agreed stop (every rank calls it): save() if every rank expects a checkpoint of about
        estimate_s seconds to fit in its grace (agree_all); else returns why none was saved."""
        if agree_all(self.can_save(estimate_s), device if getattr(device, "type", None) == "cuda" else None):
            save()
            return None
        return (f"a checkpoint takes about {estimate_s:.0f} s, more than the {max(0.0, self.time_left() or 0):.0f} s "
                f"of grace left")


def agree_all(flag: bool, device: Any = None) -> bool:
    """True only if `flag` is true on every rank (all_reduce MIN; collective when torch.distributed is
    initialized): e.g. whether every rank expects a checkpoint to fit in its grace before all call save()."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return flag
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def stop_message(what: str, phase: str, step: int, checkpoint: str | os.PathLike | None,
                 why_not: str | None = None) -> str:
    """The line printed after a stop: what stopped the run (e.g. "SIGINT"), in which phase (warm-up,
    rollout, evaluation, export), at which RL step, and which checkpoint was saved (or why none)."""
    head = f"stopped by {what} during {phase} at step {step}"
    if checkpoint is not None:
        return f"{head}: checkpoint {checkpoint} saved; rerun the same command to resume from it"
    return (f"{head}: no checkpoint was saved ({why_not or 'no safe point before the deadline'}); a rerun "
            f"resumes from the last complete checkpoint, if any")


# ----------------------------------------------------------------------------- final line


def describe_outputs(output_dir: str | os.PathLike) -> str:
    """'outputs in DIR: config.yaml, metrics.jsonl (N RL steps, last 12), tensorboard/, checkpoints/step_000012
    (+1 older), final_model/, eval/{start,final}' listing only what exists (final_model/ only when it
    holds a config.json, an eval tag only when it holds summary.json)."""
    out = Path(output_dir)
    parts = []
    if (out / "config.yaml").is_file():
        parts.append("config.yaml")
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        steps = []
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "phase" not in row and isinstance(row.get("step"), int):
                steps.append(row["step"])
        parts.append(f"metrics.jsonl ({len(steps)} RL steps" + (f", last {steps[-1]})" if steps else ")"))
    if (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir()):
        parts.append("tensorboard/")
    from mrpo.checkpoint import complete_checkpoints

    ckpts = complete_checkpoints(out / "checkpoints")
    if ckpts:
        parts.append(f"checkpoints/{ckpts[-1].name}" + (f" (+{len(ckpts) - 1} older)" if len(ckpts) > 1 else ""))
    if (out / "final_model" / "config.json").is_file():
        parts.append("final_model/")
    tags = sorted(p.parent.name for p in (out / "eval").glob("*/summary.json")) if (out / "eval").is_dir() else []
    if tags:
        parts.append("eval/{" + ",".join(tags) + "}")
    return f"outputs in {out}: " + (", ".join(parts) if parts else "nothing written")


__all__ = ["OutputLock", "OutputLockedError", "ResumeConfigError", "RESUME_ALLOWED", "config_differences",
           "check_resume_config", "saved_config_path", "archive_config", "watch_launcher", "launcher_alive",
           "GracefulStop", "agree_all", "stop_message", "describe_outputs", "EXIT_LAUNCHER_DIED"]
