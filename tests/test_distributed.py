"""Step metrics and warnings over ranks: failure counts are summed (not averaged), each warning is printed
once by rank 0 (not once per rank)."""
import os
import subprocess
import sys
from pathlib import Path

from mrpo.distributed import merge_warnings

REPO = Path(__file__).resolve().parents[1]


def test_merge_warnings_one_line_per_warning():
    custom = "custom rewards: %d of %d calls failed on %d completions, their values are missing: %s"
    per_rank = [
        [("mrpo.rewards.custom", 30, custom, "custom rewards: 1 of 1 calls failed on 8 completions: boom"),
         ("mrpo.judges.http", 30, "HTTPJudge: %d of %d requests unjudged", "HTTPJudge: 2 of 8 requests unjudged")],
        [("mrpo.rewards.custom", 30, custom, "custom rewards: 1 of 1 calls failed on 8 completions: boom"),
         ("mrpo.judges.http", 30, "HTTPJudge: %d of %d requests unjudged", "HTTPJudge: 5 of 8 requests unjudged")],
    ]
    assert merge_warnings(per_rank) == [
        ("mrpo.rewards.custom", 30, "custom rewards: 1 of 1 calls failed on 8 completions: boom [ranks 0, 1]"),
        ("mrpo.judges.http", 30,
         "[rank 0] HTTPJudge: 2 of 8 requests unjudged; [rank 1] HTTPJudge: 5 of 8 requests unjudged"),
    ]
    # a warning of one rank alone is still printed (by rank 0), naming that rank
    assert merge_warnings([[], [("mrpo", 30, "x %s", "x y")]]) == [("mrpo", 30, "x y [ranks 1]")]


WORKER = r'''
import logging, sys
import torch, torch.distributed as dist
from mrpo.distributed import all_reduce_mean, warnings_once
from mrpo.rewards import COUNT_METRICS

logging.basicConfig(level=logging.INFO, format="R%(process)d %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
dist.init_process_group("gloo")
rank = dist.get_rank()
device = torch.device("cpu")
custom = logging.getLogger("mrpo.rewards.custom")
with warnings_once(device):
    custom.warning("custom rewards: %d of %d calls failed: %s", 1, 1, "'r' exception: raised ValueError: bad")
    logging.getLogger("mrpo.judges.http").warning("HTTPJudge: %d of %d requests unjudged", rank + 2, 8)
    logging.getLogger("mrpo").info("info lines are not held (rank %d)", rank)
with warnings_once(device):   # a step without warnings: nothing gathered, nothing printed
    pass
metrics = {"reward_failed/r/exception": 8.0 * (rank + 1), "unjudged/timeout": float(rank), "judge_sent": 8.0,
           "reward": 1.0 + rank, "reward/r": float("nan") if rank else 0.5}
out = all_reduce_mean(metrics, device, summed=COUNT_METRICS)
open(f"rank{rank}.txt", "w").write(f"metrics {sorted(out.items())}")   # not stdout: ranks' lines interleave
dist.destroy_process_group()
'''


def test_counts_summed_and_warnings_printed_once_on_two_ranks(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    custom = [x for x in lines if "custom rewards:" in x]
    assert len(custom) == 1 and custom[0].endswith("raised ValueError: bad [ranks 0, 1]"), lines
    http = [x for x in lines if "HTTPJudge" in x]
    assert len(http) == 1 and "[rank 0] HTTPJudge: 2 of 8" in http[0] and "[rank 1] HTTPJudge: 3 of 8" in http[0]
    assert sum("info lines are not held" in x for x in lines) == 2
    expected = ("metrics [('judge_sent', 16.0), ('reward', 1.5), ('reward/r', 0.5), "
                "('reward_failed/r/exception', 24.0), ('unjudged/timeout', 1.0)]")
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == expected
