"""Train-step benchmark: tokens/s, per-phase time and peak memory of full MRPO steps.

    python benchmarks/bench_step.py                           # tiny default (configs/tiny_cpu.yaml), CPU
    python benchmarks/bench_step.py --steps 5 --sft-steps 30  # SFT warm-up first, so rollouts have steps
    python benchmarks/bench_step.py --config configs/qwen2_5_vl_7b_mrpo.yaml model.path=/models/qwen  # GPU
    python benchmarks/bench_step.py --compare-packing 10 --threads 1   # packed vs padded loss+backward

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
step_<tag>.png (phase breakdown); with --json PATH also a JSON summary (schema: `summary_json`).

Probes (measured from what the trainer actually runs, over the measured steps):
- padding_fraction: padded positions / all positions of the training forwards (every forward of the
  policy or reference model made inside `Trainer.hidden_states`, i.e. loss, old and reference
  log-probs): a forward pre-hook reads the input ids and the 2-D attention mask the model receives
  (zeros = padding; a packed forward without a 2-D mask counts no padding).
- allgathers_per_rollout: calls of torch.distributed.all_gather_single / all_gather_into_tensor
  (whichever exist; FSDP2's parameter all-gathers) during the rollout (`sample_groups`: the engine's
  generation() context and generate), per step on rank 0; "n/a" on one process (nothing is sharded).
- decode_ms_per_token: wall ms of each `Backbone.generate` call / its decode steps (the longest
  completion of the call), i.e. ms per decoded position of the whole batch, prefill included.

    torchrun is used for --nproc > 1 (FSDP2, distributed.engine=fsdp2): every rank runs this script;
    rank 0 writes the outputs.

--compare-packing R: after the warm-up steps, the loss + backward phase (Trainer.accumulate_gradients:
the forward of every micro-batch, the fused loss and the backward, no optimizer step) of the last warm-up
rollout, R rounds with loss.packing true and false interleaved in one process (the order alternates per
round, so load from other processes hits both alike). Reports the p50 wall and CPU seconds of each, the
p50 of the per-round packed / padded ratios, the loss of both (equal up to float rounding), the packed
attention kernel that ran and the largest difference of the rollout's per-token log-probs between the
two forwards (no gradients, the model's dtype: bf16 on a GPU run); writes
results/packing_<tag>.{csv,md} and, with --json, the same numbers as JSON (packed_s / padded_s: p50 wall s
of one loss + backward of the rollout; ratio_p50 / p20 / p80 per round; cpu_ratio_p50; loss_packed /
loss_padded; packed_kernel, dtype, logprob_max_abs_diff; sequences, tokens, padded_positions). No RL
step is measured.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--json", metavar="PATH", help="also write the JSON summary here (see summary_json)")
    ap.add_argument("--compare-packing", type=int, default=0, metavar="R",
                    help="instead of measuring steps: R interleaved rounds of packed vs padded loss+backward "
                         "on one rollout (see the module docstring)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes (torchrun, FSDP2 engine); 1 = this process, single engine")
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)   # set by the --nproc launcher for its ranks
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_new_tokens=64")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    if argv is None and "MRPO_BENCH_STEP_ARGV" in os.environ and "LOCAL_RANK" in os.environ:
        argv = json.loads(os.environ["MRPO_BENCH_STEP_ARGV"])   # a rank started by launch()
    args = parse_args(argv)
    args.shown_argv = _shown_argv(sys.argv[1:] if argv is None else argv)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        launch(args, argv)
        return
    if args.work_dir:   # a rank of a --nproc run: the launcher owns (and removes) the folder
        run(args, args.work_dir, argv)
        return
    work = tempfile.mkdtemp(prefix="mrpo_bench_step_")
    try:
        run(args, work, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shown_argv(argv: list[str]) -> list[str]:
    """The command line as the user typed it (without the launcher's --work-dir)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--work-dir":
            skip = True
        elif not a.startswith("--work-dir="):
            out.append(a)
    return out


def launch(args, argv=None) -> None:
    """Re-run this script under torchrun with args.nproc ranks sharing one temporary folder."""
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    work = tempfile.mkdtemp(prefix="mrpo_bench_step_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve())]
    # the ranks' arguments travel in the environment: torchrun's own parser would take e.g. --nproc
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(args.threads or 1)),
               MRPO_BENCH_STEP_ARGV=json.dumps([*argv, "--work-dir", work]))
    try:
        rc = subprocess.run(cmd, env=env).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rc:
        raise SystemExit(f"bench_step: torchrun with {args.nproc} processes failed (exit {rc})")


