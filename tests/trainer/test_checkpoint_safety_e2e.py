"""Broken checkpoints, a kill during a save and a full disk, through the real entry point (python -m
mrpo.train, one process, tiny settings). Each resumed run must log exactly the steps of an unbroken run."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import read_metrics, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
# the fault hooks are imported as `fault_hooks`
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(Path(__file__).parent)}
EXTRA = {"optim.max_steps": 4, "logging.eval_at_end": False, "checkpoint.export_final": False,
         "checkpoint.keep_last": 5, "logging.tensorboard": False}
SHARD = "__0_0.distcp"


def _run(args, env_extra=None):
    return subprocess.run([sys.executable, "-m", "mrpo.train", *args], cwd=REPO, env={**ENV, **(env_extra or {})},
                          capture_output=True, text=True, timeout=600)


def _rl_steps(out) -> dict[int, dict]:
    rows = read_metrics(out)
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s"))}
            for r in rows if "phase" not in r}


def _assert_same_steps(a, b, steps):
    for step in steps:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-6, abs=1e-9, nan_ok=True), (step, k)


@pytest.fixture(scope="module")
def unbroken(shared_data, tmp_path_factory):
    """A 4-step run with a checkpoint after every step (0 = after the warm-up, 1..4)."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    run = _run(tiny_overrides(shared_data, out, **EXTRA))
    assert run.returncode == 0, run.stderr[-3000:]
    (out.parent / "train.log").write_text(run.stderr)
    return out


@pytest.mark.slow
def test_each_step_is_saved_once_the_last_one_too(unbroken):
    """every_steps=1 divides the step count: the final save is the step-4 checkpoint, not a second write."""
    log = (unbroken.parent / "train.log").read_text()
    saves = re.findall(r"saved checkpoint \S+/step_(\d+): step (\d+), [\d.]+ MiB, [\d.]+ s", log)
    assert [int(s) for _, s in saves] == [0, 1, 2, 3, 4], saves


@pytest.mark.slow
def test_broken_checkpoints_are_named_moved_and_resume_falls_back(shared_data, unbroken, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unbroken, out)
    ckpts = out / "checkpoints"
    shard = ckpts / "step_000004" / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])      # truncated shard
    (ckpts / "step_000003" / SHARD).unlink()                                 # deleted shard
    state = ckpts / "step_000002" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))                                           # corrupted trainer state
    (ckpts / "step_000001" / "COMPLETE").write_text("1\n")                   # an earlier version's marker

    explicit = _run(tiny_overrides(shared_data, out, **EXTRA, **{"checkpoint.resume": ckpts / "step_000004"}))
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    error = explicit.stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint.resume=") and f"{SHARD}: size mismatch" in error

    resumed = _run(tiny_overrides(shared_data, out, **EXTRA))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr
    assert f"step_000004 is broken ({SHARD}: size mismatch" in log
    assert f"step_000003 is broken ({SHARD}: missing)" in log
    assert "step_000002 is broken (trainer_state.pt: checksum mismatch" in log
    assert "step_000001 has no checksums (written by an earlier version)" in log
    assert "resumed from" in log and "step_000001 (step 1)" in log
    assert sorted(p.name for p in (ckpts / "broken").iterdir()) == ["step_000002", "step_000003", "step_000004"]
    b = _rl_steps(out)
    assert sorted(b) == [1, 2, 3, 4]
    _assert_same_steps(_rl_steps(unbroken), b, [2, 3, 4])

    # every checkpoint damaged: one line, exit 2, nothing restarted from scratch
    metrics, names = (out / "metrics.jsonl").read_text(), sorted(p.name for p in ckpts.glob("step_*"))
    for path in ckpts.glob("step_*"):
        (path / "COMPLETE").write_text('{"step": 1, "fi')
    stopped = _run(tiny_overrides(shared_data, out, **EXTRA))
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: checkpoint.resume=auto: no intact checkpoint in {ckpts} (step_000004: COMPLETE: ")
    assert "step_000001: COMPLETE: neither a manifest" in error and "checkpoint.resume=none" in error
    assert (out / "metrics.jsonl").read_text() == metrics and sorted(p.name for p in ckpts.glob("step_*")) == names


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(shared_data, unbroken, tmp_path):
    out = tmp_path / "run"
    extra = {**EXTRA, "checkpoint.keep_last": 1}
    crashed = _run(tiny_overrides(shared_data, out, **extra),
                   env_extra={"MRPO_TEST_HOOK": "fault_hooks:sigkill_during_save", "MRPO_FAULT_STEP": "3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003.tmp"]   # keep_last=1 kept step 2
    assert (ckpts / "step_000003.tmp" / SHARD).is_file() and not (ckpts / "step_000003.tmp" / "COMPLETE").exists()
    resumed = _run(tiny_overrides(shared_data, out, **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removing the unfinished checkpoint" in resumed.stderr and "step_000002 (step 2)" in resumed.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004"]
    b = _rl_steps(out)
    assert sorted(b) == [1, 2, 3, 4]
    _assert_same_steps(_rl_steps(unbroken), b, [3, 4])


@pytest.mark.slow
def test_full_disk_skips_checkpoints_and_export_and_the_run_goes_on(shared_data, tmp_path):
    out = tmp_path / "run"
    run = _run(tiny_overrides(shared_data, out, **{"optim.max_steps": 1, "logging.eval_at_end": False}),
               env_extra={"MRPO_TEST_HOOK": "fault_hooks:disk_full"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"not enough disk space for checkpoint step 1 in {out / 'checkpoints'}" in run.stderr
    assert "MiB needed" in run.stderr and "(1048576 bytes) free" in run.stderr
    assert "the next save point tries again" in run.stderr
    assert f"not enough disk space for the exported model in {out}" in run.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "final_model").exists()
    assert sorted(_rl_steps(out)) == [1]
