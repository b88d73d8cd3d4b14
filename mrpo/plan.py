"""Will it fit? Per-GPU memory of every phase of an RL step, before any weights are loaded.

    python -m mrpo.plan --config configs/qwen2_5_vl_7b_mrpo.yaml --gpus 4 --gpu-mem-gib 80 [key=value ...] [--json PATH] [--check]

--check exits 3 when the plan does not fit (0 when it does), for scripts; bad input exits 2 with one line.

The model is built from its config.json on the meta device (exact parameter counts, no weights, no GPU):
model.path/config.json when it exists, else the published config.json of the recipe backbone of
model.family shipped in configs/backbones/ (the output says which). Per phase, per GPU:

  rollout   generation of G completions for every prompt of the rank at once: parameters (gathered whole
            for generation with distributed.gather_for_generation, else one unit at a time), the KV cache
            (2 x layers x KV heads x head_dim x (prompt + max_new_tokens) x completions). rollout.decode=loop
            (our decode loop): one preallocated cache with its key mask, the prefill of the DISTINCT prompts
            (vision tower once per image; counted beyond the decode buffers, as it ends before they
            exist), the step's fused weight copies and the sampling buffers (on CUDA these decode buffers,
            and the captured graphs' outputs, are a workspace kept for the whole run, so logprobs and train
            count them too); hf / static*: generate's prefill of every row (rows repeat the prompt G times)
            and its sampling copies;
  logprobs  old / reference log-prob passes (num_iterations > 1 / loss.beta > 0): a no-grad forward of one
            micro-batch and linear_logprobs' [chunk, V] logits buffer;
  train     forward + backward of one micro-batch (activations with or without gradient checkpointing,
            the vision tower's when it trains), the fused loss (grad hidden [N, D], grad weight [V, D]
            fp32, [chunk, V] logits buffer), gradients (FSDP2 accumulates UNSHARDED gradients in
            reduce_dtype over the micro-batches of a step: no-sync accumulation), the AdamW step.

Every phase carries the persistent state: parameters (1/N under FSDP2 / ZeRO-3), AdamW state (FSDP2: trainable
parameters sharded as fp32 master weights, fp32 exp_avg + exp_avg_sq; one process: bf16 / fp16 weights plus
fp32 master weights, fp32 moments and fp32 accumulated gradients; DeepSpeed: fp32 master,
moments and gradient partitions), the reference model (none with LoRA: the policy with adapters off), and
on CUDA the headroom: CUDA context + NCCL buffers, and a fragmentation reserve of the caching allocator.
Activation costs per token and layer are the linear forms of mrpo/plan_calibration.json, measured on the
real model classes by mrpo.plan_measure. When the peak does not fit, the plan is redone with each knob
(micro-batch size, gradient checkpointing, gather_for_generation off, frozen vision tower, LoRA, more GPUs)
and the ones that fit are listed, cheapest first.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

from mrpo.errors import PlanDoesNotFit, UserInputError  # noqa: F401  (PlanDoesNotFit re-exported)

from mrpo.plan_model import (  # noqa: F401  (re-exported: the plan's API stays mrpo.plan)
    GiB, CPU_CHUNK_BYTES, CUDA_CHUNK_BYTES, CUDA_CONTEXT, DTYPE_BYTES, FRAGMENTATION, ModelShape, NCCL_BUFFERS, PHASES, Phase, Plan, SAMPLING_COPIES, ZERO_BUCKET, _coefficients, _per_token, _rel, _trainable, make_plan, model_shape, resolve_model_config)


def _with(cfg, **changes):
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(new, section), key, value)
    return new


def knob_candidates(cfg, gpus: int) -> list[tuple[str, object, int]]:
    """(description, changed config, gpus), cheapest first."""
    o, out = cfg.optim, []
    if o.per_device_batch_size > 1 and not cfg.loss.max_tokens_per_micro_batch:
        b = max(1, o.per_device_batch_size // 2)
        accum = o.grad_accum_steps * o.per_device_batch_size // b
        out.append((f"optim.per_device_batch_size={b} optim.grad_accum_steps={accum} "
                    "(smaller micro-batches, same step)",
                    _with(cfg, optim__per_device_batch_size=b, optim__grad_accum_steps=accum), gpus))
    if not cfg.model.gradient_checkpointing:
        out.append(("model.gradient_checkpointing=true (~30% slower steps)",
                    _with(cfg, model__gradient_checkpointing=True), gpus))
    if gpus > 1 and cfg.distributed.gather_for_generation:
        out.append(("distributed.gather_for_generation=false (one all-gather per block per decoded token)",
                    _with(cfg, distributed__gather_for_generation=False), gpus))
    if not cfg.model.freeze_vision and cfg.lora.rank == 0:
        out.append(("model.freeze_vision=true (the vision tower stops training)",
                    _with(cfg, model__freeze_vision=True), gpus))
    if cfg.lora.rank == 0:
        out.append(("lora.rank=64 (adapters only; the reference is the policy without them)",
                    _with(cfg, lora__rank=64), gpus))
    for n in (2, 4, 8, 16, 32):
        if n > gpus:
            out.append((f"{n} GPUs", cfg, n))
            break
    return out


def find_knobs(cfg, plan: Plan, device: str = "cuda") -> list[dict]:
    """Re-plan with each knob alone; when none fits, add knobs in order of cost until the plan fits, then drop
    every knob the fit does not need. Returns [{knob, peak_gib, fits}], cheapest first."""
    found, same_gpus = [], []
    for text, new_cfg, n in knob_candidates(cfg, plan.gpus):
        alone = make_plan(new_cfg, n, plan.gpu_mem_gib, plan.shape, device)
        found.append({"knob": text, "peak_gib": round(alone.peak / GiB, 2), "fits": alone.fits})
        if n == plan.gpus:
            same_gpus.append((text.split(" (")[0], new_cfg))

    def combined(knobs):
        acc = cfg
        for _, new_cfg in knobs:
            acc = _merge(acc, new_cfg, cfg)
        return make_plan(acc, plan.gpus, plan.gpu_mem_gib, plan.shape, device)

    if not any(k["fits"] for k in found):
        for i in range(2, len(same_gpus) + 1):
            if combined(same_gpus[:i]).fits:
                chosen = same_gpus[:i]
                for knob in list(chosen):   # drop what the fit does not need
                    rest = [k for k in chosen if k is not knob]
                    if rest and combined(rest).fits:
                        chosen = rest
                result = combined(chosen)
                found.append({"knob": " + ".join(t for t, _ in chosen), "peak_gib": round(result.peak / GiB, 2),
                              "fits": True})
                break
    return found


def _merge(acc, new_cfg, original):
    """acc with every field where new_cfg differs from original."""
    out = copy.deepcopy(acc)
    for section in ("optim", "model", "distributed", "lora"):
        a, n, o = getattr(out, section), getattr(new_cfg, section), getattr(original, section)
        for f in dataclasses.fields(n):
            if getattr(n, f.name) != getattr(o, f.name):
                setattr(a, f.name, getattr(n, f.name))
    return out


# ----------------------------------------------------------------------------- entry points


def plan_for(cfg, gpus: int, gpu_mem_gib: float, device: str = "cuda", model_path=None, knobs: bool = True) -> Plan:
    hf_config, source = resolve_model_config(cfg, model_path)
    shape = model_shape(cfg, hf_config, source)
    plan = make_plan(cfg, gpus, gpu_mem_gib, shape, device)
    if knobs and not plan.fits:
        plan.knobs = find_knobs(cfg, plan, device)
    return plan


def plan_as_run(cfg, model_path, gpus: int, device: str, prompt_tokens: int, completion_tokens: int) -> Plan:
    """The plan of the shapes one step really ran (prompts padded to prompt_tokens, completions of
    completion_tokens): what measured peaks are compared with (tests/test_plan.py, benchmarks/bench_plan.py)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = prompt_tokens, completion_tokens
    hf_config, source = resolve_model_config(cfg, model_path)
    return make_plan(cfg, gpus, float("inf"), model_shape(cfg, hf_config, source), device)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def format_plan(plan: Plan, title: str = "") -> str:
    s, cfg = plan.shape, plan.cfg
    names: list[str] = []
    for ph in plan.phases.values():
        names += [k for k in ph.terms if k not in names]
    width = max(len(n) for n in names) + 2
    bounded = math.isfinite(plan.gpu_mem_gib)
    where = f"{plan.gpus} x {plan.gpu_mem_gib:g} GiB" if bounded else f"{plan.gpus} process(es), no memory limit"
    lines = [f"memory plan{': ' + title if title else ''} on {where} (engine {plan.engine}, {cfg.model.dtype})",
             f"  model config: {s.source}",
             f"  parameters {_count(s.params_total)} (vision {_count(s.params_vision)}"
             + (f", LoRA {_count(s.lora_in_out * cfg.lora.rank)}" if cfg.lora.rank else "")
             + f"), trainable {_count(_trainable(s, cfg))}; image at data.max_pixels: {s.patches_per_image} "
               f"patches -> {s.tokens_per_image} tokens",
             f"  {'GiB per GPU':<{width}}" + "".join(f"{p:>10}" for p in PHASES)]
    for n in names:
        cells = "".join(f"{plan.phases[p].terms[n] / GiB:>10.2f}" if n in plan.phases[p].terms else f"{'-':>10}"
                        for p in PHASES)
        lines.append(f"  {n:<{width}}{cells}")
    lines.append(f"  {'peak':<{width}}" + "".join(f"{plan.phases[p].peak / GiB:>10.2f}" for p in PHASES))
    for p in PHASES:
        for note in plan.phases[p].notes:
            lines.append(f"  note ({p}): {note}")
    worst = plan.worst_phase()
    verdict = (f"peak {plan.peak / GiB:.2f} GiB ({worst})" if not bounded else
               f"fits: peak {plan.peak / GiB:.1f} GiB ({worst}) of {plan.gpu_mem_gib:g} GiB" if plan.fits else
               f"DOES NOT FIT: {worst} needs {plan.peak / GiB:.1f} GiB per GPU, {plan.gpu_mem_gib:g} GiB available")
    lines.append("  " + verdict)
    if not plan.fits:
        good = [k for k in plan.knobs if k["fits"]]
        lines.append("  knobs that make it fit (cheapest first): " +
                     ("; ".join(f"{k['knob']} -> {k['peak_gib']:.1f} GiB" for k in good) if good else
                      "none of micro-batch size, gradient checkpointing, gather_for_generation, frozen vision, "
                      "LoRA, more GPUs alone or together"))
    return "\n".join(lines)


