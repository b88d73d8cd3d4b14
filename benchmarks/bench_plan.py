"""Planned vs measured memory of each phase of one RL step (issue 23): the mrpo.plan figure of the shapes
the step really ran against the CUDA allocator's peak per phase (torch.cuda.max_memory_allocated, reset at
each phase), or on CPU against the LiveBytes peak (mrpo.plan_measure).

    python benchmarks/bench_plan.py --json OUT.json [--config FILE] [key=value ...]

Writes {"device", "params_total", "phases": {phase: {"planned_gib", "measured_gib", "error"}}, "plan": the
full plan JSON}. loss.packing=false is forced: the plan counts every sequence at its padded length, which
packing only undercuts (the plan is then an upper bound), and data.max_pixels=3136, the synthetic images' size
(the plan counts every image at data.max_pixels).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="result file")
    ap.add_argument("--config", help="run config (default configs/tiny_cpu.yaml)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from mrpo.config import load_config
    from mrpo.plan import GiB, PHASES
    from mrpo.plan import first_step_vs_plan
    from mrpo.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="mrpo_bench_plan_")
    forced = [f"output_dir={work}/run", f"data.synthetic_dir={work}/data/synthetic", "logging.tensorboard=false",
              "logging.progress=false", "logging.eval_at_end=false", "logging.eval_every=0", "sft.steps=0",
              "checkpoint.every_steps=0", "distributed.engine=none", "loss.packing=false",
              "data.max_pixels=3136"]   # the synthetic images are 56 x 56: the plan counts images at max_pixels
    cfg = load_config(args.config, forced + list(args.overrides))
    trainer = Trainer(cfg)
    try:
        plan, peaks = first_step_vs_plan(trainer)
    finally:
        trainer.close()
    rows = {}
    for name in PHASES:
        planned, measured = plan.measurable_peak(name, first_step=True), peaks.get(name)
        rows[name] = {"planned_gib": round(planned / GiB, 3),
                      "measured_gib": None if measured is None else round(measured / GiB, 3),
                      "error": None if not measured else round((planned - measured) / measured, 4)}
        print(f"bench_plan {name}: planned {planned / GiB:.3f} GiB, measured "
              f"{'-' if measured is None else f'{measured / GiB:.3f} GiB'}"
              + ("" if not measured else f" ({(planned - measured) / measured:+.1%})"), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(args.json).write_text(json.dumps({"device": device, "params_total": plan.shape.params_total,
                                           "phases": rows, "plan": plan.to_json()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
