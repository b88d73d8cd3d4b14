"""Train-step benchmark: tokens/s, per-phase time and peak memory of full MRPO steps.

    python benchmarks/bench_step.py                           # tiny default (configs/tiny_cpu.yaml), CPU
    python benchmarks/bench_step.py --steps 5 --sft-steps 30  # SFT warm-up first, so rollouts have steps
    python benchmarks/bench_step.py --config configs/qwen2_5_vl_7b_mrpo.yaml model.path=/models/qwen  # GPU

One step = rollout (generate G completions per prompt) -> judge + rewards + advantages -> old/ref
log-probs (only when algo.num_iterations > 1 or loss.beta > 0) -> fused loss + backward per micro-batch
-> optimizer. The phase times come from `Trainer.train_step`'s metrics ("time/generate", "time/judge",
"time/logprobs", "time/loss_backward", "time/optimizer", "time/step"); tokens/s counts generated
completion tokens per second of the whole step.
Runs single-process (no torchrun) with checkpoints, evaluation, TensorBoard and progress bars off and
outputs in a temporary folder. Peak memory: on CUDA max allocated during the steps above what the
set-up and warm-up steps left allocated; on CPU the peak RSS during the measured steps above the RSS
after the warm-up steps (`/proc/self/clear_refs`; memory glibc kept from the warm-up counts in the
baseline), and the absolute peak RSS.
Writes benchmarks/results/step_<tag>.csv (same long format as the loss benchmark), step_<tag>.md and
step_<tag>.png (phase breakdown).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PHASES = ["generate", "judge", "logprobs", "loss_backward", "optimizer"]


def _text_dims(model) -> tuple[int | str, int | str]:
    """(vocab size V, hidden size D) of the language model, '' when not found."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "vocab_size", ""), getattr(text, "hidden_size", "")