class StepProbe:
    """Counters over the measured steps: padded / all positions of the training forwards, FSDP2
    all-gathers per rollout and decode time per token (see the module docstring)."""

    def __init__(self, trainer):
        import torch.distributed as dist

        import mrpo.trainer as trainer_mod

        self.active = False
        self.in_train_forward = False
        self.padded = self.positions = 0
        self.rollout_gathers: list[int] = []
        self.decode_ms: list[float] = []
        self._gathers = 0
        self._undo = []
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                self._patch(dist, name, self._counting(getattr(dist, name)))
        sample_groups = trainer_mod.sample_groups

        def probed_sample_groups(*a, **k):
            before = self._gathers
            out = sample_groups(*a, **k)
            if self.active:
                self.rollout_gathers.append(self._gathers - before)
            return out

        self._patch(trainer_mod, "sample_groups", probed_sample_groups)
        hidden_states = trainer.hidden_states

        def probed_hidden_states(*a, **k):
            self.in_train_forward = True
            try:
                return hidden_states(*a, **k)
            finally:
                self.in_train_forward = False

        self._patch(trainer, "hidden_states", probed_hidden_states)
        import mrpo.decoding as decoding

        generate, dev = decoding.generate, trainer.device

        def probed_generate(*a, **k):   # every rollout / evaluation call, our loop or generate
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate(*a, **k)   # returns host lists: already synchronised
            steps = max((len(c) for c in out.completion_ids), default=0)
            if self.active and steps:
                self.decode_ms.append(1e3 * (time.perf_counter() - t0) / steps)
            return out

        self._patch(decoding, "generate", probed_generate)
        models = [m for m in (trainer.model, getattr(trainer, "ref_model", None)) if m is not None]
        from torch.distributed.fsdp import FSDPModule

        self.fsdp_units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
        self._hooks = [m.register_forward_pre_hook(self._count_padding, with_kwargs=True) for m in models]

    def _patch(self, obj, name, value) -> None:
        self._undo.append((obj, name, getattr(obj, name), name in vars(obj)))
        setattr(obj, name, value)

    def _counting(self, original):
        def counting(*args, **kwargs):
            self._gathers += 1
            return original(*args, **kwargs)

        return counting

    def _count_padding(self, module, args, kwargs):
        if not (self.active and self.in_train_forward):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"][..., 0]
        if ids is None:
            return None
        mask = kwargs.get("attention_mask")
        self.positions += ids.numel()
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == ids.shape:
            self.padded += int((mask == 0).sum())   # one host sync per forward, measured steps only
        return None

    @property
    def padding_fraction(self) -> float:
        return self.padded / self.positions if self.positions else float("nan")

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for obj, name, value, own in reversed(self._undo):
            if own:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def run(args, work: str, argv=None) -> None:
    """Set up the trainer under `work`, run warm-up and measured steps, write the results."""
    from mrpo.config import load_config
    from mrpo.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    forced = [f"output_dir={work}/run", "logging.tensorboard=false", "logging.progress=false",
              "logging.eval_at_end=false", "logging.eval_every=0", "checkpoint.every_steps=0",
              f"sft.steps={args.sft_steps}", f"distributed.engine={'fsdp2' if world > 1 else 'none'}"]
    if not any(o.lstrip("-").startswith("data.synthetic_dir=") for o in args.overrides):
        # synthetic data and the tiny model are generated under synthetic_dir: keep them out of the repo
        forced.append(f"data.synthetic_dir={work}/data/synthetic")
    cfg = load_config(args.config, forced + list(args.overrides))
    config_name = Path(args.config).stem if args.config else "tiny_cpu"
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or f"{device_kind}_{config_name}" + (f"_np{world}" if world > 1 else "")

    t_setup = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.phase_memory.stop()   # its per-phase peak resets would clear this benchmark's CUDA peak counter
    if args.sft_steps:
        trainer.sft_warmup()
    t_setup = time.perf_counter() - t_setup
    V, D = _text_dims(trainer.model)
    dev = trainer.device
    main_rank = trainer.rank == 0
    if not main_rank:   # only rank 0 reports
        sys.stdout = open(os.devnull, "w")
    probe = StepProbe(trainer)
    completions = trainer.prompts_per_rank * cfg.rollout.group_size   # per rank and step
    print(f"bench_step: {common.device_name(str(dev))}, config {args.config or 'configs/tiny_cpu.yaml'}, "
          f"{completions} completions/step (G={cfg.rollout.group_size}), "
          f"max_new_tokens={cfg.rollout.max_new_tokens}, V={V}, D={D}, set-up {t_setup:.1f} s, "
          f"load average {common.load_average()}", flush=True)

    if args.compare_packing:
        compare_packing(trainer, args, tag, world)
        trainer.close()
        return
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
    probe.active = True
    for i in range(args.steps):
        m = trainer.train_step()
        trainer.step += 1
        steps.append(m)
        phases = ", ".join(f"{p} {m['time/' + p]:.2f}" for p in PHASES if "time/" + p in m)
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
    probe.active = False
    probe.close()
    engine_name = trainer.engine.name
    trainer.close()
    if not main_rank:
        return

    ver = common.versions()
    meta = {"kernel": "train_step", "provider": f"{cfg.algo.name}-{cfg.model.family}", "mode": "step",
            "x_name": "completions_per_step", "x_value": completions, "V": V, "D": D,
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
    add("decode_ms_per_token", "ms", probe.decode_ms)
    add("padding_fraction", "fraction", [probe.padding_fraction])
    sharded = world > 1 and engine_name == "fsdp2"
    add("allgathers_per_rollout", "calls", probe.rollout_gathers if sharded else [])
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
             f"`python benchmarks/bench_step.py {' '.join(args.shown_argv)}`".replace(" `", "`")
             + f" at {meta['timestamp']}; torch {ver['torch']}; {note}.", "",
             "| phase | p50 s | share |", "|---|---|---|"]
    for p in PHASES:
        if f"time/{p}" not in med:   # e.g. optimizer: timed inside loss_backward by the current trainer
            continue
        t = med[f"time/{p}"]
        lines.append(f"| {p} | {t:.3f} | {t / total:.0%} |")
    lines += [f"| **step** | {total:.3f} | 100% |", "",
              f"Tokens/s (generated): {med.get('tokens_per_s', float('nan')):.1f}; "
              f"tokens/completion: {med.get('completion_len', float('nan')):.0f}; "
              f"peak memory above set-up: {peak_extra / 2 ** 20:.0f} MiB ({mem_kind}; absolute "
              f"{peak_abs / 2 ** 20:.0f} MiB).", "",
              f"Decode: {med.get('decode_ms_per_token', float('nan')):.2f} ms per decoded position "
              f"(rollout.decode={cfg.rollout.decode}); padding: {probe.padding_fraction:.1%} of the "
              f"training-forward positions ({probe.padded} of {probe.positions}); FSDP2 all-gathers per "
              f"rollout: {_gathers_text(probe.rollout_gathers, sharded)}; {world} process(es), engine "
              f"{engine_name}."]
    md_path = out_dir / f"step_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    png_path = _plot(med, out_dir / f"step_{tag}.png", f"{meta['provider']}, {meta['device']}")
    written = [p for p in (csv_path, md_path, png_path) if p is not None]
    if args.json:
        summary = summary_json(med, probe, sharded, total, meta, cfg, config_name, args, world, engine_name,
                               peak_abs, peak_extra, mem_kind, argv)
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=1) + "\n")
        written.append(json_path)
    print("\n".join(lines))
    print(f"bench_step: wrote {', '.join(str(p) for p in written)}")


