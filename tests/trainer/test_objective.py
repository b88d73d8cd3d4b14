"""One objective whatever the batch layout: the same 16 completions as 1x16, 2x8, 4x4 micro-batches on one
rank and as 2 ranks x 2x4 under FSDP2 give the same gradients, for every loss aggregation; global
advantages (GDPO, GRPO scale=batch) are the same on 2 ranks as on 1."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .objective_worker import AGGS, build_trainer, fixed_rollout, global_advantages, layout_gradients

WORKER = Path(__file__).with_name("objective_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_rank(shared_data, tmp_path_factory):
    trainer = build_trainer(shared_data, tmp_path_factory.mktemp("objective") / "run")
    rollout = fixed_rollout(trainer, 0, 1)
    grads = {agg: {size: layout_gradients(trainer, rollout, agg, size) for size in (16, 8, 4)} for agg in AGGS}
    advantages = global_advantages(trainer, 0, 1)
    trainer.close()
    return grads, advantages


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("agg", AGGS)
def test_gradients_do_not_depend_on_micro_batching(one_rank, agg):
    grads, _ = one_rank
    assert_same(grads[agg][16], grads[agg][8], f"{agg} 1x16 vs 2x8")
    assert_same(grads[agg][16], grads[agg][4], f"{agg} 1x16 vs 4x4")
    assert any(g.abs().sum() > 0 for g in grads[agg][16].values())


def test_aggregations_differ(one_rank):
    """The three aggregations are different objectives (the layout tests above are not vacuous)."""
    grads, _ = one_rank
    name = next(iter(grads["token-mean"][16]))
    a, b, c = (grads[agg][16][name] for agg in AGGS)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(one_rank, shared_data, tmp_path):
    grads, advantages = one_rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), str(tmp_path), str(shared_data)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "returned a view tensor" not in run.stderr      # the pass-through head hands FSDP2 an owned tensor
    two = torch.load(tmp_path / "rank0.pt")
    for agg in AGGS:
        assert_same(grads[agg][16], two["grads"][agg], f"{agg}: 1 rank vs 2 ranks")
    for method in ("gdpo", "grpo"):
        torch.testing.assert_close(advantages[method], two["advantages"][method], rtol=0, atol=1e-6)


def _torchrun_or_kill(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """torchrun in its own session; on timeout the whole process group is killed (a hang fails the test
    instead of leaving workers behind)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_unequal_token_budget_splits_finish_with_the_same_gradients(shared_data, tmp_path, engine):
    """See microbatch_worker.py: a token budget giving the 2 ranks different micro-batch counts finishes
    (old, reference and loss passes) and its gradients and log-probs equal the count split's."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    run = _torchrun_or_kill([str(WORKER.with_name("microbatch_worker.py")), str(tmp_path), str(shared_data), engine],
                            timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count(" ok: budget") == 2, run.stdout
