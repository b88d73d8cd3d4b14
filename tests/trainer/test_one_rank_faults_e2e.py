"""A fault on ONE of two ranks (torchrun, gloo, the tiny model): a stop signal in any phase stops both at the same
safe point with one checkpoint and exit 75; an unexpected exception ends both within seconds with the failed
rank's traceback; a judge slower than the collective timeout during evaluation does not end the run.

Each case is one torchrun (~30-60 s here); faults are injected by tests/trainer/fault_hooks.py."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
QUIET = {"logging.eval_at_start": False, "logging.eval_at_end": False, "checkpoint.export_final": False,
         "logging.tensorboard": False, "sft.steps": 0, "optim.max_steps": 3}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic set, written before the runs (so rank 0 does not write it while rank 1 waits)."""
    from mrpo.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("faults") / "synthetic"
    generate_synthetic(root, 32, 8, 0)
    return root


def _torchrun(data, out, hook, env, timeout=420, **extra):
    args = tiny_overrides(data, out, **{**QUIET, **extra})
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mrpo.train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**ENV, "MRPO_TEST_HOOK": f"tests.trainer.fault_hooks:{hook}", **env})
    return run, time.time() - t0


def _exit_codes(stderr: str) -> dict[int, int]:
    """{rank: exit code} of the ranks that torchrun reports as failed (a rank that exits 0 is not listed)."""
    return {int(r): int(c) for r, c in re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr)}


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _rl_steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "phase" not in r]


STOPS = {   # phase: (settings, fault step, the one checkpoint, RL steps logged)
    "warm-up": ({"sft.steps": 3}, 1, "step_000000", []),                      # signal in the last warm-up step
    "rollout": ({"checkpoint.every_steps": 100}, 2, "step_000002", [1, 2]),    # saved in the grace
    "save": ({"checkpoint.every_steps": 1}, 1, "step_000001", [1]),            # the save under way is the one
    "evaluation": ({"checkpoint.every_steps": 2, "logging.eval_every": 1}, 1, "step_000001", [1]),
}


@pytest.mark.parametrize("phase", list(STOPS))
def test_a_signal_to_one_rank_stops_both_with_one_checkpoint(data, tmp_path, phase):
    settings, step, checkpoint, steps = STOPS[phase]
    out = tmp_path / "run"
    run, _ = _torchrun(data, out, "sigterm_one_rank", {"MRPO_FAULT_PHASE": phase, "MRPO_FAULT_STEP": str(step)},
                       **settings)
    assert f"MRPO_FAULT SIGTERM to rank 1 during {phase}" in run.stderr, run.stderr[-3000:]
    assert _exit_codes(run.stderr) == {0: 75, 1: 75}, run.stderr[-3000:]
    assert _checkpoints(out) == [checkpoint]                              # one, complete (no .tmp left)
    assert (out / "checkpoints" / checkpoint / "COMPLETE").is_file()
    assert _rl_steps(out) == steps
    assert "stopped by a stop signal on another rank during" in run.stdout
    assert f"checkpoint {out / 'checkpoints' / checkpoint} saved" in run.stdout
    if phase == "evaluation":   # the signal came after the generation: the evaluation was finished first
        assert (out / "eval" / "step_000001" / "summary.json").is_file()


@pytest.mark.parametrize("phase", ["judge-thread", "loss"])
def test_an_exception_on_one_rank_ends_both_in_seconds(data, tmp_path, phase):
    out = tmp_path / "run"
    run, _ = _torchrun(data, out, "raise_on_one_rank", {"MRPO_FAULT_PHASE": phase, "MRPO_FAULT_STEP": "1"},
                       timeout=300)   # before the fix: rank 0 waited in a collective for 30 min (the timeout)
    ended = time.time()
    raised = float(re.search(r"MRPO_FAULT raise at ([\d.]+)", run.stderr).group(1))
    assert run.returncode != 0 and ended - raised < 30, run.stderr[-3000:]
    assert f"InjectedBug: injected bug in the {phase} of rank 1" in run.stderr    # the failed rank's traceback
    assert "Traceback (most recent call last)" in run.stderr
    # rank 0 was ended by the peer watch (not by the collective timeout) and repeats rank 1's traceback
    assert re.search(r"rank 0: ending because rank 1 \(host .*\) failed: InjectedBug", run.stderr), run.stderr[-3000:]
    assert "rank 1's traceback:" in run.stderr
    assert _exit_codes(run.stderr) == {0: 71, 1: 1}


def test_evaluation_waits_for_a_judge_slower_than_the_collective_timeout(data, tmp_path):
    """Rank 0's evaluation judging takes 25 s more than rank 1's, with a 10 s collective timeout; rank 1 also
    has a custom reward that raises at every step: counted there, and the run goes on."""
    out = tmp_path / "run"
    reward = '[{name: flaky, function: "tests.trainer.fault_hooks:fails_on_rank_1", weight: 0.1}]'
    run, _ = _torchrun(data, out, "slow_evaluation_judge", {"MRPO_JUDGE_DELAY_S": "25"},
                       **{"distributed.timeout_s": 10, "optim.max_steps": 2, "logging.eval_every": 1,
                          "checkpoint.every_steps": 100, "reward.custom": reward})
    assert run.returncode == 0, run.stderr[-3000:]
    assert _rl_steps(out) == [1, 2]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "phase" not in r]
    assert all(r["reward_failed/flaky/exception"] == 4.0 for r in steps)   # 4 completions on rank 1, summed over ranks
    assert all(0 <= r["reward/flaky"] <= 2 for r in steps)                  # rank 0's values
    ev = out / "eval" / "step_000001"
    summary = json.loads((ev / "summary.json").read_text())
    preds = [json.loads(x) for x in (ev / "predictions.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (ev / "reasoning_steps.jsonl").read_text().splitlines()]
    assert summary["n_records"] == len(preds) == len(judged) == 4
    assert [r["id"] for r in judged] == [p["id"] for p in preds]           # every rank's rows, in record order
    assert [r["phase"] for r in rows if r.get("phase") == "eval"] == ["eval"]
