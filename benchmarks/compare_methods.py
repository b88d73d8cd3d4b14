"""Multi-seed comparison of RL methods on the CPU testbed, with bootstrap confidence intervals.

    python benchmarks/compare_methods.py            # 3 seeds x {mrpo, grpo, gdpo}, 60 RL steps each
    python benchmarks/compare_methods.py --full     # + MRPO valid_step_credit variants + 3x-long runs
    python benchmarks/compare_methods.py --report   # rebuild runs.csv / summary.md / plots only

Per seed, the supervised warm-up runs once (`runs/methods/seed<S>/sft`: `sft.steps` steps, then the
trainer's checkpoint right after the warm-up, `checkpoints/step_000000`, and its evaluation on the test
split = the starting point of that seed). Every method of that seed starts from a copy of that checkpoint
(`checkpoint.resume=auto` finds it): same weights, same optimizer/scheduler/sampler/RNG state, so the
methods differ only in the RL update and the comparison is paired by seed. Each run is one process
(`python -m mrpo.train`), run one after the other, and ends with a greedy evaluation on the 256-question
synthetic test split with the rule step judge.

Resume: a run whose `eval/final/summary.json` exists is done and is never redone; an interrupted run
continues from its newest checkpoint (every 20 steps); an interrupted warm-up restarts. `runs.csv` is
rebuilt from the run folders each time, so rerunning the same command after a kill finishes the job.

Outputs (--out, default benchmarks/results/methods/): runs.csv (one row per run), summary.md (mean and
95% bootstrap CI over seeds per method/variant, paired differences vs GRPO by seed), PNG plots.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("accuracy", "early", "mid", "late", "far", "mean_k")
CSV_FIELDS = ["method", "variant", "seed", "steps", "accuracy", "early", "mid", "late", "far", "mean_k", "unjudged",
              "n_wrong", "n_wrong_with_failure", "rollout_k_last10", "sft_steps", "start_accuracy", "start_early",
              "wall_s", "run_dir"]
DEFAULT_METHODS = "mrpo,grpo,gdpo"
FULL_METHODS = "mrpo,grpo,gdpo,mrpo:signed,mrpo:zero"
FULL_LONG_METHODS = "mrpo,mrpo:signed,grpo,mrpo:zero"
LOCK_NAME = ".compare.lock"   # this harness's per-run claim (the trainer's own lock is output_dir/.lock)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    method: str          # algo.name: mrpo | grpo | gdpo | dr_grpo
    variant: str         # algo.valid_step_credit for mrpo (abs | signed | zero); "-" for the others
    seed: int
    steps: int

    @property
    def label(self) -> str:
        return self.method if self.variant in ("-", "abs") else f"{self.method}:{self.variant}"

    def run_dir(self, runs_dir: Path) -> Path:
        name = self.method if self.variant == "-" else f"{self.method}_{self.variant}"
        return runs_dir / f"seed{self.seed}" / f"{name}_{self.steps}steps"


def parse_method(spec: str) -> tuple[str, str]:
    """'mrpo' -> ('mrpo', 'abs'); 'mrpo:signed' -> ('mrpo', 'signed'); 'grpo' -> ('grpo', '-')."""
    method, _, variant = spec.strip().partition(":")
    if method not in ("mrpo", "grpo", "gdpo", "dr_grpo"):
        raise ValueError(f"unknown method {method!r} (mrpo | grpo | gdpo | dr_grpo)")
    if method == "mrpo":
        variant = variant or "abs"
        if variant not in ("abs", "signed", "zero"):
            raise ValueError(f"unknown valid_step_credit {variant!r} (abs | signed | zero)")
    elif variant:
        raise ValueError(f"{method} has no variants (valid_step_credit only applies to mrpo)")
    else:
        variant = "-"
    return method, variant


def plan(seeds: list[int], methods: list[str], steps: int, long_methods: list[str] = (), long_steps: int = 0,
         long_seeds: list[int] | None = None) -> list[RunSpec]:
    """Runs in order: every method of `methods` seed by seed, then the long runs (on long_seeds, default:
    the same seeds); seed-major, so that a study cut short still has whole, paired seeds."""
    runs = [RunSpec(*parse_method(m), s, steps) for s in seeds for m in methods]
    if long_steps:
        runs += [RunSpec(*parse_method(m), s, long_steps) for s in (seeds if long_seeds is None else long_seeds)
                 for m in long_methods]
    return list(dict.fromkeys(runs))


def is_done(run_dir: Path, tag: str = "final") -> bool:
    return (Path(run_dir) / "eval" / tag / "summary.json").is_file()


def sft_ready(sft_dir: Path) -> bool:
    return is_done(sft_dir, "start") and (Path(sft_dir) / "checkpoints" / "step_000000" / "COMPLETE").is_file()


def acquire(run_dir: Path) -> bool:
    """Claim a run for this process (run_dir/.compare.lock holds the pid): False while another live process
    holds it, so two invocations can share the work (e.g. one per core) without running the same run twice.
    Not `.lock`: that is the trainer's own output_dir lock (mrpo.run_safety.OutputLock, a JSON record)."""
    lock = Path(run_dir) / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
    lock.write_text(f"{os.getpid()}\n")
    return True


