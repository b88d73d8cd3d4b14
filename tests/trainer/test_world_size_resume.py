"""Resuming on another number of processes (issue 29): a run saved on 2 FSDP2 processes resumes on 1, and
one saved on 1 resumes on 2. DCP reshards the model and optimizer (checked tensor by tensor against the
checkpoint), the data order continues the un-resumed run's global order with no prompt repeated or
skipped, and the metrics continue. Both resumes are rewinds (checkpoint.resume=PATH to an older step), so
the later checkpoints move to checkpoints/abandoned/. DeepSpeed refuses a world-size change with one line."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mrpo.errors import CheckpointError

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{Path(__file__).parent}:{REPO}",
       "MRPO_TEST_HOOK": "fault_hooks:record_prompts_and_check_load"}
EXTRA = {"sft.steps": 0, "checkpoint.keep_last": 5, "checkpoint.export_final": False, "logging.eval_at_start": False,
         "logging.eval_at_end": False, "logging.tensorboard": False, "optim.max_steps": 4,
         "reward.custom": '[{name: chars, function: "fault_hooks:completion_chars", weight: 0.01}]'}


def _train(data, out, prompt_log, nproc, **extra):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    run = subprocess.run([sys.executable, *launcher, "-m", "mrpo.train", *tiny_overrides(data, out, **EXTRA, **extra)],
                         cwd=REPO, env={**ENV, "MRPO_PROMPT_LOG": str(prompt_log)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _prompts(prompt_log) -> dict[int, list[int]]:
    """step -> the step's prompts in global order (rank 0's, then rank 1's)."""
    files = [f for f in sorted(prompt_log.parent.glob(prompt_log.name + ".rank*")) if not f.name.endswith(".pt")]
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    return {s: [i for r in sorted(rows, key=lambda r: r["rank"]) if r["step"] == s for i in r["indices"]]
            for s in sorted({r["step"] for r in rows})}


def _rl_steps(out, name="metrics.jsonl") -> list[int]:
    return [r["step"] for r in map(json.loads, (out / name).read_text().splitlines()) if "phase" not in r]


@pytest.mark.slow
def test_fsdp2_two_processes_to_one_and_back(shared_data, tmp_path):
    a = tmp_path / "a"
    _train(shared_data, a, tmp_path / "a.prompts", nproc=2)          # the un-resumed run: 2 processes, 4 steps
    order = [i for s in range(1, 5) for i in _prompts(tmp_path / "a.prompts")[s]]
    assert len(order) == 16 and len(set(order)) == 16

    b = tmp_path / "b"
    shutil.copytree(a, b)
    run = _train(shared_data, b, tmp_path / "b.prompts", nproc=1,
                 **{"checkpoint.resume": b / "checkpoints" / "step_000002"})
    loaded = re.search(r"rank 0: loaded ok \((\d+) tensors, (\d+) non-zero optimizer moments\)", run.stdout)
    assert loaded and int(loaded[2]) > 0, run.stdout[-2000:]   # trained moments, not a fresh optimizer's zeros
    assert f"resumed from {b / 'checkpoints' / 'step_000002'} (step 2)" in run.stderr
    assert sorted(p.name for p in (b / "checkpoints" / "abandoned").iterdir()) == ["step_000003", "step_000004"]
    got = _prompts(tmp_path / "b.prompts")
    assert sorted(got) == [3, 4] and got[3] + got[4] == order[8:12]        # 2 prompts a step on 1 process
    assert _rl_steps(b) == [1, 2, 3, 4]

    run = _train(shared_data, b, tmp_path / "d.prompts", nproc=2,
                 **{"checkpoint.resume": b / "checkpoints" / "step_000003"})
    assert "rank 0: loaded ok" in run.stdout and "(step 3)" in run.stderr
    got = _prompts(tmp_path / "d.prompts")
    assert sorted(got) == [4] and got[4] == order[10:14]                   # 4 a step again, from where 1 process left
    assert _rl_steps(b) == [1, 2, 3, 4]
    assert _rl_steps(b, "metrics.dropped.jsonl") == [3, 4, 4]              # the rows each rewind replaced
    assert (b / "checkpoints" / "abandoned" / "step_000004.1").is_dir()
    assert [p.name for p in sorted((b / "checkpoints").glob("step_*"))] == ["step_000001", "step_000002",
                                                                             "step_000003", "step_000004"]


def test_the_sampler_position_is_global_so_it_continues_on_another_world_size():
    from mrpo.data.sampler import PromptSampler

    whole = PromptSampler(20, seed=3, shuffle=True, rank=0, world=1).next(20)
    two = [PromptSampler(20, seed=3, shuffle=True, rank=r, world=2) for r in range(2)]
    taken = [i for _ in range(2) for s in two for i in s.next(2)]       # 2 steps on 2 ranks
    one = PromptSampler(20, seed=3, shuffle=True, rank=0, world=1)
    one.load_state_dict(two[0].state_dict())
    taken += one.next(2) + one.next(2)                                 # then 2 steps on 1 rank
    back = [PromptSampler(20, seed=3, shuffle=True, rank=r, world=2) for r in range(2)]
    for s in back:
        s.load_state_dict(one.state_dict())
    taken += [i for s in back for i in s.next(2)]                      # and 1 on 2 again
    assert taken == whole[:16]


def _fake_deepspeed_checkpoint(folder: Path, world: int) -> Path:
    (folder / "deepspeed").mkdir(parents=True)
    for r in range(world):
        (folder / "deepspeed" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    return folder


def test_deepspeed_checkpoints_refuse_another_world_size_with_one_line(tmp_path):
    pytest.importorskip("deepspeed")
    from mrpo.engines.deepspeed import ZeROEngine
    from mrpo.engines.single import SingleEngine

    two = _fake_deepspeed_checkpoint(tmp_path / "two" / "step_000002", 2)
    with pytest.raises(CheckpointError, match=r"written by DeepSpeed ZeRO on 2 processes: this run \(1 process, "
                                              r"engine single\) reads DCP checkpoints only; resume it with "
                                              r"distributed.engine=deepspeed on 2 processes"):
        SingleEngine.load_weights(SimpleNamespace(world=1, name="single"), two)
    with pytest.raises(CheckpointError, match="on 2 processes and this run has 3: .* resume it on 2 processes"):
        ZeROEngine.load_weights(SimpleNamespace(world=3), two)
    one = tmp_path / "one" / "step_000002"
    one.mkdir(parents=True)
    (one / ".metadata").write_bytes(b"m")
    torch.save({}, one / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match=r"is a DCP checkpoint \(written by 1 process, .*DeepSpeed ZeRO cannot "
                                              r"load: resume it on one process, or with distributed.engine=fsdp2"):
        ZeROEngine.load_weights(SimpleNamespace(world=2), one)
