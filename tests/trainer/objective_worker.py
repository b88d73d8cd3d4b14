"""The step's objective under different batch layouts: gradients after one step's micro-batches and global
advantages, for a fixed set of 16 completions.

In-process (one rank) through `layout_gradients`, or under torchrun (2 ranks, FSDP2; each rank holds half
of the completions): `python -m torch.distributed.run --nproc_per_node=2 objective_worker.py OUT DATA`
writes OUT/rank0.pt with the full gradients per aggregation and the global advantages."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mrpo.config import load_config
from mrpo.rollout import Rollout
from mrpo.trainer import Trainer

N_COMPLETIONS, G = 16, 2
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def build_trainer(data_dir, out_dir, **extra) -> Trainer:
    overrides = {"output_dir": str(out_dir), "data.synthetic_dir": str(data_dir), "data.synthetic_train": 32,
                 "data.synthetic_test": 8, "rollout.group_size": G, "rollout.max_new_tokens": 40,
                 "optim.per_device_batch_size": 2, "optim.grad_accum_steps": 2, "sft.steps": 0,
                 "logging.progress": False, "logging.tensorboard": False, "checkpoint.resume": "none", **extra}
    return Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))


def fixed_rollout(trainer: Trainer, rank: int, world: int) -> Rollout:
    """This rank's share of 16 fixed completions (8 prompts x G=2) with varied lengths, advantages, steps."""
    per_rank = N_COMPLETIONS // world
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    prompts = [trainer.pool.records[i // G] for i in mine[::G]]
    tok = trainer.backbone.tokenizer
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(N_COMPLETIONS, generator=g)
    ids, step_index, num_steps, valid, correct = [], [], [], [], []
    for i in range(N_COMPLETIONS):
        rec = trainer.pool.records[i // G]
        text = f"<think>{rec['gold_reasoning']}</think><answer>{rec['solution']}</answer>"
        c = tok.encode(text, add_special_tokens=False)[: 5 + (7 * i) % 33]   # lengths 5..37
        k = 1 + i % 4
        ids.append(c)
        step_index.append(torch.tensor([min(t * k // len(c), k - 1) if t < len(c) - 2 else -1
                                        for t in range(len(c))], dtype=torch.int32))
        num_steps.append(k)
        valid.append(torch.rand(len(c), generator=g) > 0.5)
        correct.append(i % 3 == 0)
    rollout = Rollout(trainer.pool.encode(prompts), [j // G for j in range(per_rank)],
                      [trainer.pool.records[i // G] for i in mine], [ids[i] for i in mine])
    rollout.advantages = adv[mine]
    rollout.step_index, rollout.num_steps = [step_index[i] for i in mine], [num_steps[i] for i in mine]
    rollout.step_valid, rollout.answer_correct = [valid[i] for i in mine], [correct[i] for i in mine]
    return rollout


def layout_gradients(trainer: Trainer, rollout: Rollout, agg: str, micro_batch_size: int) -> dict:
    """Full (unsharded) gradients after one step's micro-batches, with loss_agg=agg."""
    trainer.cfg.loss.loss_agg = agg
    trainer.cfg.optim.per_device_batch_size = micro_batch_size
    trainer.engine.zero_grad()
    trainer.accumulate_gradients(rollout, trainer.step_token_weights(rollout), trainer.micro_batches(rollout))
    out = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().clone().cpu()
    trainer.engine.zero_grad()
    return out


def fixed_rewards() -> torch.Tensor:
    """[16, 3] unweighted reward columns with a NaN (unjudged) entry, as RewardModel.reward_matrix gives."""
    r = torch.rand(N_COMPLETIONS, 3, generator=torch.Generator().manual_seed(1))
    r[3, 1] = float("nan")
    return r


def global_advantages(trainer: Trainer, rank: int, world: int) -> dict:
    """Advantages of all 16 completions (each rank computes its share) for GDPO and GRPO scale=batch."""
    per_rank = N_COMPLETIONS // world
    out = {}
    for name, scale in (("gdpo", "group"), ("grpo", "batch")):
        trainer.cfg.algo.name, trainer.cfg.algo.advantage_scale = name, scale
        mine = trainer.global_advantages(fixed_rewards()[rank * per_rank:(rank + 1) * per_rank])
        everyone = [torch.empty_like(mine) for _ in range(world)] if world > 1 else [mine]
        if world > 1:
            dist.all_gather(everyone, mine)
        out[name] = torch.cat(everyone)
    return out


def main(out: str, data_dir: str) -> None:
    out = Path(out)
    trainer = build_trainer(data_dir, out / "run")
    rank, world = trainer.rank, trainer.world
    rollout = fixed_rollout(trainer, rank, world)
    result = {"grads": {agg: layout_gradients(trainer, rollout, agg, 4) for agg in AGGS},
              "advantages": global_advantages(trainer, rank, world)}
    if rank == 0:
        torch.save(result, out / "rank0.pt")
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
