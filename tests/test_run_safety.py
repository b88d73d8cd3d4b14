"""Output lock, resume config check, graceful stop, final-line listing, --help (no training)."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrpo.config import Config, load_config, parse_args
from mrpo.run_safety import (
    GracefulStop,
    OutputLock,
    OutputLockedError,
    ResumeConfigError,
    check_resume_config,
    config_differences,
    describe_outputs,
    stop_message,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- lock

def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = OutputLock(tmp_path / "run").acquire()
    with pytest.raises(OutputLockedError) as err:
        OutputLock(tmp_path / "run").acquire()   # a second open file description: flock conflicts
    assert f"pid {os.getpid()}" in str(err.value) and str(tmp_path / "run") in str(err.value)
    assert err.value.holder["pid"] == os.getpid()
    first.release()
    again = OutputLock(tmp_path / "run").acquire()   # released cleanly: no stale report
    assert again.stale is None
    again.release()


def test_lock_of_a_killed_process_is_reported_stale_then_taken(tmp_path, caplog):
    code = ("import os, sys; from mrpo.run_safety import OutputLock; "
            f"OutputLock({str(tmp_path / 'run')!r}).acquire(); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    record = json.loads((tmp_path / "run" / ".lock").read_text())
    assert record["pid"] != os.getpid()
    caplog.set_level(logging.WARNING, logger="mrpo")
    lock = OutputLock(tmp_path / "run").acquire()
    assert lock.stale["pid"] == record["pid"]
    assert "stale lock" in caplog.text and f"pid {record['pid']}" in caplog.text
    lock.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""


def test_lock_held_by_a_live_process_blocks_across_processes(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from mrpo.run_safety import OutputLock; "
                               f"OutputLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    OutputLock(tmp_path).acquire().release()   # the kernel released it with the process


# ----------------------------------------------------------------------------- resume config check

def _saved_run(tmp_path, overrides=()):
    cfg = load_config(None, [f"output_dir={tmp_path}", *overrides])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    ckpt = tmp_path / "checkpoints" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("10\n")
    return ckpt


def test_changed_experiment_is_refused_with_the_keys(tmp_path):
    ckpt = _saved_run(tmp_path)
    new = load_config(None, [f"output_dir={tmp_path}", "algo.name=grpo", "rollout.group_size=4"])
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(new, ckpt)
    msg = str(err.value)
    assert "algo.name: 'mrpo' -> 'grpo'" in msg and "rollout.group_size: 8 -> 4" in msg
    assert "checkpoint.resume_ignore_config=true" in msg and str(tmp_path / "config.yaml") in msg
    assert {k for k, _, _ in err.value.differences} == {"algo.name", "rollout.group_size"}


def test_changed_experiment_accepted_with_override_and_logged(tmp_path, caplog):
    ckpt = _saved_run(tmp_path)
    caplog.set_level(logging.INFO, logger="mrpo")
    new = load_config(None, [f"output_dir={tmp_path}", "algo.name=grpo", "rollout.group_size=4",
                             "checkpoint.resume_ignore_config=true"])
    diffs = check_resume_config(new, ckpt)
    assert ("algo.name", "mrpo", "grpo") in diffs and ("rollout.group_size", 8, 4) in diffs
    assert "changed experiment" in caplog.text and "algo.name" in caplog.text


def test_schedule_changes_are_allowed_and_logged(tmp_path, caplog):
    ckpt = _saved_run(tmp_path)
    caplog.set_level(logging.INFO, logger="mrpo")
    new = load_config(None, [f"output_dir={tmp_path}", "optim.max_steps=120", "logging.eval_every=5",
                             "checkpoint.every_steps=20", "judge.timeout_s=5"])
    diffs = check_resume_config(new, ckpt)
    assert {k for k, _, _ in diffs} == {"optim.max_steps", "logging.eval_every", "checkpoint.every_steps",
                                        "judge.timeout_s"}
    assert "optim.max_steps: 60 -> 120" in caplog.text


@pytest.mark.parametrize("override", ["seed=1", "model.family=qwen3_vl", "data.train_path=x.jsonl",
                                      "loss.beta=0.04", "reward.process_weight=0.5", "optim.lr=0.5"])
def test_experiment_keys_are_not_schedule(tmp_path, override):
    saved = load_config(None, [f"output_dir={tmp_path}"]).to_dict()
    experiment, schedule = config_differences(saved, load_config(None, [f"output_dir={tmp_path}", override]))
    assert [k for k, _, _ in experiment] == [override.split("=")[0]] and schedule == []


def test_key_missing_from_an_older_saved_config_counts_as_default(tmp_path):
    saved = load_config(None, [f"output_dir={tmp_path}"]).to_dict()
    del saved["judge"]["max_unjudged_fraction"], saved["algo"]["tau"]
    assert config_differences(saved, load_config(None, [f"output_dir={tmp_path}"])) == ([], [])
    experiment, _ = config_differences(saved, load_config(None, [f"output_dir={tmp_path}", "algo.tau=0.7"]))
    assert experiment == [("algo.tau", 0.6, 0.7)]


# ----------------------------------------------------------------------------- config defaults, --help

def test_default_output_dir_follows_the_config_file_name(tmp_path):
    user = tmp_path / "my_lr_sweep.yaml"
    user.write_text("optim:\n  lr: 0.001\n")
    assert load_config(user).output_dir == "runs/my_lr_sweep"
    other = tmp_path / "other.yaml"
    other.write_text("optim:\n  lr: 0.002\n")
    assert load_config(other).output_dir == "runs/other"
    assert load_config(None).output_dir == "runs/tiny_cpu"          # set in the file itself
    assert load_config(user, ["output_dir=elsewhere"]).output_dir == "elsewhere"


def test_help_gives_every_key_its_default_and_meaning(capsys):
    import dataclasses

    from mrpo.config import describe_keys, flatten

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    rows = describe_keys()
    assert {k for k, _, _ in rows} == set(flatten(Config()))
    for key, _, meaning in rows:
        assert meaning, f"{key} has no help text"
        assert f"  {key} = " in text and meaning in text
    assert "  rollout.group_size = 8\n      G: completions sampled per prompt" in text
    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))


# ----------------------------------------------------------------------------- graceful stop

def test_graceful_stop_flag_then_second_signal_interrupts():
    stop = GracefulStop(grace_s=30).install()
    try:
        assert not stop.requested and stop.time_left() is None and stop.sync() is False
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGINT" and stop.sync()
        assert 25 < stop.time_left() <= 30 and stop.can_save(5) and not stop.can_save(40)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_first_signal_after_another_ranks_stop_is_not_a_second_signal():
    """Multi-node jobs get signals at different times: a rank that learnt of the stop from another rank
    (sync) and then gets its own SIGTERM keeps stopping gracefully; only a second signal to it interrupts.
    `stopping` (what every decision reads) changes only at sync()."""
    stop = GracefulStop(grace_s=30).install()
    try:
        stop.request("a stop signal on another rank")   # what sync() does when another rank had the flag
        assert stop.requested and not stop.stopping and stop.sync() and stop.stopping
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        stop.uninstall()


def test_save_in_grace_saves_only_when_it_fits():
    stop, saved = GracefulStop(grace_s=30), []
    stop.request("SIGTERM received", "SIGTERM")
    assert stop.save_in_grace(lambda: saved.append(1), estimate_s=5) is None and saved == [1]
    stop.received_at -= 25                                           # 5 s of the grace left
    why = stop.save_in_grace(lambda: saved.append(2), estimate_s=5)
    assert saved == [1] and why.startswith("a checkpoint takes about 5 s, more than the 5 s of grace left")


def test_graceful_stop_agrees_across_ranks(tmp_path):
    """Two gloo ranks on loopback: only rank 1 is signalled; sync() stops both at the same call."""
    script = tmp_path / "w.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "import torch.distributed as dist\n"
        "from mrpo.run_safety import GracefulStop\n"
        "dist.init_process_group('gloo')\n"
        "stop = GracefulStop().install()\n"
        "before = stop.sync()\n"
        "if dist.get_rank() == 1:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
        "print(f'rank{dist.get_rank()} before={before} local={stop.requested} after={stop.sync()}', flush=True)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank0 before=False local=False after=True" in run.stdout
    assert "rank1 before=False local=True after=True" in run.stdout


def test_stop_message_names_the_checkpoint_or_why_none():
    assert "checkpoint runs/x/checkpoints/step_000004 saved" in stop_message(
        "SIGINT", "rollout", 4, "runs/x/checkpoints/step_000004")
    msg = stop_message("SIGTERM", "warm-up", 0, None, "the warm-up state is not checkpointable")
    assert "no checkpoint was saved (the warm-up state is not checkpointable)" in msg and "warm-up" in msg


# ----------------------------------------------------------------------------- final line

def test_describe_outputs_lists_only_what_exists(tmp_path):
    out = tmp_path / "run"
    assert describe_outputs(out) == f"outputs in {out}: nothing written"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    rows = [{"phase": "sft", "sft_step": 0}, {"step": 1}, {"step": 2}, {"phase": "eval", "tag": "start", "step": 0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, complete in ((1, True), (2, True), (3, False)):
        d = out / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    (out / "final_model").mkdir()                       # empty: an interrupted export is not listed
    (out / "eval" / "start").mkdir(parents=True)
    (out / "eval" / "start" / "summary.json").write_text("{}")
    (out / "eval" / "final").mkdir()                    # no summary: not listed
    line = describe_outputs(out)
    assert line == (f"outputs in {out}: config.yaml, metrics.jsonl (2 RL steps, last 2), "
                    f"checkpoints/step_000002 (+1 older), eval/{{start}}")
    (out / "final_model" / "config.json").write_text("{}")
    assert "final_model/" in describe_outputs(out)


def test_unreadable_saved_config_is_refused_with_one_line(tmp_path):
    ckpt = _saved_run(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(ResumeConfigError, match=r"saved config .*config.yaml is not valid YAML \(.*checkpoint.resume=none"):
        check_resume_config(load_config(None, [f"output_dir={tmp_path}"]), ckpt)
    (tmp_path / "config.yaml").write_text("just a string\n")
    with pytest.raises(ResumeConfigError, match="is not a mapping"):
        check_resume_config(load_config(None, [f"output_dir={tmp_path}"]), ckpt)
