"""bf16 policy under FSDP2 (argv: OUT DATA; torchrun, 2 ranks): the sharded trainable parameters are fp32
master weights, so one AdamW step at lr 1e-6 moves (nearly) every weight, where AdamW on bf16 weights
would round almost every update away; the export is in model.dtype. Prints "rank R ok"."""
import sys
from pathlib import Path

import torch

from objective_worker import build_trainer, fixed_rollout  # noqa: E402  (same folder)

NAME = "model.language_model.layers.0.mlp.up_proj.weight"


def full(param) -> torch.Tensor:
    return param.full_tensor().detach().clone() if hasattr(param, "full_tensor") else param.detach().clone()


def main(out: str, data_dir: str) -> None:
    trainer = build_trainer(data_dir, Path(out) / "run", **{"model.dtype": "bfloat16", "optim.lr": 1e-6})
    assert trainer.engine.name == "fsdp2"
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    before = full(params[NAME])
    rollout = fixed_rollout(trainer, trainer.rank, trainer.world)
    trainer.accumulate_gradients(rollout, trainer.step_token_weights(rollout), trainer.micro_batches(rollout))
    norm, applied = trainer.engine.step()
    assert applied and norm > 0
    after = full(params[NAME])
    moved = (after != before).float().mean().item()
    assert moved > 0.9, moved
    rounded = (after.bfloat16() != before.bfloat16()).float().mean().item()   # what bf16 weights would keep
    assert rounded < 0.2, rounded
    state = trainer.engine.full_state_dict()
    if trainer.rank == 0:
        assert state[NAME].dtype == torch.bfloat16
    print(f"rank {trainer.rank} ok: {moved:.3f} of the weights moved in fp32, {rounded:.3f} visible in bf16",
          flush=True)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