def release(run_dir: Path) -> None:
    (Path(run_dir) / LOCK_NAME).unlink(missing_ok=True)


def pending(runs: list[RunSpec], runs_dir: Path) -> list[RunSpec]:
    return [r for r in runs if not is_done(r.run_dir(runs_dir))]


# ----------------------------------------------------------------------------- running


def common_overrides(args, seed: int) -> list[str]:
    return [f"seed={seed}", f"sft.steps={args.sft_steps}", f"data.synthetic_dir={args.data_dir}",
            f"data.synthetic_test={args.n_test}", f"logging.eval_limit={args.n_test}", "logging.eval_every=0",
            "logging.tensorboard=false", "logging.progress=false", *args.override]


def _train(overrides: list[str], log_path: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} python -m mrpo.train {' '.join(overrides)}\n")
        log.flush()
        rc = subprocess.call([sys.executable, "-m", "mrpo.train", *overrides], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc}); see {log_path}")
    return time.time() - t0


def ensure_sft(args, seed: int) -> Path:
    """The seed's warmed-up checkpoint (runs the warm-up + its evaluation once)."""
    sft_dir = Path(args.runs_dir) / f"seed{seed}" / "sft"
    if not sft_ready(sft_dir):
        print(f"[compare] seed {seed}: supervised warm-up ({args.sft_steps} steps) -> {sft_dir}", flush=True)
        wall = _train(common_overrides(args, seed) + [
            f"output_dir={sft_dir}", "optim.max_steps=1", "checkpoint.every_steps=0", "checkpoint.keep_last=2",
            "checkpoint.export_final=false", "checkpoint.resume=auto", "logging.eval_at_start=true",
            "logging.eval_at_end=false"], sft_dir / "train.log", args.threads)
        (sft_dir / "wall_s.txt").write_text(f"{wall:.1f}\n")
        if not sft_ready(sft_dir):
            raise RuntimeError(f"warm-up of seed {seed} left no step_000000 checkpoint / start evaluation")
    return sft_dir


def run_one(args, spec: RunSpec) -> None:
    run_dir = spec.run_dir(Path(args.runs_dir))
    sft_dir = ensure_sft(args, spec.seed)
    ckpts = run_dir / "checkpoints"
    if not any(p.name.startswith("step_") and (p / "COMPLETE").is_file() for p in ckpts.glob("step_*")):
        shutil.rmtree(ckpts, ignore_errors=True)
        shutil.copytree(sft_dir / "checkpoints" / "step_000000", ckpts / "step_000000")
    print(f"[compare] {spec.label} seed {spec.seed} ({spec.steps} steps) -> {run_dir}", flush=True)
    overrides = common_overrides(args, spec.seed) + [
        f"output_dir={run_dir}", f"algo.name={spec.method}", f"optim.max_steps={spec.steps}",
        "checkpoint.every_steps=20", "checkpoint.keep_last=1", "checkpoint.export_final=false",
        "checkpoint.resume=auto", "logging.eval_at_start=false", "logging.eval_at_end=true"]
    if spec.method == "mrpo":
        overrides.append(f"algo.valid_step_credit={spec.variant}")
    wall = _train(overrides, run_dir / "train.log", args.threads)
    prev = float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").is_file() else 0.0
    (run_dir / "wall_s.txt").write_text(f"{prev + wall:.1f}\n")


