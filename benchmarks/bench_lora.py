"""LoRA vs full fine-tuning on the tiny default backbone (CPU): trainable parameters, update-step time,
peak memory and the exact bytes of weights, gradients, AdamW state and the KL reference.

    python benchmarks/bench_lora.py                       # rank 16, beta 0.04, 3 rounds x 5 steps, 1 thread
    python benchmarks/bench_lora.py --rank 8 --rounds 5 --beta 0

One measured step is the policy-update part of an MRPO step on the tiny default's shapes
(configs/tiny_cpu.yaml: per_device_batch_size 8 completions x grad_accum_steps 2, ~44 tokens per
completion as measured by bench_step.py): reference log-probs when beta > 0 (full: a second, frozen
copy of the model; LoRA: the same model with its adapters disabled), then per micro-batch the
teacher-forced forward with the passthrough head, the fused MRPO loss and backward, then gradient
clipping and AdamW over the trainable parameters. Generation and judging are left out: they do not
depend on how the policy is parameterised (LoRA adds a small per-token cost to generate, unless merged).

Each mode runs in fresh processes (benchmarks/common.run_isolated), alternating full / LoRA for
--rounds rounds so that load from other processes hits both alike. Time: p50 / p20 / p80 of the
measured steps (after warm-up steps) pooled over the rounds. Memory, in one more process per mode with
glibc's mmap threshold fixed (common.set_malloc_mmap_threshold): peak RSS during the warm-up steps + one
step above the RSS after the model(s) were loaded (so the AdamW state, created at the first step,
counts), and the absolute peak RSS of that process. At this size (~0.7M
parameters) the RSS is dominated by the interpreter, torch and activations; the byte accounting
(weights, gradients, AdamW state, reference copy) is the part that scales to 7B.
Writes benchmarks/results/lora_cpu.csv (long format of common.CSV_FIELDS) and lora_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOKENS_PER_COMPLETION = 44     # bench_step.py on the tiny default after the SFT warm-up
MICRO_BATCH = 8                # configs/tiny_cpu.yaml optim.per_device_batch_size
ACCUM = 2                      # configs/tiny_cpu.yaml optim.grad_accum_steps


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def run_mode(mode: str, model_dir: str, rank: int, beta: float, steps: int, warmup: int, threads: int,
             memory: bool) -> dict:
    """One mode ("full" or "lora") in this (fresh) process; returns its numbers. memory: fix glibc's mmap
    threshold so RSS follows the live tensors (exact peaks, but every large allocation becomes an mmap,
    which slows the steps: the timing runs leave it alone)."""
    if memory:
        common.set_malloc_mmap_threshold()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from mrpo.data.synthetic import make_example
    from mrpo.models.load import load_backbone
    from mrpo.models.lora import adapters_disabled, apply_lora, trainable_parameter_summary
    from mrpo.models.parallelize import hidden_states_mode, install_passthrough_head
    from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs

    bb = load_backbone(model_dir)
    model = bb.model
    install_passthrough_head(model)
    ref_model = None
    if mode == "lora":
        apply_lora(model, rank=rank, alpha=2 * rank, seed=0)
    elif beta > 0:   # the full fine-tuning trainer loads a second frozen copy as the KL reference
        ref_model = load_backbone(model_dir).model
        install_passthrough_head(ref_model)
        ref_model.requires_grad_(False).eval()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    img = make_example(0, "train", 0, image_size=56)[1]
    one = bb.encode_prompts(["Is there a lesion? How many lesions are there in the image?"], [img])
    batch = bb.select_rows(one, [0] * MICRO_BATCH)   # a group of completions of one prompt
    g = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(len(bb.tokenizer))
                            if t not in bb.suppress_token_ids and t not in bb.eos_token_ids])
    micro = [[allowed[torch.randint(len(allowed), (TOKENS_PER_COMPLETION,), generator=g)].tolist()
              for _ in range(MICRO_BATCH)] for _ in range(ACCUM)]

    def hidden(m, comps):
        with hidden_states_mode(m):
            h, t, cu = bb.completion_hidden_states(batch, comps, model=m)
        return h, t, cu, m.get_output_embeddings().weight

    def step():
        refs = []
        if beta > 0:
            with torch.no_grad():
                for comps in micro:
                    if mode == "lora":
                        with adapters_disabled(model):
                            h, t, _, w = hidden(model, comps)
                    else:
                        h, t, _, w = hidden(ref_model, comps)
                    refs.append(linear_logprobs(h, w, t, backend="torch"))
        for i, comps in enumerate(micro):
            h, t, cu, w = hidden(model, comps)
            n = t.numel()
            adv = torch.linspace(-1, 1, MICRO_BATCH).repeat_interleave(TOKENS_PER_COMPLETION)
            loss, _ = fused_linear_mrpo_loss(
                h, w, t, adv, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.int32),
                torch.ones(n, dtype=torch.bool), adv > 0, cu, ref_logprobs=refs[i] if refs else None,
                beta=beta, backend="torch")
            (loss / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    import gc

    gc.collect()
    method = "clear_refs" if common.reset_peak_rss() else "hwm-diff"
    base_rss = common._proc_status_kib("VmRSS") * 1024
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = common._proc_status_kib("VmHWM") * 1024
    summary = trainable_parameter_summary(model)
    adam = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
    return {
        "mode": mode, "trainable": summary["trainable"], "total": summary["total"],
        "percent": summary["percent"], "step_ms": common.quantiles_ms(times), "times": times,
        "peak_extra": max(0, peak - base_rss), "peak_abs": peak, "rss_method": method,
        "weights_bytes": _nbytes(model.parameters()), "grad_bytes": _nbytes(trainable),
        "adam_bytes": adam, "ref_bytes": _nbytes(ref_model.parameters()) if ref_model is not None else 0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.04, help="> 0: reference log-probs every step")
    p.add_argument("--steps", type=int, default=5, help="measured steps per round")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per mode, alternating full / lora")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="lora_cpu")
    args = p.parse_args(argv)

    from mrpo.models.tiny import build_tiny

    model_dir = str(build_tiny("qwen2_5_vl", Path(tempfile.gettempdir()) / "mrpo_bench_tiny_qwen2_5_vl", seed=0))
    # timing rounds alternate the modes (a fresh process each), so load from other processes on this shared
    # machine hits both alike; step times are pooled over rounds. Memory: one more process per mode.
    runs = {"full": [], "lora": []}
    mem = {}
    for r in range(args.rounds + 1):
        for mode in ("full", "lora"):
            memory = r == args.rounds
            out = common.run_isolated(run_mode, mode, model_dir, args.rank, args.beta,
                                      1 if memory else args.steps, args.warmup, args.threads, memory,
                                      preload=["torch", "transformers", "peft"])
            if "error" in out:
                print(f"{mode}: {out['error']}", file=sys.stderr)
                return 1
            if memory:
                mem[mode] = out
            else:
                runs[mode].append(out)
            print(f"{'memory' if memory else f'round {r}'} {mode}: step p50 {out['step_ms'][0]:.1f} ms, "
                  f"peak +{out['peak_extra'] / 2**20:.1f} MiB", flush=True)
    results = {}
    for mode, outs in runs.items():
        r = dict(mem[mode])
        r["step_ms"] = common.quantiles_ms(t for o in outs for t in o["times"])
        results[mode] = r

    ts, ver = common.timestamp(), common.versions()
    dev = common.device_name("cpu").rsplit(" (", 1)[0] + f" ({args.threads} threads)"
    rows = []
    for mode, r in results.items():
        base = dict(kernel="train_update", provider=mode, mode="fwd+bwd+adamw", x_name="lora_rank",
                    x_value=args.rank if mode == "lora" else 0, V=None, D=128, dtype="float32", device=dev,
                    torch=ver["torch"], triton=ver["triton"], timestamp=ts,
                    note=f"beta={args.beta} tokens={MICRO_BATCH * ACCUM * TOKENS_PER_COMPLETION}")
        ms = r["step_ms"]
        rows.append({**base, "metric": "step_time", "unit": "ms", "p50": ms[0], "p20": ms[1], "p80": ms[2]})
        for metric, unit, value in (("trainable_params", "count", r["trainable"]),
                                    ("total_params", "count", r["total"]),
                                    ("peak_rss_extra", "bytes", r["peak_extra"]),
                                    ("peak_rss_abs", "bytes", r["peak_abs"]),
                                    ("weights", "bytes", r["weights_bytes"]), ("grads", "bytes", r["grad_bytes"]),
                                    ("adam_state", "bytes", r["adam_bytes"]),
                                    ("reference_copy", "bytes", r["ref_bytes"])):
            rows.append({**base, "metric": metric, "unit": unit, "p50": value, "p20": value, "p80": value})
    out = common.RESULTS_DIR
    common.write_csv(out / f"{args.tag}.csv", rows)

    f, lo = results["full"], results["lora"]

    def kib(x):
        return f"{x / 1024:.0f} KiB"

    def state(r):
        return r["weights_bytes"] + r["grad_bytes"] + r["adam_bytes"] + r["ref_bytes"]

    lines = [
        f"# LoRA vs full fine-tuning: {dev}", "",
        f"`python benchmarks/bench_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}` at {ts}; "
        f"torch {ver['torch']}; tiny default backbone (Qwen2.5-VL-shaped, 2 layers, hidden 128); LoRA rank "
        f"{args.rank}, alpha {2 * args.rank} on q/k/v/o/gate/up/down of the language model; beta {args.beta}; "
        f"one update = {ACCUM} micro-batches x {MICRO_BATCH} completions x {TOKENS_PER_COMPLETION} tokens "
        f"(+ reference log-probs); {args.rounds} alternating rounds of {args.steps} measured steps after "
        f"{args.warmup} warm-up (p50/p20/p80 over all rounds' steps; memory: a separate run per mode); "
        f"load {common.load_average()}.", "",
        "| | full fine-tuning | LoRA | LoRA / full |", "|---|---|---|---|",
        f"| trainable parameters | {f['trainable']:,} ({f['percent']:.1f}%) | {lo['trainable']:,} "
        f"({lo['percent']:.1f}%) | {lo['trainable'] / f['trainable']:.3f} |",
        f"| update step p50 (p20-p80) | {f['step_ms'][0]:.1f} ms ({f['step_ms'][1]:.1f}-{f['step_ms'][2]:.1f}) "
        f"| {lo['step_ms'][0]:.1f} ms ({lo['step_ms'][1]:.1f}-{lo['step_ms'][2]:.1f}) "
        f"| {lo['step_ms'][0] / f['step_ms'][0]:.2f} |",
        f"| peak RSS above loaded model(s) | {f['peak_extra'] / 2**20:.1f} MiB | {lo['peak_extra'] / 2**20:.1f} MiB "
        f"| {lo['peak_extra'] / max(f['peak_extra'], 1):.2f} |",
        f"| peak RSS (absolute) | {f['peak_abs'] / 2**20:.0f} MiB | {lo['peak_abs'] / 2**20:.0f} MiB "
        f"| {lo['peak_abs'] / f['peak_abs']:.2f} |",
        f"| weights (policy) | {kib(f['weights_bytes'])} | {kib(lo['weights_bytes'])} | "
        f"{lo['weights_bytes'] / f['weights_bytes']:.3f} |",
        f"| gradients | {kib(f['grad_bytes'])} | {kib(lo['grad_bytes'])} | {lo['grad_bytes'] / f['grad_bytes']:.3f} |",
        f"| AdamW state | {kib(f['adam_bytes'])} | {kib(lo['adam_bytes'])} | {lo['adam_bytes'] / f['adam_bytes']:.3f} |",
        f"| KL reference copy | {kib(f['ref_bytes'])} | 0 (adapters disabled) | 0 |",
        f"| weights + grads + AdamW + reference | {kib(state(f))} | {kib(state(lo))} | {state(lo) / state(f):.3f} |",
        "",
        f"Peak RSS method: {f['rss_method']}. The tiny policy's weights are {f['weights_bytes'] / 2**20:.1f} MiB, so "
        "the RSS rows mostly show activations, the interpreter and allocator behaviour; the byte rows are exact "
        "and are the part that grows with the model: full fine-tuning holds weights + gradients + two Adam "
        "moments of every parameter plus a second copy of the model as the reference, LoRA one frozen copy and "
        "gradients / Adam state for the adapters only (~2% of the parameters for rank 64 on Qwen2.5-VL-7B). "
        f"Step time (LoRA / full = {lo['step_ms'][0] / f['step_ms'][0]:.2f}"
        + ("; the p20-p80 ranges overlap, so at this machine load the difference is within the noise"
           if lo["step_ms"][1] <= f["step_ms"][2] and f["step_ms"][1] <= lo["step_ms"][2] else "")
        + "): LoRA still runs the full forward "
        "and the input-gradient half of the backward through the frozen base, skips the base weights' "
        "weight-gradient matmuls, clipping and AdamW, and adds two thin matmuls per adapted projection.",
    ]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