def check_at_startup(cfg, model_path, world: int, device, is_main: bool, log=print) -> Plan | None:
    """Start-up plan of the trainer (rank 0 prints it). On CUDA every rank computes it and, with
    plan.enforce, raises PlanDoesNotFit when the peak exceeds the device's memory (all ranks stop alike);
    elsewhere only rank 0 needs it (None on the other ranks)."""
    import torch

    on_cuda = device.type == "cuda"
    if not (on_cuda or is_main):
        return None
    mem = torch.cuda.get_device_properties(device).total_memory / GiB if on_cuda else 0.0
    try:
        plan = plan_for(cfg, world, mem if on_cuda else float("inf"), "cuda" if on_cuda else "cpu", model_path,
                        knobs=on_cuda)
    except Exception as e:   # the plan must never be why a run that would work does not start
        if is_main:
            log(f"memory plan unavailable: {type(e).__name__}: {e}")
        return None
    if is_main:
        log(format_plan(plan, "start-up") if on_cuda else format_plan(plan, "start-up (CPU: nothing enforced)"))
    if on_cuda and not plan.fits and cfg.plan.enforce:
        worst = plan.worst_phase()
        good = [k["knob"] for k in plan.knobs if k["fits"]]
        raise PlanDoesNotFit(f"the memory plan's {worst} phase needs {plan.peak / GiB:.1f} GiB per GPU, the device "
                             f"has {mem:.1f} GiB; knobs that fit: {'; '.join(good) or 'none found'} "
                             f"(plan.enforce=false starts anyway)")
    return plan