# ----------------------------------------------------------------------------- collecting


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def eval_row(eval_dir: Path) -> dict:
    """accuracy, early/mid/late shares, FAR, mean K (over all test answers), unjudged of one evaluation."""
    s = json.loads((Path(eval_dir) / "summary.json").read_text())
    ks = []
    pred = Path(eval_dir) / "predictions.jsonl"
    if pred.is_file():
        ks = [len(json.loads(line).get("steps") or []) for line in pred.read_text().splitlines() if line.strip()]
    return {"accuracy": _nan(s.get("accuracy")), "early": _nan(s.get("early_failure_share")),
            "mid": _nan(s.get("mid_failure_share")), "late": _nan(s.get("late_failure_share")),
            "far": _nan(s.get("far_mean")), "mean_k": float(np.mean(ks)) if ks else float("nan"),
            "unjudged": int(s.get("unjudged") or 0), "n_wrong": int(s.get("n_wrong") or 0),
            "n_wrong_with_failure": int((s.get("wrong") or {}).get("with_failure") or 0)}


def rollout_k(run_dir: Path, last: int = 10) -> tuple[list[int], list[float]]:
    """(RL steps, mean rollout K per step) from metrics.jsonl (the last line of a step wins on resume)."""
    per_step = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("phase") is None and "num_steps" in d and "step" in d:
                per_step[int(d["step"])] = float(d["num_steps"])
    steps = sorted(per_step)
    return steps, [per_step[s] for s in steps]


def collect(runs_dir: Path, sft_steps: int | None = None) -> list[dict]:
    """One row per finished run found under runs_dir (seed<S>/<method>[_<variant>]_<N>steps)."""
    rows = []
    for run_dir in sorted(Path(runs_dir).glob("seed*/*_*steps")):
        if not is_done(run_dir):
            continue
        seed = int(run_dir.parent.name[4:])
        stem, _, n = run_dir.name.rpartition("_")
        method = next((m for m in ("dr_grpo", "mrpo", "grpo", "gdpo") if stem == m or stem.startswith(m + "_")), stem)
        variant = stem[len(method) + 1:]
        row = {"method": method, "variant": variant or "-", "seed": seed, "steps": int(n[:-5]),
               **eval_row(run_dir / "eval" / "final")}
        _, ks = rollout_k(run_dir)
        row["rollout_k_last10"] = float(np.mean(ks[-10:])) if ks else float("nan")
        sft_dir = run_dir.parent / "sft"
        row["sft_steps"] = sft_steps
        if is_done(sft_dir, "start"):
            start = eval_row(sft_dir / "eval" / "start")
            row["start_accuracy"], row["start_early"] = start["accuracy"], start["early"]
        wall = run_dir / "wall_s.txt"
        row["wall_s"] = float(wall.read_text()) if wall.is_file() else float("nan")
        row["run_dir"] = str(run_dir.relative_to(runs_dir))
        rows.append(row)
    return rows


def start_rows(runs_dir: Path) -> list[dict]:
    """The evaluation right after each seed's warm-up (before RL), as method 'start'."""
    rows = []
    for sft_dir in sorted(Path(runs_dir).glob("seed*/sft")):
        if is_done(sft_dir, "start"):
            rows.append({"method": "start", "variant": "-", "seed": int(sft_dir.parent.name[4:]), "steps": 0,
                         **eval_row(sft_dir / "eval" / "start")})
    return rows


