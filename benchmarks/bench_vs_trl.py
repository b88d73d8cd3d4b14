"""Side by side with TRL: the same tiny model, data and settings through TRL's GRPOTrainer and through
ours (mrpo.trainer.Trainer), in one process, runs interleaved and repeated.

    python benchmarks/bench_vs_trl.py                      # tiny default, CPU, 5 runs x (1 warm-up + 5) steps
    python benchmarks/bench_vs_trl.py --runs 2 --steps 2   # quick look
    python benchmarks/bench_vs_trl.py loss.packing=false   # dotted overrides apply to our side

Needs the `bench` extra (trl). Matched settings (configs/tiny_cpu.yaml, our defaults):
- model: the tiny default Qwen2.5-VL (mrpo.models.tiny, float32, SDPA attention), loaded from one folder
  by both; every run starts both trainers afresh from it (set-up not timed);
- data: the generated synthetic medical VQA train split; the same user turn (our prompt template, image
  placeholder(s) then text) through the same chat template; TRL gets the images as its "images" column;
- G = 8 completions per prompt, 2 prompts = 16 completions per optimizer step in 2 micro-batches of 8
  (TRL: per_device_train_batch_size 8, gradient_accumulation_steps 2, one generation per step);
  96 new tokens at most, temperature 0.7, top_p 1, top_k 0 (the full distribution), beta 0 (no reference
  model), one iteration per rollout (no old log-probs), clip eps 0.2, sequence-mean of token-means
  (TRL loss_type "grpo"), group-std advantages, AdamW lr 1e-4 (2 warm-up steps), grad-norm clip 1.0,
  no gradient checkpointing, one process, `--threads` torch threads (default 2);
- reward: ours, in both: TRL's reward function calls our RewardModel (rule judge on the synthetic facts:
  answer + process + length rewards, summed), so judging costs the same on both sides.
Mismatches that remain (stated in the report): ours runs MRPO (step-wise advantage shaping; TRL has none:
a few element-wise ops per token), suppresses vision tokens while decoding (TRL does not), and samples
its prompts with its own sampler (TRL: its RepeatSampler), so the completions and their lengths differ;
per-position generation cost is compared for that reason. TRL's own overheads (its dataloader, chat
templating and image processing per step, logging metrics, entropy of every token) stay in TRL's time.

Per step (optimizer step) and per side, as wall time and as process CPU time (steadier on a loaded
machine; with one thread it is the work done): the step; the rollout phase (ours: prompt encoding,
generation, scoring, advantages; TRL: `_generate_and_score_completions`, which also tokenizes and
processes images); generation per decoded position (wall ms of each generate call / its decode steps,
i.e. the longest completion of the call; ours: `mrpo.decoding.generate`, the decode loop of
rollout.decode=loop by default, TRL: `_generate_single_turn`); and
loss + backward + optimizer (ours: the `time/loss_backward` phase; TRL: step time minus the rollout phase).
The first `--warmup` steps of each run are not measured. Runs alternate which side goes first.
Writes results/vs_trl_<tag>.csv (one row per measured step and side) and .md (medians, ratios ours/TRL).
The machine may be shared: only the ratios measured here, side by side, mean anything.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GROUP, PROMPTS_PER_STEP, MICRO_BATCH = 8, 2, 8
METRICS = ("step_s", "rollout_s", "decode_ms_per_position", "loss_backward_optimizer_s",
           "step_cpu_s", "rollout_cpu_s", "decode_cpu_ms_per_position", "loss_backward_optimizer_cpu_s",
           "completion_tokens")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per side, interleaved")
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of each run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--sides", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    ap.add_argument("--tag", default="cpu", help="results/vs_trl_<tag>.*")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for our side, e.g. loss.packing=false")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------- ours
def our_config(work: str, overrides: list[str]):
    from mrpo.config import load_config

    forced = [f"output_dir={work}/ours", "logging.tensorboard=false", "logging.progress=false",
              "logging.eval_at_end=false", "logging.eval_at_start=false", "logging.eval_every=0",
              "checkpoint.every_steps=0", "checkpoint.export_final=false", "sft.steps=0",
              "distributed.engine=none", f"data.synthetic_dir={work}/data/synthetic",
              f"rollout.group_size={GROUP}", f"optim.per_device_batch_size={MICRO_BATCH}",
              f"optim.grad_accum_steps={PROMPTS_PER_STEP * GROUP // MICRO_BATCH}",
              "rollout.max_new_tokens=96", "rollout.temperature=0.7", "rollout.top_p=1.0", "loss.beta=0.0",
              "algo.num_iterations=1", "optim.lr=1e-4", "optim.warmup_steps=2", "optim.max_grad_norm=1.0"]
    return load_config(None, forced + list(overrides))


def run_ours(cfg, steps: int, warmup: int) -> list[dict]:
    """Fresh Trainer; per measured step its phase times and generation ms per decoded position."""
    from bench_step import StepProbe
    from mrpo.trainer import Trainer

    trainer = Trainer(cfg)
    probe = StepProbe(trainer)
    cpu = {"decode": [], "train": 0.0}
    import mrpo.decoding as decoding

    generate, accumulate, engine_step = decoding.generate, trainer.accumulate_gradients, trainer.engine.step

    def cpu_generate(*a, **k):
        c0 = time.process_time()
        out = generate(*a, **k)
        cpu["decode"].append(1e3 * (time.process_time() - c0) / max(1, max(len(c) for c in out.completion_ids)))
        return out

    def cpu_timed(fn):
        def timed(*a, **k):
            c0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu["train"] += time.process_time() - c0
        return timed

    decoding.generate = cpu_generate   # under StepProbe's wall-clock wrapper (restored by probe.close below)
    trainer.accumulate_gradients, trainer.engine.step = cpu_timed(accumulate), cpu_timed(engine_step)
    out = []
    try:
        for i in range(warmup + steps):
            probe.active = i >= warmup
            probe.decode_ms.clear()
            cpu["decode"].clear()
            cpu["train"] = 0.0
            c0 = time.process_time()
            m = trainer.train_step()
            step_cpu = time.process_time() - c0
            trainer.step += 1
            if i >= warmup:
                out.append({
                    "step_s": m["time/step"],
                    "rollout_s": m["time/step"] - m["time/loss_backward"],
                    "decode_ms_per_position": statistics.fmean(probe.decode_ms),
                    "loss_backward_optimizer_s": m["time/loss_backward"],
                    "step_cpu_s": step_cpu, "rollout_cpu_s": step_cpu - cpu["train"],
                    "decode_cpu_ms_per_position": statistics.fmean(cpu["decode"]),
                    "loss_backward_optimizer_cpu_s": cpu["train"],
                    "completion_tokens": m["completion_len"] * PROMPTS_PER_STEP * GROUP,
                })
    finally:
        probe.close()
        trainer.close()
    return out


# ----------------------------------------------------------------------------------------------- TRL
def trl_dataset(cfg, model_dir: Path):
    """The train split as TRL's conversational dataset: prompt (our user turn), images, record index."""
    from datasets import Dataset

    from mrpo.build import load_splits
    from mrpo.data.records import load_record_images
    from mrpo.models.backbone import format_prompt

    train, _ = load_splits(cfg, True, PROMPTS_PER_STEP)
    tag = "think"   # the qwen2_5_vl reasoning tag (Backbone.reasoning_tag)
    rows = []
    for i, rec in enumerate(train):
        images = load_record_images(rec, cfg.data.max_pixels)
        text = format_prompt(cfg.data.prompt_template, rec["problem"], tag)
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
        rows.append({"prompt": [{"role": "user", "content": content}], "images": images, "record_index": i})
    return Dataset.from_list(rows), train