def compare_measured(plan: Plan | None, peaks: dict[str, int]) -> str | None:
    """One line: planned vs measured peak per phase of the first step (Plan.measurable_peak: allocated bytes,
    no AdamW state before the first optimizer step)."""
    if plan is None or not peaks:
        return None
    parts = []
    for name, measured in peaks.items():
        planned = plan.measurable_peak(name, first_step=True)
        parts.append(f"{name} planned {planned / GiB:.2f} GiB, measured {measured / GiB:.2f} GiB "
                     f"({(planned - measured) / max(measured, 1):+.0%})")
    return "memory after the first step: " + "; ".join(parts)


def first_step_vs_plan(trainer):
    """Run one RL step of a fresh `trainer` with per-phase peaks (the CUDA allocator's, or LiveBytes on CPU)
    and plan the shapes it really ran. Returns (mrpo.plan.Plan, {phase: measured bytes}); compare with
    Plan.measurable_peak(phase, first_step=True)."""
    from mrpo.plan_measure import PhaseMemory

    cpu = trainer.device.type != "cuda"
    trainer.phase_memory = PhaseMemory(trainer.device, cpu_objects=(lambda: (
        trainer.model, trainer.ref_model, trainer.engine.optimizer)) if cpu else None)
    seen, original = {}, trainer.hidden_states

    def record(model, rollout, seqs):   # the padded prompt length and the longest completion that ran
        seen["prompt"] = int(rollout.prompts["attention_mask"].shape[1])
        seen["completion"] = max(len(c) for c in rollout.completion_ids)
        return original(model, rollout, seqs)

    trainer.hidden_states = record
    try:
        trainer.train_step()
    finally:
        trainer.hidden_states = original
    peaks = dict(trainer.phase_memory.peaks)
    trainer.phase_memory.stop()
    plan = plan_as_run(trainer.cfg, trainer.model_path, trainer.world, "cpu" if cpu else "cuda",
                       seen["prompt"], seen["completion"])
    return plan, peaks


