"""The README's "Will it fit?" table: mrpo.plan for the three paper recipes on 1 / 4 / 8 GPUs of 80 GiB, full
fine-tuning and LoRA (lora.rank=64), as a markdown table.

    python benchmarks/plan_table.py [--gpu-mem-gib 80] [--gpus 1 4 8] > table.md
"""
from __future__ import annotations

import argparse
import sys

RECIPES = ["configs/qwen2_5_vl_7b_mrpo.yaml", "configs/qwen3_vl_8b_mrpo.yaml", "configs/internvl3_8b_mrpo.yaml"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 4, 8])
    args = ap.parse_args(argv)

    from mrpo.config import REPO_ROOT, load_config
    from mrpo.plan import GiB, find_knobs, make_plan, model_shape, resolve_model_config

    print(f"| recipe | LoRA | GPUs | rollout | logprobs | train | fits {args.gpu_mem_gib:g} GiB | "
          "cheapest knob that fits |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in RECIPES:
        for lora in (False, True):
            cfg = load_config(REPO_ROOT / recipe, ["lora.rank=64"] if lora else [])
            hf_config, source = resolve_model_config(cfg)
            shape = model_shape(cfg, hf_config, source)
            for gpus in args.gpus:
                plan = make_plan(cfg, gpus, args.gpu_mem_gib, shape)
                knob = ""
                if not plan.fits:
                    good = [k for k in find_knobs(cfg, plan) if k["fits"]]
                    knob = f"{good[0]['knob'].split(' (')[0]} ({good[0]['peak_gib']:.1f})" if good else "none"
                cells = " | ".join(f"{plan.phases[p].peak / GiB:.1f}" for p in ("rollout", "logprobs", "train"))
                print(f"| {recipe.split('/')[-1]} | {'r=64' if lora else 'no'} | {gpus} | {cells} | "
                      f"{'yes' if plan.fits else '**no**'} | {knob} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