class _TRLTimer:
    """Times TRL's optimizer steps (callback), its rollout phase and its generate calls (wrappers)."""

    def __init__(self, trainer, tokenizer_eos: set[int]):
        from transformers import TrainerCallback

        self.steps: list[dict] = []
        self._cur: dict = {}
        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._cur = {"t0": time.perf_counter(), "c0": time.process_time(), "rollout_s": 0.0,
                              "rollout_cpu_s": 0.0, "decode": [], "decode_cpu": [], "tokens": 0}

            def on_step_end(self, args, state, control, **kw):
                c = timer._cur
                step, step_cpu = time.perf_counter() - c["t0"], time.process_time() - c["c0"]
                nan = float("nan")
                timer.steps.append({"step_s": step, "rollout_s": c["rollout_s"],
                                    "decode_ms_per_position": statistics.fmean(c["decode"]) if c["decode"] else nan,
                                    "loss_backward_optimizer_s": step - c["rollout_s"],
                                    "step_cpu_s": step_cpu, "rollout_cpu_s": c["rollout_cpu_s"],
                                    "decode_cpu_ms_per_position": statistics.fmean(c["decode_cpu"]) if c["decode_cpu"] else nan,
                                    "loss_backward_optimizer_cpu_s": step_cpu - c["rollout_cpu_s"],
                                    "completion_tokens": c["tokens"]})

        trainer.add_callback(Callback())
        rollout, single = trainer._generate_and_score_completions, trainer._generate_single_turn

        def timed_rollout(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            out = rollout(*a, **k)
            self._cur["rollout_s"] += time.perf_counter() - t0
            self._cur["rollout_cpu_s"] += time.process_time() - c0
            return out

        def timed_generate(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            out = single(*a, **k)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            completion_ids = out[0]   # (completion_ids, logprobs)
            steps = max((len(c) for c in completion_ids), default=0)
            self._cur["tokens"] += sum(len(c) for c in completion_ids)
            if steps:
                self._cur["decode"].append(1e3 * wall / steps)
                self._cur["decode_cpu"].append(1e3 * cpu / steps)
            return out

        trainer._generate_and_score_completions = timed_rollout
        trainer._generate_single_turn = timed_generate


def run_trl(cfg, model_dir: Path, dataset, records, work: str, steps: int, warmup: int, seed: int) -> list[dict]:
    """Fresh GRPOTrainer from the same folder; per measured optimizer step the same measures as ours."""
    from transformers import Qwen2_5_VLProcessor
    from trl import GRPOConfig, GRPOTrainer

    from mrpo.models.load import load_backbone

    from mrpo.rewards.steps import token_offsets

    # the model, tokenizer and image processor exactly as ours loads them (AutoProcessor would also want a
    # video processor, which needs torchvision)
    bb = load_backbone(model_dir, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation,
                       max_pixels=cfg.data.max_pixels)
    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:   # no videos here
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = ImageOnlyProcessor(image_processor=bb.image_processor, tokenizer=bb.tokenizer,
                                   video_processor=None, chat_template=bb.tokenizer.chat_template)
    model = bb.model
    reward_model = _our_reward_model(cfg)
    tokenizer = processor.tokenizer

    def mrpo_reward(prompts, completions, completion_ids, record_index, **_):
        """Our reward (answer + process + length, rule judge), summed as our advantages sum it."""
        texts = [token_offsets(tokenizer, ids)[0] for ids in completion_ids]
        scored, _ = reward_model.score(texts, [records[i] for i in record_index])
        return torch.nansum(reward_model.reward_matrix(scored), dim=1).tolist()

    args = GRPOConfig(
        output_dir=f"{work}/trl", per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // MICRO_BATCH, num_generations=GROUP,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=cfg.loss.eps_low, epsilon_high=cfg.loss.eps_high, loss_type="grpo",
        scale_rewards="group", learning_rate=cfg.optim.lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.optim.warmup_steps, weight_decay=0.0, max_grad_norm=cfg.optim.max_grad_norm,
        max_steps=warmup + steps, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0, remove_unused_columns=False, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[mrpo_reward], args=args, train_dataset=dataset,
                          processing_class=processor)
    timer = _TRLTimer(trainer, set())
    trainer.train()
    return timer.steps[warmup:]


def _our_reward_model(cfg):
    from mrpo.judges import build_judge
    from mrpo.rewards import RewardModel

    return RewardModel(cfg.reward, build_judge(cfg.judge), "think", cfg.algo.tau)


# ----------------------------------------------------------------------------------------------- report
def summarise(rows: list[dict], sides: list[str]) -> dict:
    """{side: {metric: median over all measured steps of all runs}} and per-run medians."""
    out = {}
    for side in sides:
        mine = [r for r in rows if r["side"] == side]
        out[side] = {m: statistics.median(r[m] for r in mine) for m in METRICS}
        runs = sorted({r["run"] for r in mine})
        out[side]["run_step_medians"] = [statistics.median(r["step_s"] for r in mine if r["run"] == k) for k in runs]
        out[side]["run_step_cpu_medians"] = [statistics.median(r["step_cpu_s"] for r in mine if r["run"] == k)
                                             for k in runs]
    return out


def write_report(rows, summary, args, cmd: str, load_before: str, path_stem: Path) -> str:
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["side", "run", "step", *METRICS, "timestamp"])
        w.writeheader()
        w.writerows(rows)
    ver = common.versions()
    decode = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("rollout.decode=")), "loop")
    import trl

    lines = [
        f"# Ours vs TRL {trl.__version__} GRPOTrainer: {common.device_name('cpu')}", "",
        f"`python benchmarks/bench_vs_trl.py{' ' + cmd if cmd else ''}` at {common.timestamp()}: {args.runs} "
        f"interleaved runs per side x {args.steps} measured steps (after {args.warmup} warm-up step(s) per run), "
        f"one process, {args.threads} torch threads; torch {ver['torch']}, transformers "
        f"{__import__('transformers').__version__}. Load average before / after: {load_before} / "
        f"{common.load_average()} (a shared machine: only the ratios, measured side by side, mean anything).", "",
        "Tiny default Qwen2.5-VL (float32, SDPA), synthetic medical VQA, G = 8, 16 completions per step in 2 "
        "micro-batches, 96 new tokens, T = 0.7, top-k 0, top-p 1, beta 0, one iteration per rollout, loss "
        "seq-mean-token-mean, AdamW lr 1e-4; our reward (rule judge) in both; our decoder: rollout.decode="
        f"{decode}. Medians over all measured steps:", "",
    ]
    sides = [s for s in ("ours", "trl") if s in summary]
    header = "| measure | " + " | ".join(sides) + (" | ours / TRL |" if len(sides) == 2 else " |")
    lines += [header, "|---|" + "---:|" * (len(sides) + (len(sides) == 2))]
    names = {"step_s": "step, wall (s)", "rollout_s": "rollout phase, wall (s)",
             "decode_ms_per_position": "generation, wall (ms per decoded position)",
             "loss_backward_optimizer_s": "loss + backward + optimizer, wall (s)",
             "step_cpu_s": "step, process CPU (s)", "rollout_cpu_s": "rollout phase, CPU (s)",
             "decode_cpu_ms_per_position": "generation, CPU (ms per decoded position)",
             "loss_backward_optimizer_cpu_s": "loss + backward + optimizer, CPU (s)",
             "completion_tokens": "completion tokens per step"}
    for m in METRICS:
        vals = [summary[s][m] for s in sides]
        cells = " | ".join(f"{v:.3f}" if m != "completion_tokens" else f"{v:.0f}" for v in vals)
        ratio = f" | {vals[0] / vals[1]:.2f} |" if len(sides) == 2 and vals[1] else " |"
        lines.append(f"| {names[m]} | {cells}{ratio}")
    lines += ["", "Process CPU time counts the work of this process's threads whatever the load; wall time also "
              "counts waiting for a core (with other jobs on the machine it varies run to run).", "",
              "Per-run median step time, wall (s): " + "; ".join(
        f"{s}: " + ", ".join(f"{v:.3f}" for v in summary[s]["run_step_medians"]) for s in sides),
        "Per-run median step time, CPU (s): " + "; ".join(
        f"{s}: " + ", ".join(f"{v:.3f}" for v in summary[s]["run_step_cpu_medians"]) for s in sides), "",
        "Mismatches that remain: ours runs MRPO step-wise shaping (TRL: plain GRPO; a few element-wise ops per "
        "token) and suppresses vision tokens while decoding; the prompts of a step and so the completion lengths "
        "differ (each side samples its own), hence the per-position generation cost; TRL's step also holds its "
        "own overheads (chat templating and image processing of every step's prompts, metrics and the entropy "
        "of every token). See the docstring of benchmarks/bench_vs_trl.py."]
    md = "\n".join(lines) + "\n"
    path_stem.with_suffix(".md").write_text(md)
    return md


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    load_before = common.load_average()
    work = tempfile.mkdtemp(prefix="mrpo_bench_vs_trl_")
    try:
        from mrpo import build

        cfg = our_config(work, args.overrides)
        model_dir = build.model_path(cfg, True)
        dataset = records = None
        if "trl" in args.sides:
            dataset, records = trl_dataset(cfg, model_dir)
        rows = []
        for run in range(args.runs):
            order = args.sides if run % 2 == 0 else list(reversed(args.sides))
            for side in order:
                torch.manual_seed(cfg.seed + run)
                if side == "ours":
                    steps = run_ours(our_config(work, args.overrides), args.steps, args.warmup)
                else:
                    steps = run_trl(cfg, model_dir, dataset, records, work, args.steps, args.warmup, cfg.seed + run)
                for k, s in enumerate(steps):
                    rows.append({"side": side, "run": run, "step": k, **{m: s[m] for m in METRICS},
                                 "timestamp": common.timestamp()})
                print(f"run {run + 1}/{args.runs} {side}: step " + ", ".join(f"{s['step_s']:.3f}" for s in steps)
                      + " s", flush=True)
        summary = summarise(rows, args.sides)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        print(write_report(rows, summary, args, cmd, load_before, out / f"vs_trl_{args.tag}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
