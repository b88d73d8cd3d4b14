"""Reference policy under an engine (argv: OUT DATA ENGINE [LORA_RANK]): after one optimizer step, the
reference log-probs the trainer computes (frozen sharded copy, or the policy with LoRA adapters disabled)
equal those of a separately loaded, unsharded copy of the initial model, the policy's differ, and the
loss's KL term is > 0. Runs in-process (one rank) or under torchrun (2 ranks)."""
import sys
from pathlib import Path

import torch
from mrpo_kernels import linear_logprobs, mrpo_loss

from mrpo.models.load import load_backbone
from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head

from objective_worker import build_trainer, fixed_rollout  # noqa: E402  (same folder)


def unsharded_logprobs(path, trainer, rollout) -> list[torch.Tensor]:
    fresh = load_backbone(path)
    install_passthrough_head(fresh.model)
    fresh.model.eval()
    out = []
    with torch.no_grad(), hidden_states_mode(fresh.model):
        for i, ids in enumerate(rollout.completion_ids):
            batch = fresh.select_rows(rollout.prompts, [rollout.prompt_row[i]])
            hidden, targets, _ = fresh.completion_hidden_states(batch, [ids])
            out.append(linear_logprobs(hidden, fresh.lm_head_weight, targets, temperature=trainer.cfg.loss.temperature))
    return out


def main(out: str, data_dir: str, engine: str, lora_rank: str = "0") -> None:
    trainer = build_trainer(data_dir, Path(out) / "run", **{"loss.beta": 0.1, "distributed.engine": engine,
                                                             "lora.rank": int(lora_rank), "optim.lr": 0.05})
    assert (trainer.ref_model is None) == (int(lora_rank) > 0), "LoRA: no second copy of the weights"
    rollout = fixed_rollout(trainer, trainer.rank, trainer.world)
    rollout.ref_logprobs = trainer.reference_logprobs(rollout)   # = the policy's before any update
    trainer.accumulate_gradients(rollout, trainer.step_token_weights(rollout), trainer.micro_batches(rollout))
    norm, applied = trainer.engine.step()
    assert applied and norm > 0, (norm, applied)
    rollout.ref_logprobs = trainer.reference_logprobs(rollout)
    expected = unsharded_logprobs(trainer.model_path, trainer, rollout)
    for got, want in zip(rollout.ref_logprobs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    policy = trainer.logprobs(trainer.model, rollout)
    assert max((p - r).abs().max().item() for p, r in zip(policy, rollout.ref_logprobs)) > 1e-3, "policy moved"
    seqs = list(range(len(rollout.completion_ids)))
    hidden, weight = trainer.hidden_states(trainer.model, rollout, seqs)
    with torch.no_grad():
        _, m = mrpo_loss(hidden.detach(), weight.detach(), rollout.loss_inputs(seqs, None, trainer.device),
                         beta=0.1, temperature=trainer.cfg.loss.temperature)
    assert m["kl"].item() > 0, m["kl"]
    if trainer.engine.name == "deepspeed":
        trainer.engine.backward(hidden.sum() * 0)   # release the lm_head weight gathered for the forward
    print(f"rank {trainer.rank} ok", flush=True)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