def compare_packing(trainer, args, tag: str, world: int) -> dict:
    """Packed vs padded loss + backward on the same rollout, interleaved (see --compare-packing)."""
    from mrpo.models.varlen_attention import base_implementation, packed_kernel

    captured = {}
    original = trainer.accumulate_gradients

    def capture(rollout, weights, micro):
        captured.update(rollout=rollout, weights=weights, micro=micro)
        return original(rollout, weights, micro)

    trainer.accumulate_gradients = capture
    for _ in range(max(1, args.warmup)):
        trainer.train_step()
        trainer.step += 1
    trainer.accumulate_gradients = original
    rollout, weights, micro = captured["rollout"], captured["weights"], captured["micro"]
    dev, cfg = trainer.device, trainer.cfg
    configured, losses = cfg.loss.packing, {}

    def loss_backward(packed: bool):
        def run():
            cfg.loss.packing = packed
            trainer.model.zero_grad(set_to_none=True)
            sums = trainer.accumulate_gradients(rollout, weights, micro)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            losses.setdefault(packed, float(sums[0]))
        return run

    fns = {"packed": loss_backward(True), "padded": loss_backward(False)}
    wall, cpu = common.time_interleaved_cpu(fns, warmup=1, reps=args.compare_packing)   # CUDA: synced in run()
    trainer.model.zero_grad(set_to_none=True)
    logprobs = {}
    for packed in (True, False):   # per-token log-probs of the rollout, no gradients, in the model's dtype
        cfg.loss.packing = packed
        logprobs[packed] = torch.cat(trainer.logprobs(trainer.model, rollout)).float()
    cfg.loss.packing = configured
    text = trainer.backbone.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kernel = packed_kernel(dev, trainer.backbone.model.dtype, head_dim, base_implementation(text._attn_implementation))
    ratios = [a / b for a, b in zip(wall["packed"], wall["padded"])]
    cpu_ratios = [a / b for a, b in zip(cpu["packed"], cpu["padded"])]
    prompt_len = rollout.prompts["attention_mask"].sum(-1).tolist()
    lengths = [prompt_len[r] + n for r, n in zip(rollout.prompt_row, rollout.lengths)]
    seqs = [mb.seqs for mb in micro if not mb.filler]
    width = [max(prompt_len[rollout.prompt_row[i]] for i in m) + max(rollout.lengths[i] for i in m) for m in seqs]
    padded_positions = sum(w * len(m) for w, m in zip(width, seqs))
    summary = {
        "rounds": args.compare_packing, "device": common.device_name(str(dev)), "threads": torch.get_num_threads(),
        "packed_s": common.quantiles(wall["packed"])[0], "padded_s": common.quantiles(wall["padded"])[0],
        "packed_cpu_s": common.quantiles(cpu["packed"])[0], "padded_cpu_s": common.quantiles(cpu["padded"])[0],
        "ratio_p50": common.quantiles(ratios)[0], "ratio_p20": common.quantiles(ratios)[1],
        "ratio_p80": common.quantiles(ratios)[2], "cpu_ratio_p50": common.quantiles(cpu_ratios)[0],
        "loss_packed": losses[True], "loss_padded": losses[False], "packed_kernel": kernel,
        "dtype": str(trainer.backbone.model.dtype).removeprefix("torch."),
        "logprob_max_abs_diff": (logprobs[True] - logprobs[False]).abs().max().item(),
        "micro_batches": len(micro), "sequences": len(lengths), "tokens": sum(lengths),
        "padded_positions": padded_positions, "load_average": common.load_average(),
        "torch": torch.__version__, "timestamp": common.timestamp(),
        "command": " ".join(["python benchmarks/bench_step.py", *args.shown_argv]),
    }
    if trainer.rank != 0:
        return summary
    meta = {"kernel": "loss_backward", "provider": "", "mode": "packing", "x_name": "sequences",
            "x_value": len(lengths), "device": summary["device"], "timestamp": summary["timestamp"]}
    rows = []
    for name in ("packed", "padded"):
        p50, p20, p80 = common.quantiles(wall[name])
        rows.append({**meta, "provider": name, "metric": "time/loss_backward", "unit": "s", "p50": p50, "p20": p20,
                     "p80": p80, "note": f"{args.compare_packing} interleaved rounds; load={summary['load_average']}"})
    rows.append({**meta, "provider": "packed/padded", "metric": "ratio", "unit": "x", "p50": summary["ratio_p50"],
                 "p20": summary["ratio_p20"], "p80": summary["ratio_p80"], "note": "per-round wall ratio"})
    out_dir = Path(args.out_dir)
    csv_path = common.write_csv(out_dir / f"packing_{tag}.csv", rows)
    lines = [f"# Packed vs padded loss + backward: {summary['device']}", "",
             f"`{summary['command']}` at {summary['timestamp']}; torch {summary['torch']}, "
             f"{summary['threads']} thread(s), load average {summary['load_average']} (a shared machine: "
             f"only the ratio of the interleaved rounds is meaningful).", "",
             f"One rollout of {len(lengths)} sequences ({sum(lengths)} tokens; the padded forwards compute "
             f"{padded_positions} positions) in {len(micro)} micro-batches, {args.compare_packing} rounds, "
             f"order alternating.", "",
             "| loss.packing | p50 wall s | p50 CPU s | loss |", "|---|---|---|---|",
             f"| true (varlen attention) | {summary['packed_s']:.4f} | {summary['packed_cpu_s']:.4f} | {losses[True]:.6g} |",
             f"| false (padded) | {summary['padded_s']:.4f} | {summary['padded_cpu_s']:.4f} | {losses[False]:.6g} |",
             "", f"packed / padded: **{summary['ratio_p50']:.2f}x** wall (p50 of the per-round ratios; p20 "
             f"{summary['ratio_p20']:.2f}, p80 {summary['ratio_p80']:.2f}), {summary['cpu_ratio_p50']:.2f}x CPU time. "
             f"Packed attention kernel: {kernel}; per-token log-probs of the rollout ({summary['dtype']}), packed vs "
             f"padded: max abs difference {summary['logprob_max_abs_diff']:.3g}."]
    md_path = out_dir / f"packing_{tag}.md"
    md_path.write_text("\n".join(lines) + "\n")
    written = [csv_path, md_path]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        rounded = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summary.items()}
        Path(args.json).write_text(json.dumps(rounded, indent=1) + "\n")
        written.append(Path(args.json))
    print("\n".join(lines))
    print(f"bench_step: wrote {', '.join(str(p) for p in written)}")
    return summary


