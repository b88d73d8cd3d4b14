"""Unequal micro-batch splits over 2 ranks (argv: OUT DATA ENGINE [key=value ...]), under torchrun with FSDP2
or ZeRO-3; extra config overrides (e.g. model.gradient_checkpointing=true lora.rank=4) are applied on top.

A token budget (loss.max_tokens_per_micro_batch) is chosen so that the two ranks' own splits give
different micro-batch counts. Every pass must still finish (each forward/backward is a sequence of
collectives; the process group's timeout turns a hang into an error) and compute what the unbudgeted
count split computes:
  - old log-probs (policy) and reference log-probs (frozen sharded copy, loss.beta > 0): equal;
  - the full gradients of one step's micro-batches (fused loss with old and reference log-probs): equal
    to 1e-6 (the shorter rank runs zero-weight filler micro-batches; the sync happens on the last one).
Prints "rank R ok" on success."""
import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mrpo.rollout import micro_batches as split

from objective_worker import build_trainer, fixed_rollout  # noqa: E402  (same folder)


def full_gradients(trainer) -> dict:
    """Unsharded gradients of every parameter (a collective: every rank calls, same order)."""
    out = {}
    for name, p in trainer.model.named_parameters():
        if trainer.engine.name == "deepspeed":
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(p)
        else:
            grad = None if p.grad is None else (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
        if grad is not None:
            out[name] = grad.detach().clone().cpu()
    trainer.engine.zero_grad()
    return out


def token_lengths(trainer, rollout) -> list[int]:
    prompt_len = rollout.prompts["attention_mask"].sum(-1).tolist()
    return [prompt_len[r] + n for r, n in zip(rollout.prompt_row, rollout.lengths)]


def unequal_budget(lengths_per_rank: list[list[int]]) -> int:
    """The largest token budget at which the ranks' own splits differ in count (few micro-batches)."""
    for budget in range(max(map(sum, lengths_per_rank)), max(map(max, lengths_per_rank)) - 1, -1):
        counts = {len(split(lengths, 10**6, budget)) for lengths in lengths_per_rank}
        if len(counts) > 1:
            return budget
    raise AssertionError("no token budget splits the ranks unequally")


def layout(trainer, budget: int, per_device: int):
    trainer.cfg.loss.max_tokens_per_micro_batch = budget
    trainer.cfg.optim.per_device_batch_size = per_device


def main(out: str, data_dir: str, engine: str, *overrides: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))   # a hang fails, not waits
    extra = dict(o.split("=", 1) for o in overrides)
    trainer = build_trainer(data_dir, Path(out) / "run", **{"distributed.engine": engine, "loss.beta": 0.1, **extra})
    rank, world = trainer.rank, trainer.world
    assert world == 2 and trainer.engine.name == engine
    rollout = fixed_rollout(trainer, rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, token_lengths(trainer, rollout))
    budget = unequal_budget(everyone)

    layout(trainer, 0, 4)   # the reference: 2 micro-batches of 4 on each rank
    old, ref = trainer.logprobs(trainer.model, rollout), trainer.reference_logprobs(rollout)
    rollout.old_logprobs, rollout.ref_logprobs = old, ref
    weights = trainer.step_token_weights(rollout)
    micro = trainer.micro_batches(rollout)
    assert [mb.filler for mb in micro] == [False, False]
    trainer.accumulate_gradients(rollout, weights, micro)
    expected = full_gradients(trainer)

    layout(trainer, budget, 8)   # split by tokens alone: the ranks' counts differ
    micro = trainer.micro_batches(rollout)
    real = [len(split(lengths, 8, budget)) for lengths in everyone]
    assert real[0] != real[1] and len(micro) == max(real), (real, len(micro))
    assert sum(not mb.filler for mb in micro) == real[rank] and all(mb.filler for mb in micro[real[rank]:])
    for got, want in ((trainer.logprobs(trainer.model, rollout), old), (trainer.reference_logprobs(rollout), ref)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    sums = trainer.accumulate_gradients(rollout, weights, micro)
    assert torch.isfinite(sums).all()
    budgeted = full_gradients(trainer)

    assert budgeted.keys() == expected.keys() and expected
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name, want in expected.items():
        torch.testing.assert_close(budgeted[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    print(f"rank {rank} ok: budget {budget}, real micro-batches per rank {real}", flush=True)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
