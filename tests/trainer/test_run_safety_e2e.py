"""Run safety through the real entry point (python -m mrpo.train / torchrun), tiny settings, loopback only."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mrpo.config import load_config
from mrpo.run_safety import _pid_alive

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cmd(args, nproc=None):
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "mrpo.train", *args]
    return [sys.executable, "-m", "mrpo.train", *args]


def _run(args, env_extra=None, timeout=600):
    return subprocess.run(_cmd(args), cwd=REPO, env={**ENV, **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _wait_for_holder(out: Path, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            text = (out / ".lock").read_text()
            if text.strip():
                return json.loads(text)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no lock holder in {out} after {timeout}s")


def _rl_steps(out) -> list[int]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "phase" not in r]


def test_second_run_into_a_locked_folder_exits_naming_the_holder(tmp_path):
    shared_data = tmp_path / "data" / "synthetic"   # own copy: the first run is killed, maybe mid-write
    out = tmp_path / "run"
    long_run = tiny_overrides(shared_data, out, **{"optim.max_steps": 1000, "sft.steps": 1000})
    first = subprocess.Popen(_cmd(long_run), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        holder = _wait_for_holder(out)
        assert holder["pid"] == first.pid
        t0 = time.time()
        second = _run(tiny_overrides(shared_data, out, seed=7))
        assert second.returncode == 3, second.stderr[-2000:]
        assert f"is in use by another run: pid {first.pid}" in second.stderr and str(out) in second.stderr
        assert "resolved config" not in second.stdout and time.time() - t0 < 120
        assert first.poll() is None                                   # the first run is untouched
        if (out / "config.yaml").exists():
            assert load_config(out / "config.yaml").seed == 0
    finally:
        first.kill()
        first.wait()


def _fake_checkpoint(shared_data, out, **saved):
    cfg = load_config(None, tiny_overrides(shared_data, out, **saved))
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    ckpt = out / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("1\n")   # an earlier version's marker: only the files' presence is checked
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / ".metadata").write_bytes(b"")


def test_resume_with_a_changed_experiment_is_refused(shared_data, tmp_path):
    out = tmp_path / "run"
    _fake_checkpoint(shared_data, out, **{"rollout.group_size": 2})
    res = _run(tiny_overrides(shared_data, out, **{"algo.name": "grpo", "rollout.group_size": 4}))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "refusing to resume" in res.stderr and "algo.name: 'mrpo' -> 'grpo'" in res.stderr
    assert "rollout.group_size: 2 -> 4" in res.stderr and "checkpoint.resume_ignore_config=true" in res.stderr
    assert load_config(out / "config.yaml").algo.name == "mrpo"     # the saved config is untouched
    assert (out / ".lock").read_text() == ""                        # released on the error path


def test_launcher_sigkill_leaves_no_worker_alive(tmp_path):
    shared_data = tmp_path / "data" / "synthetic"   # own copy: the worker is killed, maybe mid-write
    out = tmp_path / "run"
    args = tiny_overrides(shared_data, out, **{"optim.max_steps": 1000, "sft.steps": 1000})
    launcher = subprocess.Popen(_cmd(args, nproc=1), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        holder = _wait_for_holder(out, timeout=180)
        worker = holder["pid"]
        assert holder["launcher_pid"] == launcher.pid and worker != launcher.pid
        os.killpg(launcher.pid, signal.SIGKILL)    # as `kill -9 -PGID`: torchrun's group, not the workers' session
        launcher.wait()
        deadline = time.time() + 10
        while _pid_alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _pid_alive(worker), f"worker {worker} still alive 10 s after its launcher died"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        if worker is not None and _pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_no_duplicate_steps_in_metrics_after_resume(shared_data, tmp_path):
    out = tmp_path / "run"
    extra = {"optim.max_steps": 4, "checkpoint.every_steps": 2, "logging.eval_at_end": False,
             "checkpoint.export_final": False, "logging.tensorboard": False}
    crashed = _run(tiny_overrides(shared_data, out, **extra), env_extra={"MRPO_TEST_HOOK": "tests.trainer.fault_hooks:sigkill_after_scoring",
                                                                    "MRPO_FAULT_STEP": "4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert _rl_steps(out) == [1, 2, 3]                    # checkpoint at 2; step 3 logged but not saved
    resumed = _run(tiny_overrides(shared_data, out, **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stale lock" in resumed.stderr and "resumed from" in resumed.stderr
    assert _rl_steps(out) == [1, 2, 3, 4]
    dropped = [json.loads(x) for x in (out / "metrics.dropped.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dropped] == [3]
    last = resumed.stdout.strip().splitlines()[-1]
    assert last.startswith(f"outputs in {out}: config.yaml, metrics.jsonl (4 RL steps, last 4)")
    assert last.endswith("eval/{start}") and "final_model" not in last   # export and final evaluation were off


# ----------------------------------------------------------------------------- need the trainer to call in


def test_sigint_during_warmup_saves_a_checkpoint(shared_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_overrides(shared_data, out, **{"sft.steps": 2000, "logging.eval_at_start": False})),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:   # the warm-up writes a row every 10 steps
        if (out / "metrics.jsonl").exists() and '"phase": "sft"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 30                           # within torchrun's grace period
    assert proc.returncode == 75, stderr[-3000:]
    assert list((out / "checkpoints").glob("step_*/COMPLETE")), stderr[-3000:]
    last = stdout.strip().splitlines()[-1]
    assert "checkpoints/step_" in last and "final_model" not in last and "eval/" not in last
    assert "stopped by SIGINT during warm-up" in stdout


class _FailingJudge:
    """Answers GET /models (so the preflight passes) and 503 to every chat completion."""

    def __init__(self):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._reply(200, b'{"data": [{"id": "judge-model"}]}')

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self._reply(503, b'{"error": "down"}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_judge_outage_stops_the_run_with_a_checkpoint(shared_data, tmp_path, monkeypatch, caplog):
    import logging

    import mrpo.rewards
    from mrpo.judges.outage import JudgeOutageError
    from mrpo.rewards.steps import Step
    from mrpo.trainer import Trainer

    # the tiny policy without warm-up writes no reasoning block; give every completion one step so that
    # each one is sent to the (failing) judge
    monkeypatch.setattr(mrpo.rewards, "segment_steps", lambda text, tag="think", *special: [Step(text[:1], 0, len(text[:1]))])
    caplog.set_level(logging.WARNING, logger="mrpo.judges.http")
    judge = _FailingJudge()
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(shared_data, out, **{
        "judge.kind": "http", "judge.base_url": judge.url, "judge.model": "judge-model", "judge.max_retries": 0,
        "judge.unjudged_window": 2, "judge.max_unjudged_fraction": 0.5, "optim.max_steps": 10,
        "sft.steps": 0, "checkpoint.every_steps": 100, "logging.eval_at_start": False}))
    trainer = Trainer(cfg)
    try:
        with pytest.raises(JudgeOutageError) as err:
            trainer.train()
    finally:
        trainer.close()
        judge.close()
    assert "100% of the 8 completions" in str(err.value) and "server_error 8" in str(err.value)
    assert _rl_steps(out) == [1, 2]
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").exists()
    summaries = [r for r in caplog.records if r.name == "mrpo.judges.http" and "unjudged" in r.getMessage()]
    assert len(summaries) == 2                                       # one summarised warning per step
