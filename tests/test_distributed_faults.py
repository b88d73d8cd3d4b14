"""mrpo.distributed's fault channel on two gloo ranks (torchrun, no model): a wait longer than the collective
timeout, and one rank's failure ending the other while it is stuck where no collective error could reach it."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time
import torch, torch.distributed as dist
from mrpo import distributed
distributed.init_process_group("gloo", timeout_s=3)
rank = dist.get_rank()
if rank == 1:
    time.sleep(6)                                   # twice the collective timeout
distributed.wait_for_all_ranks("slow judge")
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank{rank} waited, sum {t.item():.0f}", flush=True)
if rank == 1:
    try:
        raise ValueError("boom on rank 1")
    except ValueError as e:
        distributed.report_failure(e, exit_after_s=3)
    print(f"rank1 reported at {time.time():.3f}", flush=True)
time.sleep(60)   # rank 0: stands in for an NCCL collective that never returns; rank 1: a teardown that blocks
print(f"rank{rank} not ended", flush=True)
"""


def test_slow_wait_then_one_rank_failure_ends_the_other(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    ended = time.time()
    out = run.stdout + run.stderr
    assert "rank0 waited, sum 2" in out and "rank1 waited, sum 2" in out, out[-3000:]
    reported = float(re.search(r"rank1 reported at ([\d.]+)", out).group(1))
    assert ended - reported < 20 and "not ended" not in out                # not the 60 s sleep
    assert "rank 0: ending because rank 1 (host " in out and "failed: ValueError: boom on rank 1" in out
    assert "rank 1's traceback:" in out and 'raise ValueError("boom on rank 1")' in out   # printed by rank 0
    assert "rank 1: teardown after the failure took over 3 s; ending now" in out
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", run.stderr))
    assert codes == {"0": "71", "1": "1"}, out[-3000:]
    assert ended - t0 < 90
