"""benchmarks/bench_step.py --json on the tiny default (1 process, a few short steps): the schema, and the
probes against what they measure (padding from the batches the trainer builds, no all-gathers without
FSDP2, decode time per decoded position)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_json(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--steps", "2", "--warmup", "0",
           "--threads", "1", "--out-dir", str(tmp_path), "--tag", "t", "--json", str(out),
           "rollout.max_new_tokens=12", "optim.grad_accum_steps=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(out.read_text())
    for key in ("step_s", "phases", "tokens_per_s", "padding_fraction", "allgathers_per_rollout",
                "decode_ms_per_token", "padded_positions", "forward_positions"):
        assert key in s, key
    assert set(s["phases"]) >= {"generate", "judge", "logprobs", "loss_backward"}
    assert s["step_s"] > 0 and s["tokens_per_s"] > 0 and s["decode_ms_per_token"] > 0
    assert abs(sum(s["phases"].values()) - s["step_s"]) < 0.05 * s["step_s"] + 1e-3
    # 8 completions per step (per_device_batch_size 8, grad_accum 1), one micro-batch of prompt + completion
    # rows: every forward position is counted, and the padding share matches the counts
    assert s["completions_per_step"] == 8
    assert 0 < s["forward_positions"] and 0 <= s["padded_positions"] < s["forward_positions"]
    assert s["padding_fraction"] == pytest.approx(s["padded_positions"] / s["forward_positions"], abs=1e-6)
    assert s["allgathers_per_rollout"] == "n/a" and s["nproc"] == 1
    assert (tmp_path / "step_t.csv").exists() and (tmp_path / "step_t.md").exists()


def test_bench_step_compare_packing(tmp_path):
    """--compare-packing: packed and padded loss + backward of one rollout, interleaved; both give the same
    loss and (fp32) the same per-token log-probs; the CPU runs the per-sequence SDPA."""
    out = tmp_path / "p.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--compare-packing", "2", "--warmup", "1",
           "--threads", "1", "--out-dir", str(tmp_path), "--tag", "t", "--json", str(out),
           "rollout.max_new_tokens=12", "optim.grad_accum_steps=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["rounds"] == 2 and s["packed_s"] > 0 and s["padded_s"] > 0 and s["ratio_p50"] > 0
    assert s["loss_packed"] == pytest.approx(s["loss_padded"], rel=1e-4, abs=1e-6)
    assert s["logprob_max_abs_diff"] <= 1e-4 and s["dtype"] == "float32"
    assert s["packed_kernel"] == "sdpa_per_sequence" and s["sequences"] == 8
    assert s["tokens"] <= s["padded_positions"]
    assert "packed / padded" in (tmp_path / "packing_t.md").read_text() and (tmp_path / "packing_t.csv").exists()