def _gathers_text(per_rollout: list[int], sharded: bool) -> str:
    if not sharded:
        return "n/a (one process, nothing sharded)"
    return f"{common.quantiles(per_rollout)[0]:.0f} (p50 of {len(per_rollout)} rollouts)" if per_rollout else "none"


def summary_json(med: dict, probe: StepProbe, sharded: bool, total: float, meta: dict, cfg, config_name: str,
                 args, world: int, engine_name: str, peak_abs: float, peak_extra: float, mem_kind: str,
                 argv=None) -> dict:
    """The --json summary. Times are p50 over the measured steps, in seconds unless named _ms.

    step_s: one RL step; phases: {generate, judge, logprobs, loss_backward} in s (the trainer's
    time/<phase>; loss_backward includes the optimizer step); phase_share: phase / step;
    tokens_per_s: generated completion tokens (all ranks) per second of step; decode_ms_per_token: ms
    per decoded position of a generate call (prefill included); padding_fraction: padded / all
    positions of the training forwards, with padded_positions and forward_positions (rank 0's,
    summed over the measured steps); allgathers_per_rollout: FSDP2 parameter all-gathers per rollout
    on rank 0 (p50; "n/a" without FSDP2 sharding), fsdp_units: the policy's FSDP2 units (decoder
    blocks, vision tower, root: one gather per unit = gathered once per rollout); completion_len: mean tokens per completion;
    peak_mem_mib / peak_mem_extra_mib: absolute and above set-up (CUDA max allocated or CPU peak RSS).
    """
    def num(key):
        v = med.get(key, float("nan"))
        return round(v, 6) if isinstance(v, float) and math.isfinite(v) else None

    phases = {p: num(f"time/{p}") for p in PHASES if f"time/{p}" in med}
    return {
        "step_s": num("time/step"),
        "phases": phases,
        "phase_share": {p: (round(v / total, 4) if v is not None and total else None) for p, v in phases.items()},
        "tokens_per_s": num("tokens_per_s"),
        "decode_ms_per_token": num("decode_ms_per_token"),
        "padding_fraction": round(probe.padding_fraction, 6) if probe.positions else None,
        "padded_positions": probe.padded,
        "forward_positions": probe.positions,
        "allgathers_per_rollout": (int(common.quantiles(probe.rollout_gathers)[0]) if probe.rollout_gathers else None)
        if sharded else "n/a",
        "completion_len": num("completion_len"),
        "completions_per_step": meta["x_value"] * world,
        "peak_mem_mib": round(peak_abs / 2 ** 20, 1),
        "peak_mem_extra_mib": round(peak_extra / 2 ** 20, 1),
        "peak_mem_kind": mem_kind,
        "nproc": world,
        "engine": engine_name,
        "decode": cfg.rollout.decode,
        "config": config_name,
        "command": " ".join(["python benchmarks/bench_step.py", *args.shown_argv]),
        "fsdp_units": probe.fsdp_units if sharded else "n/a",
        "steps": args.steps,
        "warmup": args.warmup,
        "sft_steps": args.sft_steps,
        "device": meta["device"],
        "torch": meta["torch"],
        "transformers": _transformers_version(),
        "load_average": common.load_average(),
        "timestamp": meta["timestamp"],
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _plot(med: dict, path: Path, title: str) -> Path:
    """Horizontal stacked bar of the p50 phase times of one step; None without matplotlib (the CSV and
    the Markdown carry the numbers)."""
    try:
        import matplotlib
    except ImportError:
        print("bench_step: matplotlib is not installed: no PNG plot")
        return None

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