def _rss_kib(key: str) -> int:
    return common._proc_status_kib(key)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML config (default: configs/tiny_cpu.yaml)")
    ap.add_argument("--steps", type=int, default=3, help="measured RL steps")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured RL steps first")
    ap.add_argument("--sft-steps", type=int, default=0,
                    help="supervised warm-up steps before the RL steps (0: rollouts of an untrained model "
                         "rarely contain reasoning steps, so the judge phase is nearly empty)")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (default: all cores; on a shared, loaded machine use 1: "
                         "OpenMP threads of tiny ops spin and wait for each other when cores are taken)")
    ap.add_argument("--tag", help="output name: results/step_<tag>.* (default: <device>_<config name>)")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_new_tokens=64")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="mrpo_bench_step_")
    try:
        run(args, work, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: str, argv=None) -> None:
    """Set up the trainer under `work`, run warm-up and measured steps, write the results."""
    from mrpo.config import load_config
    from mrpo.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    forced = [f"output_dir={work}/run", "logging.tensorboard=false", "logging.progress=false",
              "logging.eval_at_end=false", "logging.eval_every=0", "checkpoint.every_steps=0",
              f"sft.steps={args.sft_steps}", "distributed.engine=none"]
    if not any(o.lstrip("-").startswith("data.synthetic_dir=") for o in args.overrides):
        # synthetic data and the tiny model are generated under synthetic_dir: keep them out of the repo
        forced.append(f"data.synthetic_dir={work}/data/synthetic")
    cfg = load_config(args.config, forced + list(args.overrides))
    config_name = Path(args.config).stem if args.config else "tiny_cpu"
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or f"{device_kind}_{config_name}"

    t_setup = time.perf_counter()
    trainer = Trainer(cfg)
    if args.sft_steps:
        trainer.sft_warmup()
    t_setup = time.perf_counter() - t_setup
    V, D = _text_dims(trainer.model)
    dev = trainer.device
    print(f"bench_step: {common.device_name(str(dev))}, config {args.config or 'configs/tiny_cpu.yaml'}, "
          f"{trainer.completions_per_rank} completions/step (G={cfg.rollout.group_size}), "
          f"max_new_tokens={cfg.rollout.max_new_tokens}, V={V}, D={D}, set-up {t_setup:.1f} s, "
          f"load average {common.load_average()}", flush=True)

    for _ in range(args.warmup):
        trainer.train_step()
        trainer.step += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc

        gc.collect()
        common.reset_peak_rss()
        base_mem = _rss_kib("VmRSS") * 1024
    steps = []
    for i in range(args.steps):
        m = trainer.train_step()
        trainer.step += 1
        steps.append(m)
        phases = ", ".join(f"{p} {m.get('time/' + p, float('nan')):.2f}" for p in PHASES)
        print(f"  step {i + 1}/{args.steps}: {m['time/step']:.2f} s ({phases}), "
              f"{m['tokens_per_s']:.0f} tok/s, {m['completion_len']:.0f} tokens/completion, "
              f"reward {m['reward']:.3f}", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base_mem
        peak_abs = torch.cuda.max_memory_allocated()
    else:
        peak_abs = _rss_kib("VmHWM") * 1024
        peak_extra = peak_abs - base_mem
    trainer.close()

    ver = common.versions()
    meta = {"kernel": "train_step", "provider": f"{cfg.algo.name}-{cfg.model.family}", "mode": "step",
            "x_name": "completions_per_step", "x_value": trainer.completions_per_rank, "V": V, "D": D,
            "dtype": cfg.model.dtype, "device": common.device_name(str(dev)), **ver,
            "timestamp": common.timestamp()}
    note = (f"config={config_name}; G={cfg.rollout.group_size}; max_new_tokens={cfg.rollout.max_new_tokens}; "
            f"num_iterations={cfg.algo.num_iterations}; sft_steps={args.sft_steps}; steps={args.steps}; "
            f"load={common.load_average()}")
    rows = []

    def add(metric, unit, values):
        vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if vals:
            p50, p20, p80 = common.quantiles(vals)
            rows.append({**meta, "metric": metric, "unit": unit, "p50": p50, "p20": p20, "p80": p80, "note": note})

    for p in PHASES + ["step"]:
        add(f"time/{p}", "s", [m.get(f"time/{p}") for m in steps])
    add("tokens_per_s", "tok/s", [m.get("tokens_per_s") for m in steps])
    add("completion_len", "tokens", [m.get("completion_len") for m in steps])
    mem_kind = "CUDA max allocated" if dev.type == "cuda" else "peak RSS"
    rows.append({**meta, "metric": "peak_mem_extra", "unit": "MiB", "p50": peak_extra / 2 ** 20,
                 "p20": peak_extra / 2 ** 20, "p80": peak_extra / 2 ** 20, "note": f"{mem_kind} above set-up; {note}"})
    rows.append({**meta, "metric": "peak_mem", "unit": "MiB", "p50": peak_abs / 2 ** 20,
                 "p20": peak_abs / 2 ** 20, "p80": peak_abs / 2 ** 20, "note": f"{mem_kind} absolute; {note}"})

    out_dir = Path(args.out_dir)
    csv_path = common.write_csv(out_dir / f"step_{tag}.csv", rows)
    med = {r["metric"]: r["p50"] for r in rows}
    total = med.get("time/step", float("nan"))
    lines = [f"# Train-step benchmark: {meta['device']}", "",
             f"`python benchmarks/bench_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`")
             + f" at {meta['timestamp']}; torch {ver['torch']}; {note}.", "",
             "| phase | p50 s | share |", "|---|---|---|"]
    for p in PHASES:
        t = med.get(f"time/{p}", float("nan"))
        lines.append(f"| {p} | {t:.3f} | {t / total:.0%} |")
    lines += [f"| **step** | {total:.3f} | 100% |", "",
              f"Tokens/s (generated): {med.get('tokens_per_s', float('nan')):.1f}; "
              f"tokens/completion: {med.get('completion_len', float('nan')):.0f}; "
              f"peak memory above set-up: {peak_extra / 2 ** 20:.0f} MiB ({mem_kind}; absolute "
              f"{peak_abs / 2 ** 20:.0f} MiB)."]
    md_path = out_dir / f"step_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    png_path = _plot(med, out_dir / f"step_{tag}.png", f"{meta['provider']}, {meta['device']}")
    print("\n".join(lines))
    print(f"bench_step: wrote {csv_path}, {md_path}, {png_path}")


def _plot(med: dict, path: Path, title: str) -> Path:
    """Horizontal stacked bar of the p50 phase times of one step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.2))
    left = 0.0
    for p in PHASES:
        t = med.get(f"time/{p}", 0.0)
        if t and math.isfinite(t):
            ax.barh([0], [t], left=left, label=f"{p} {t:.2f} s")
            left += t
    ax.set_yticks([])
    ax.set_xlabel("seconds per RL step (p50 per phase)")
    ax.set_title(title, fontsize=9, pad=28)
    ax.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