def write_csv(rows: list[dict], path: Path, fields: list[str] = CSV_FIELDS) -> None:
    """One CSV row per dict of `rows` (the `fields` columns; floats to 6 significant digits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k in (*METRICS, "rollout_k_last10", "start_accuracy", "start_early", "wall_s"):
                row[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
            for k in ("seed", "steps", "unjudged", "n_wrong", "n_wrong_with_failure"):
                row[k] = int(r[k]) if r.get(k) not in (None, "") else 0
            out.append(row)
    return out


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(values, n_resamples: int = 10_000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean over `values` (NaNs dropped); resamples
    the values with replacement `n_resamples` times. With n = 1 the interval is the single value; with
    n = 0 all three are NaN. With 3 values the interval is coarse (only 10 distinct resample means)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def paired_differences(rows: list[dict], a: str, b: str, metric: str, steps: int) -> list[float]:
    """metric(a) - metric(b) for every seed that has both runs (labels as RunSpec.label) at `steps`."""
    by = {(label_of(r), r["seed"]): r[metric] for r in rows if r["steps"] == steps}
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    return [by[(a, s)] - by[(b, s)] for s in seeds
            if not (math.isnan(by[(a, s)]) or math.isnan(by[(b, s)]))]


def label_of(row: dict) -> str:
    v = row["variant"]
    return row["method"] if v in ("-", "abs", "") else f"{row['method']}:{v}"


def groups(rows: list[dict]) -> list[tuple[str, int]]:
    order = {"start": 0, "mrpo": 1, "grpo": 2, "gdpo": 3, "mrpo:signed": 4, "mrpo:zero": 5}
    keys = {(label_of(r), r["steps"]) for r in rows}
    return sorted(keys, key=lambda k: (k[1] != 0, k[1], order.get(k[0], 9), k[0]))


def _fmt(m, lo, hi, pct=True) -> str:
    if math.isnan(m):
        return "n/a"
    f = 100.0 if pct else 1.0
    d = 1 if pct else 2
    return f"{m * f:.{d}f} [{lo * f:.{d}f}, {hi * f:.{d}f}]"


def summary_markdown(rows: list[dict], starts: list[dict], n_resamples: int = 10_000, notes: str = "") -> str:
    allrows = starts + rows
    lines = ["# MRPO vs GRPO vs GDPO on the CPU testbed: multi-seed results", "",
             "Mean over seeds and 95% percentile-bootstrap CI of the mean ([low, high], "
             f"{n_resamples} resamples over seeds). Accuracy and early/mid/late/FAR in %, mean K in steps. "
             "With 3 seeds the CI is coarse: it is the spread of 3 numbers, not a population interval.", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| method | RL steps | seeds | accuracy | early | mid | late | FAR | mean K | wrong w/ failure (sum) | unjudged |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab, steps in groups(allrows):
        g = [r for r in allrows if label_of(r) == lab and r["steps"] == steps]
        cells = [_fmt(*bootstrap_ci([r[m] for r in g], n_resamples), pct=m != "mean_k") for m in METRICS]
        name = "start (after warm-up, before RL)" if lab == "start" else lab
        lines.append(f"| {name} | {steps} | {len(g)} | " + " | ".join(cells) +
                     f" | {sum(r['n_wrong_with_failure'] for r in g)} | {sum(r['unjudged'] for r in g)} |")
    lines += ["", "Paired differences by seed (same warm-up checkpoint), mean and 95% bootstrap CI, "
              "percentage points (mean K: steps). A CI that excludes 0 is marked *.", "",
              "| difference | RL steps | seeds | accuracy | early | mid | late | FAR | mean K |",
              "|---|---|---|---|---|---|---|---|---|"]
    labels_at = {}
    for lab, steps in groups(rows):
        labels_at.setdefault(steps, []).append(lab)
    for steps, labs in labels_at.items():
        pairs = [(a, "grpo") for a in labs if a != "grpo" and "grpo" in labs]
        pairs += [(a, "mrpo") for a in labs if a.startswith("mrpo:") and "mrpo" in labs]
        for a, b in pairs:
            cells, n = [], 0
            for m in METRICS:
                d = paired_differences(rows, a, b, m, steps)
                n = max(n, len(d))
                mean, lo, hi = bootstrap_ci(d, n_resamples)
                cell = _fmt(mean, lo, hi, pct=m != "mean_k")
                if not math.isnan(mean) and (lo > 0 or hi < 0):
                    cell += " *"
                cells.append(cell)
            lines.append(f"| {a} - {b} | {steps} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Per run: `runs.csv` (method, variant = algo.valid_step_credit for mrpo, seed, RL steps, test "
              "metrics as fractions, unjudged = wrong answers the judge could not score, rollout_k_last10 = mean "
              "rollout K over the last 10 RL steps, start_* = that seed's evaluation after the warm-up)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def plots(rows: list[dict], starts: list[dict], runs_dir: Path, out: Path, n_resamples: int = 10_000) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    allrows = starts + rows
    keys = groups(allrows)
    if keys:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        names = [f"{lab}\n{steps} st" if lab != "start" else "start" for lab, steps in keys]
        for ax, metric, title in zip(axes, ("accuracy", "early", "mean_k"),
                                     ("test accuracy (%)", "early first failures (% of wrong)", "mean K (steps)")):
            f = 1.0 if metric == "mean_k" else 100.0
            for i, (lab, steps) in enumerate(keys):
                vals = [r[metric] for r in allrows if label_of(r) == lab and r["steps"] == steps]
                m, lo, hi = bootstrap_ci(vals, n_resamples)
                if math.isnan(m):
                    continue
                ax.bar(i, m * f, color="0.8" if lab == "start" else f"C{i % 10}", alpha=0.6)
                ax.errorbar(i, m * f, yerr=[[max(0, (m - lo) * f)], [max(0, (hi - m) * f)]], color="k", capsize=4)
                ax.scatter([i] * len(vals), [v * f for v in vals], color="k", s=10, zorder=3)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(names, fontsize=7)
            ax.set_title(title)
        fig.suptitle("mean over seeds, 95% bootstrap CI (bars), single seeds (dots)")
        fig.tight_layout()
        written.append(out / "methods_ci.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(9, 4))
        bottom = np.zeros(len(keys))
        for j, stage in enumerate(("early", "mid", "late")):
            vals = np.array([np.nanmean([r[stage] for r in allrows if label_of(r) == lab and r["steps"] == st]) * 100
                             for lab, st in keys])
            ax.bar(range(len(keys)), vals, bottom=bottom, label=stage, color=("C3", "C1", "C2")[j])
            bottom += np.nan_to_num(vals)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_ylabel("% of wrong answers with a failure")
        ax.set_title("First Failure Point stage (mean over seeds)")
        ax.legend()
        fig.tight_layout()
        written.append(out / "ffp_stages.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # paired differences by seed (vs GRPO; MRPO variants also vs MRPO)
    pairs = []
    for steps in sorted({r["steps"] for r in rows}):
        labs = list(dict.fromkeys(lab for lab, st in groups(rows) if st == steps))
        pairs += [(a, "grpo", steps) for a in labs if a != "grpo" and "grpo" in labs]
        pairs += [(a, "mrpo", steps) for a in labs if a.startswith("mrpo:") and "mrpo" in labs]
    if pairs:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, metric in zip(axes, ("accuracy", "early", "mean_k")):
            f = 1.0 if metric == "mean_k" else 100.0
            for i, (a, b, steps) in enumerate(pairs):
                d = paired_differences(rows, a, b, metric, steps)
                m, lo, hi = bootstrap_ci(d, n_resamples)
                if math.isnan(m):
                    continue
                ax.errorbar(i, m * f, yerr=[[max(0, (m - lo) * f)], [max(0, (hi - m) * f)]], fmt="o",
                            color=f"C{i % 10}", capsize=4)
                ax.scatter([i] * len(d), [v * f for v in d], color="k", s=10, zorder=3)
            ax.axhline(0, color="0.5", lw=1)
            ax.set_xticks(range(len(pairs)))
            ax.set_xticklabels([f"{a} - {b}\n{st} st" for a, b, st in pairs], fontsize=7)
            ax.set_title(f"paired difference: {metric}" + (" (steps)" if metric == "mean_k" else " (pp)"))
        fig.suptitle("differences by seed (dots) and their mean with 95% bootstrap CI")
        fig.tight_layout()
        written.append(out / "paired_diffs.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # rollout K along training, per method (mean over seeds), for every RL length present
    lengths = sorted({r["steps"] for r in rows})
    if lengths:
        fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
        for ax, steps in zip(axes[0], lengths):
            for i, lab in enumerate(dict.fromkeys(label_of(r) for r in rows if r["steps"] == steps)):
                curves = [rollout_k(Path(runs_dir) / r["run_dir"])[1] for r in rows
                          if label_of(r) == lab and r["steps"] == steps]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = np.mean([c[:n] for c in curves], axis=0)
                w = 5
                smooth = np.convolve(mean, np.ones(w) / w, mode="valid") if n >= w else mean
                ax.plot(np.arange(len(smooth)) + (w if n >= w else 1), smooth, label=f"{lab} ({len(curves)} seeds)",
                        color=f"C{i}")
            ax.axhline(10, color="0.5", ls=":", lw=1)
            ax.set_xlabel("RL step")
            ax.set_ylabel("mean rollout K (5-step moving average)")
            ax.set_title(f"reasoning steps K during training, {steps}-step runs")
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "rollout_k.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report(args) -> None:
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    rows, starts = collect(runs_dir, args.sft_steps), start_rows(runs_dir)
    write_csv(rows, out / "runs.csv")
    notes = (f"Testbed: configs/tiny_cpu.yaml with sft.steps={args.sft_steps}, data.synthetic_test={args.n_test} "
             f"(rule judge, greedy evaluation of all {args.n_test} test questions), one process per run, "
             f"seeds {sorted({r['seed'] for r in rows + starts})}; each seed's warm-up is shared by its methods.")
    (out / "summary.md").write_text(summary_markdown(rows, starts, args.bootstrap, notes))
    plots(rows, starts, runs_dir, out, args.bootstrap)
    print(f"[compare] {len(rows)} runs -> {out / 'runs.csv'}, {out / 'summary.md'}", flush=True)


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--methods", default=None, help=f"comma-separated method[:valid_step_credit] (default "
                   f"{DEFAULT_METHODS}; --full: {FULL_METHODS})")
    p.add_argument("--steps", type=int, default=60, help="RL steps per run (optim.max_steps)")
    p.add_argument("--long-methods", default=None, help=f"methods of the long runs (--full: {FULL_LONG_METHODS})")
    p.add_argument("--long-steps", type=int, default=None, help="RL steps of the long runs (--full: 180; 0 = none)")
    p.add_argument("--long-seeds", default=None, help="seeds of the long runs (default: --seeds)")
    p.add_argument("--full", action="store_true", help="the whole study: variants and 3x-long runs too")
    p.add_argument("--sft-steps", type=int, default=100, help="supervised warm-up steps shared per seed")
    p.add_argument("--n-test", type=int, default=256, help="test questions (data.synthetic_test = eval_limit)")
    p.add_argument("--data-dir", default="data/methods/synthetic", help="synthetic data folder of this study")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "methods"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods"))
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training process")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--report", action="store_true", help="only rebuild runs.csv, summary.md and the plots")
    p.add_argument("--dry-run", action="store_true", help="print the runs still to do and exit")
    p.add_argument("override", nargs="*", help="extra key=value config overrides for every run (e.g. rollout.group_size=4)")
    args = p.parse_args(argv)
    args.methods = args.methods or (FULL_METHODS if args.full else DEFAULT_METHODS)
    args.long_methods = args.long_methods or (FULL_LONG_METHODS if args.full else "")
    if args.long_steps is None:
        args.long_steps = 3 * args.steps if args.full else 0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = plan(seeds, [m for m in args.methods.split(",") if m.strip()], args.steps,
                [m for m in args.long_methods.split(",") if m.strip()], args.long_steps,
                None if args.long_seeds is None else [int(s) for s in args.long_seeds.split(",") if s.strip()])
    todo = pending(runs, Path(args.runs_dir))
    print(f"[compare] {len(runs)} runs planned, {len(runs) - len(todo)} done, {len(todo)} to do", flush=True)
    if args.dry_run:
        for r in todo:
            print(f"  {r.label} seed {r.seed} {r.steps} steps -> {r.run_dir(Path(args.runs_dir))}")
        return 0
    if not args.report:
        for s in dict.fromkeys([seeds[0]] if seeds else []):   # the first warm-up at once; the others when needed
            ensure_sft(args, s)
        for r in todo:
            run_dir = r.run_dir(Path(args.runs_dir))
            if is_done(run_dir) or not acquire(run_dir):
                print(f"[compare] {r.label} seed {r.seed} ({r.steps} steps): done or running elsewhere, skipped",
                      flush=True)
                continue
            try:
                run_one(args, r)
            finally:
                release(run_dir)
            report(args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