# ----------------------------------------------------------------------------- calibration


EXIT_DOES_NOT_FIT = 3   # --check: the plan's peak exceeds --gpu-mem-gib (2 is bad input, 1 a crash)


def _json_target_problem(path: str) -> str | None:
    """Why the --json file cannot be written, found before planning by opening it for appending (a file
    that did not exist is removed again), or None."""
    target = Path(path)
    if target.is_dir():
        return "is a folder"
    if not target.parent.is_dir():
        return f"folder {target.parent} does not exist"
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as e:
        return f"cannot write ({e.strerror or e})"
    if not existed:
        target.unlink()
    return None


def main(argv=None) -> int:
    """Exit codes: 0 planned (with --check: and it fits), 2 bad input (one line on stderr: a config key,
    --gpus / --gpu-mem-gib, an unwritable --json path, a config.json that is not a supported VL model),
    3 with --check when the plan does not fit."""
    from mrpo.config import load_config
    from mrpo.errors import ConfigError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config (YAML); default configs/tiny_cpu.yaml")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run uses")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    ap.add_argument("--json", help="also write the plan as JSON here")
    ap.add_argument("--check", action="store_true",
                    help=f"exit {EXIT_DOES_NOT_FIT} when the plan does not fit (for scripts); 0 when it fits")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=64")
    args = ap.parse_args(argv)
    if args.gpus < 1 or not math.isfinite(args.gpu_mem_gib) or args.gpu_mem_gib <= 0:
        print(f"error: --gpus must be >= 1 and --gpu-mem-gib a finite number > 0 (got --gpus {args.gpus}, "
              f"--gpu-mem-gib {args.gpu_mem_gib:g})", file=sys.stderr)
        return 2
    if args.json and (problem := _json_target_problem(args.json)):
        print(f"error: --json {args.json}: {problem}; give a writable file path", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_for(cfg, args.gpus, args.gpu_mem_gib)
    except UserInputError as e:   # as mrpo.train prints them
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.config or "configs/tiny_cpu.yaml"))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
        except OSError as e:
            print(f"error: --json {args.json}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    return EXIT_DOES_NOT_FIT if args.check and not plan.fits else 0


if __name__ == "__main__":
    raise SystemExit(main())
