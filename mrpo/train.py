"""Entry point: `torchrun --standalone --nproc_per_node=2 -m mrpo.train [--config FILE] [key=value ...]`.

With no arguments it runs the embedded default (configs/tiny_cpu.yaml): a tiny Qwen2.5-VL-shaped model on
generated medical VQA, on CPU: supervised warm-up, MRPO with the rule judge, held-out evaluation.
"""
from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from mrpo.config import ConfigError, parse_args

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrpo").setLevel(logging.INFO)   # our progress lines; libraries stay at WARNING
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print("resolved config:\n" + cfg.to_yaml(), flush=True)

    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None and not torch.cuda.is_available():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    from mrpo.trainer import Trainer

    trainer = Trainer(cfg)
    hook = os.environ.get("MRPO_TEST_HOOK")   # "module:function" called with the trainer (fault-injection tests)
    if hook:
        import importlib

        module, _, name = hook.partition(":")
        getattr(importlib.import_module(module), name)(trainer)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    if rank == 0:
        keys = ["step", "reward", "accuracy", "early_failure_share", "eval/accuracy", "eval/early_failure_share"]
        print("done: " + ", ".join(f"{k}={final[k]:.4g}" if isinstance(final.get(k), float) else f"{k}={final.get(k)}"
                                   for k in keys if k in final), flush=True)
        print(f"outputs in {cfg.output_dir}: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, "
              f"final_model/, eval/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
