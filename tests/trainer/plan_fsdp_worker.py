"""torchrun worker for tests/test_plan.py (here, not in tests/, whose kernels/ would shadow a package): one
RL step of the tiny model under FSDP2 on 2 CPU ranks with per-phase LiveBytes peaks; rank 0 writes
{phase: [planned, measured]} and the plan's terms to argv[1]."""
import json
import sys

import torch


def main(out: str, work: str) -> None:
    from mrpo.config import REPO_ROOT, load_config
    from mrpo.plan import first_step_vs_plan
    from mrpo.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(REPO_ROOT / "configs" / "tiny_cpu.yaml", [
        f"output_dir={work}/run", f"data.synthetic_dir={work}/data/synthetic", "data.synthetic_train=32",
        "data.synthetic_test=4", "sft.steps=0", "optim.max_steps=1", "logging.eval_at_end=false",
        "logging.eval_at_start=false", "logging.eval_every=0", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every_steps=0", "checkpoint.export_final=false", "data.max_pixels=3136", "loss.packing=false",
        "rollout.max_new_tokens=24", "optim.per_device_batch_size=4", "optim.grad_accum_steps=2",
        "rollout.group_size=4", "distributed.engine=fsdp2", "loss.beta=0.04"])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    try:
        plan, peaks = first_step_vs_plan(trainer)
    finally:
        trainer.close()
    if trainer.rank == 0:
        result = {name: [plan.measurable_peak(name, first_step=True), peaks[name]] for name in peaks}
        result["terms"] = {name: ph.terms for name, ph in plan.phases.items()}
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
