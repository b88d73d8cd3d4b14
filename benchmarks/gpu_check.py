"""The GPU acceptance run (issue 14): stages, time budget, summary. Started by benchmarks/gpu_check.sh,
which first unpacks the carried wheels this machine lacks (`--unpack-wheels`, standard library only).

Stages (each a subprocess with its own time limit, within --budget-s; a stage that no longer fits is
skipped and says so):
  env        versions (torch, triton, transformers, peft, Liger-Kernel), GPU, TF32 settings
  tests      the GPU tests: `pytest -m gpu tests/kernels tests/models/test_varlen_attention.py` (bf16 Triton
             kernels vs the fp32 reference; the CUDA varlen attention kernels vs per-sequence SDPA)
  bandwidth  device-to-device copy of a 4 GiB buffer: GB/s counting bytes read + written
  loss       bench_loss at bf16 N=16384, D=4096, V=151936 (fwd+bwd): ours-triton vs the three cuBLAS
             GEMMs (bound) vs Liger-Kernel, time and peak memory
  model      a random-initialised Qwen2.5-VL-shaped model of ~1.9B parameters (gpu_models.py)
  plan       bench_plan on that model (loss.beta=0.04: reference pass on): mrpo.plan's per-phase peak of the
             shapes the step ran vs torch.cuda.max_memory_allocated per phase, target |error| <= 15%
  step       bench_step on that model, one GPU, rollout.decode=eager: tokens/s, phases, decode ms/token
  packing    bench_step --compare-packing on that model: the loss + backward of one rollout with the packed
             (varlen attention) and the padded forward, interleaved, and the rollout's per-token log-probs
             of both in bf16 (max abs difference); names the packed attention kernel that ran
  step_fast  the same with rollout.decode=static_compiled (static KV cache, compiled decode step)
  decode     our decode loop on that model (benchmarks/gpu_decode.py: 2 prompts x G = 8, 128 new tokens;
             CUDA graphs per batch bucket): tokens/s, graph captures, ms per decode step and its ratio to
             the weight-read bound = bytes one decode step reads / HBM bandwidth (--hbm-gbs, else the
             device's peak from HBM_GBS, else the measured copy bandwidth; the report names which)
  report     summary.md / summary.csv against the targets: fused loss fwd+bwd <= 1.15x the three GEMMs
             and peak memory <= Liger's; decode step <= 3x the time to read the weights once at the
             measured bandwidth; the decode loop's step / its weight-read bound (reported, no target yet)
--dry-run: every stage at toy sizes on the CPU (CUDA-only parts skipped with a message), so that import
and syntax errors show here and not on the GPU machine.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# peak HBM bandwidth (GB/s, vendor figures) by a part of torch.cuda.get_device_name(); first match wins
HBM_GBS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("GH200", 4000.0),
           ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0),
           ("L4", 300.0), ("A10G", 600.0), ("A10", 600.0), ("RTX 4090", 1008.0), ("MI300X", 5300.0))


def hbm_gbs(device: str, flag: float | None = None, measured: float | None = None) -> tuple[float | None, str]:
    """(bandwidth GB/s, where it came from): the --hbm-gbs flag, the HBM_GBS entry of the device name, or
    the measured copy bandwidth (bytes read + written per second: reading alone runs at about that rate)."""
    if flag:
        return flag, "--hbm-gbs"
    for part, gbs in HBM_GBS:
        if part in device:
            return gbs, f"peak HBM of {part}"
    return (measured, "measured copy") if measured else (None, "unknown")


# ----------------------------------------------------------------------------- wheels (stdlib only)


def wheel_modules(whl: Path) -> list[str]:
    """Top-level importable names a wheel installs (packages and modules, not *.dist-info / *.libs)."""
    names = set()
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            first = n.split("/", 1)[0]
            if first.endswith((".dist-info", ".data", ".libs")):
                continue
            first = first[:-3] if first.endswith(".py") and "/" not in n else first
            if first.isidentifier():
                names.add(first)
    return sorted(names)


def unpack_wheels(wheel_dir: Path, site: Path) -> None:
    """Unpack into `site` each wheel whose modules this interpreter cannot import (the machine's own
    packages win); mrpo_kernels must import from the repository root on PYTHONPATH."""
    site.mkdir(parents=True, exist_ok=True)
    used, kept = [], []
    py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for whl in sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []:
        tags = whl.name[:-4].split("-")
        if tags[-3].startswith("cp") and tags[-3] != py_tag:
            kept.append(f"{tags[0]} (wheel is {tags[-3]}, not for this Python {py_tag})")
            continue
        mods = wheel_modules(whl)
        if mods and all(importlib.util.find_spec(m) is not None for m in mods):
            kept.append(whl.name.split("-")[0])
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        used.append(whl.name)
    if importlib.util.find_spec("mrpo_kernels") is None:
        sys.exit("gpu_check: mrpo_kernels is not importable: put the repository root on PYTHONPATH")
    print(f"gpu_check: wheels unpacked: {', '.join(used) or 'none'}; the machine's own: {', '.join(kept) or 'none'}")
    if not wheel_dir.is_dir():
        print(f"gpu_check: no wheel folder {wheel_dir} (bash benchmarks/gpu_wheels.sh makes it)")


# ----------------------------------------------------------------------------- stages


class Runner:
    """Runs the stages in order within the budget; records what happened to each."""

    def __init__(self, args):
        self.args, self.t0, self.results = args, time.perf_counter(), {}
        self.py = [sys.executable] + (["-S"] if sys.flags.no_site else [])

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, cap_s: float, cmd: list[str], min_s: float = 20.0) -> bool:
        """Run cmd (limited to min(cap_s, budget left - reserve)); False if skipped or failed."""
        limit = min(cap_s, self.left() - self.args.reserve_s)
        if limit < min_s:
            self.results[name] = {"status": "skipped", "why": f"{self.left():.0f} s of the budget left"}
            print(f"== {name}: SKIPPED ({self.left():.0f} s of the {self.args.budget_s:.0f} s budget left)", flush=True)
            return False
        print(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        log = Path(self.args.out) / f"{name}.log"
        with open(log, "w") as f:
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit,
                                   cwd=REPO)
                out, rc = p.stdout, p.returncode
            except subprocess.TimeoutExpired as e:
                out = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or ""
                rc = "timeout"
            f.write(out)
        dt = time.perf_counter() - t
        tail = "\n".join(out.strip().splitlines()[-15:])
        print(tail, flush=True)
        ok = rc == 0
        self.results[name] = {"status": "ok" if ok else f"failed ({rc})", "s": round(dt, 1), "log": log.name}
        print(f"== {name}: {'ok' if ok else 'FAILED (' + str(rc) + ')'} in {dt:.0f} s", flush=True)
        return ok

    def note(self, name: str, status: str, **info) -> None:
        self.results[name] = {"status": status, **info}
        print(f"== {name}: {status} {json.dumps(info) if info else ''}", flush=True)


def env_info(dry: bool) -> dict:
    import importlib.metadata as md

    import torch

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "triton": ver("triton"),
        "transformers": ver("transformers"), "peft": ver("peft"), "liger_kernel": ver("liger-kernel"),
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)" if dry else "cpu",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def bandwidth_gbs(nbytes: int, reps: int = 10) -> dict:
    """Copy bandwidth: a `nbytes` buffer copied into another `reps` times; bytes read + written per second."""
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).fill_(1)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        s = start.elapsed_time(end) / 1e3 / reps
    else:
        t = time.perf_counter()
        for _ in range(reps):
            b.copy_(a)
        s = (time.perf_counter() - t) / reps
    return {"bytes": nbytes, "copy_s": s, "gb_per_s": 2 * nbytes / s / 1e9, "device": dev}


def read_loss_csv(path: Path) -> dict:
    """{(provider, metric): p50} of the fwd+bwd rows of a bench_loss CSV (empty p50 = n/a, left out)."""
    out = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["mode"] == "fwd+bwd" and r["p50"]:
                out[(r["provider"], r["metric"])] = float(r["p50"])
    return out


def report(args, runner: Runner, env: dict, bw: dict | None) -> None:
    out = Path(args.out)
    rows, lines = [], []

    def add(metric, value, unit, target="", met=""):
        if isinstance(value, float):
            value = float(f"{value:.4g}")
        rows.append({"metric": metric, "value": value, "unit": unit, "target": target, "met": met})

    ours = "ours-triton" if not args.dry_run else "ours-torch"
    loss_csv = out / f"loss_{args.tag}.csv"
    if loss_csv.exists():
        L = read_loss_csv(loss_csv)
        t_ours, t_bound, t_liger = (L.get((p, "time")) for p in (ours, "bound", "liger"))
        m_ours, m_liger, m_bound = (L.get((p, "peak_mem_extra")) for p in (ours, "liger", "bound"))
        add(f"loss fwd+bwd {ours}", t_ours, "ms")
        add("loss fwd+bwd 3 GEMMs (bound)", t_bound, "ms")
        add("loss fwd+bwd liger", t_liger, "ms")
        if t_ours and t_bound:
            r = t_ours / t_bound
            add("loss ours / 3 GEMMs", round(r, 3), "x", "<= 1.15", "yes" if r <= 1.15 else "no")
        if t_ours and t_liger:
            add("loss ours / liger", round(t_ours / t_liger, 3), "x")
        add(f"loss peak mem {ours}", m_ours, "MiB")
        add("loss peak mem liger", m_liger, "MiB")
        add("loss peak mem 3 GEMMs", m_bound, "MiB")
        if m_ours is not None and m_liger is not None:
            add("loss peak mem ours / liger", round(m_ours / m_liger, 3) if m_liger else "", "x", "<= 1",
                "yes" if m_ours <= m_liger else "no")
    if bw:
        add("copy bandwidth (read + write)", round(bw["gb_per_s"], 1), "GB/s")
    model_info = out / "model" / "gpu_model.json"
    model = json.loads(model_info.read_text()) if model_info.exists() else None
    if model:
        add("model parameters", model["params"], "count")
        add("weights one decode step reads", round(model["decode_weight_bytes"] / 2 ** 30, 3), "GiB")
    packing = out / "packing.json"
    if packing.exists():
        s = json.loads(packing.read_text())
        add(f"packing loss+backward packed ({s['packed_kernel']})", s["packed_s"], "s")
        add("packing loss+backward padded", s["padded_s"], "s")
        add("packing packed / padded loss+backward", s["ratio_p50"], "x", "<= 1", "yes" if s["ratio_p50"] <= 1 else "no")
        add(f"packing log-probs packed vs padded, max abs diff ({s['dtype']})", s["logprob_max_abs_diff"], "nats")
    plan_json = out / "plan.json"
    if plan_json.exists():
        for phase, r in json.loads(plan_json.read_text())["phases"].items():
            add(f"plan {phase} planned", r["planned_gib"], "GiB")
            add(f"plan {phase} measured", r["measured_gib"], "GiB")
            if r["error"] is not None:
                add(f"plan {phase} error", round(100 * r["error"], 1), "%", "|e| <= 15",
                    "yes" if abs(r["error"]) <= 0.15 else "no")
    for stage in ("step", "step_fast"):
        js = out / f"{stage}.json"
        if not js.exists():
            continue
        s = json.loads(js.read_text())
        add(f"{stage} ({s['decode']}) step", s["step_s"], "s")
        for p, v in s["phases"].items():
            add(f"{stage} phase {p}", v, "s")
        add(f"{stage} tokens/s", s["tokens_per_s"], "tok/s")
        add(f"{stage} padding fraction", s["padding_fraction"], "fraction")
        add(f"{stage} all-gathers per rollout", s["allgathers_per_rollout"], "calls")
        add(f"{stage} decode per token", s["decode_ms_per_token"], "ms")
        if bw and model and s["decode_ms_per_token"]:
            # the copy moved 2 bytes (read + write) per byte copied: reading alone runs at about that rate
            read_ms = 1e3 * model["decode_weight_bytes"] / (bw["gb_per_s"] * 1e9)
            r = s["decode_ms_per_token"] / read_ms
            add(f"{stage} weights read once at measured bandwidth", round(read_ms, 3), "ms")
            add(f"{stage} decode / weight read", round(r, 2), "x", "<= 3", "yes" if r <= 3 else "no")
    dec = out / "decode.json"
    if dec.exists():
        s = json.loads(dec.read_text())
        add(f"decode loop tokens/s ({s['rows']} rows, {s['new_tokens']} new tokens, {s['dtype']})",
            s["tokens_per_s"], "tok/s")
        add("decode loop step", s["decode_step_ms"], "ms")
        add("decode loop prefill", s["prefill_s"], "s")
        add("decode loop graph captures per call", s["graph_captures"], "graphs")
        add("decode loop compactions per call", s["compactions"], "count")
        add("decode loop weights read per step", round(s["weight_bytes"] / 2 ** 30, 4), "GiB")
        gbs, source = hbm_gbs(s["device"], getattr(args, "hbm_gbs", None), bw["gb_per_s"] if bw else None)
        if gbs:
            bound_ms = 1e3 * s["weight_bytes"] / (gbs * 1e9)
            r = s["decode_step_ms"] / bound_ms
            add(f"decode loop weight-read bound ({gbs:g} GB/s, {source})", round(bound_ms, 4), "ms")
            add("decode loop step / weight-read bound", round(r, 2), "x")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "value", "unit", "target", "met"])
        w.writeheader()
        w.writerows(rows)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines += [f"# GPU acceptance run{' (DRY RUN on CPU: toy sizes, not results)' if args.dry_run else ''}", "",
              f"`bash benchmarks/gpu_check.sh{' --dry-run' if args.dry_run else ''}` at {when}, "
              f"{time.perf_counter() - runner.t0:.0f} s of a {args.budget_s:.0f} s budget.", "",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
              "| stage | status | s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']}{' (' + v['why'] + ')' if 'why' in v else ''} | {v.get('s', '')} |"
              for k, v in runner.results.items()]
    lines += ["", "| metric | value | unit | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']} | {r['unit']} | {r['target']} | {r['met']} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"gpu_check: wrote {out / 'summary.md'}, {out / 'summary.csv'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unpack-wheels", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU; CUDA-only parts skipped")
    ap.add_argument("--budget-s", type=float, default=470.0, help="whole run, seconds (issue: 8 minutes)")
    ap.add_argument("--reserve-s", type=float, default=15.0, help="kept for the report, seconds")
    ap.add_argument("--out", help="results folder (default benchmarks/results/gpu; dry run: a temporary folder)")
    ap.add_argument("--skip", nargs="*", default=[], help="stage names to skip")
    ap.add_argument("--hbm-gbs", type=float, default=None,
                    help="HBM bandwidth (GB/s) for the decode stage's weight-read bound (default: device table)")
    args = ap.parse_args(argv)
    if args.unpack_wheels:
        unpack_wheels(Path(args.unpack_wheels), Path(args.site))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    args.out = args.out or (tempfile.mkdtemp(prefix="mrpo_gpu_dry_") if args.dry_run else str(HERE / "results" / "gpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.tag = "dry" if args.dry_run else "h200" if "H200" in torch.cuda.get_device_name() else "cuda"
    runner = Runner(args)
    for stale in ("summary.md", "summary.csv", "step.json", "packing.json", "plan.json", "step_fast.json", "decode.json", f"loss_{args.tag}.csv",
                  "bandwidth.json"):
        (out / stale).unlink(missing_ok=True)   # the report reads only this run's outputs
    py, dry = runner.py, args.dry_run

    env = env_info(dry)
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    runner.note("env", "ok", **{k: env[k] for k in ("torch", "triton", "transformers", "liger_kernel", "tf32_matmul")})

    if "tests" not in args.skip:
        if not cuda:
            print("== tests: the GPU tests need CUDA; running pytest -m gpu anyway (they report as skipped)")
        runner.run("tests", 150, py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/kernels",
                                      "tests/models/test_varlen_attention.py"])

    bw = None
    if "bandwidth" not in args.skip:
        bw = bandwidth_gbs(64 * 2 ** 20 if dry else 4 * 2 ** 30)
        (out / "bandwidth.json").write_text(json.dumps(bw, indent=1) + "\n")
        runner.note("bandwidth", "ok" if cuda else "ok (CPU copy, dry run)", gb_per_s=round(bw["gb_per_s"], 1))

    if "loss" not in args.skip:
        shape = (["--device", "cpu", "--n", "256", "--v", "4096", "--d", "128", "--dtype", "float32", "--reps", "2",
                  "--no-mem", "--seq-len", "64", "--providers", "ours-torch", "liger", "bound", "naive"] if dry else
                 ["--device", "cuda", "--n", "16384", "--v", "151936", "--d", "4096", "--dtype", "bfloat16",
                  "--liger-compiled", "on", "--providers", "ours-triton", "liger", "bound", "naive"])
        runner.run("loss", 150, py + ["benchmarks/bench_loss.py", *shape, "--modes", "fwd+bwd", "--tag", args.tag,
                                      "--out-dir", str(out)])

    model_dir = out / "model"
    if "model" not in args.skip:
        runner.run("model", 120, py + ["benchmarks/gpu_models.py", str(model_dir), "--size", "tiny" if dry else "1.5b",
                                       "--dtype", "float32" if dry else "bfloat16"])
    step_common = (["--steps", "1", "--warmup", "0", "--threads", "1"] if dry else ["--steps", "3", "--warmup", "1"])
    overrides = [f"model.path={model_dir}", "model.family=qwen2_5_vl",
                 f"model.dtype={'float32' if dry else 'bfloat16'}", f"rollout.max_new_tokens={8 if dry else 128}",
                 "optim.per_device_batch_size=8", "optim.grad_accum_steps=2", "rollout.group_size=8"]
    if "plan" not in args.skip:   # issue 23: mrpo.plan's per-phase peaks against the allocator's, same model
        if (model_dir / "gpu_model.json").exists():
            runner.run("plan", 150, py + ["benchmarks/bench_plan.py", "--json", str(out / "plan.json"),
                                          *overrides, "loss.beta=0.04"] + (["--threads", "1"] if dry else []),
                       min_s=40)
        else:
            runner.note("plan", "skipped", why="no model (the model stage failed or was skipped)")
    for stage, decode in (("step", "eager"), ("packing", "eager"), ("step_fast", "static_compiled")):
        if stage in args.skip:
            continue
        if not (model_dir / "gpu_model.json").exists():
            runner.note(stage, "skipped", why="no model (the model stage failed or was skipped)")
            continue
        measure = (["--compare-packing", "2" if dry else "5", "--warmup", "1", "--threads", "1"] if stage == "packing"
                   else step_common)
        runner.run(stage, 120 if stage == "packing" else 200,
                   py + ["benchmarks/bench_step.py", *measure, "--tag", f"{args.tag}_{stage}", "--out-dir", str(out),
                         "--json", str(out / f"{stage}.json"), *overrides, f"rollout.decode={decode}"], min_s=60)

    if "decode" not in args.skip:
        if (model_dir / "gpu_model.json").exists():
            shape = ["--new-tokens", "8", "--reps", "1", "--threads", "1"] if dry else ["--new-tokens", "128", "--reps", "3"]
            runner.run("decode", 120, py + ["benchmarks/gpu_decode.py", str(model_dir), "--json", str(out / "decode.json"),
                                            "--prompts", "2", "--group", "8", *shape], min_s=40)
        else:
            runner.note("decode", "skipped", why="no model (the model stage failed or was skipped)")

    report(args, runner, env, bw)
    shutil.rmtree(model_dir, ignore_errors=True)   # GBs of random weights: never results
    failed = [k for k, v in runner.results.items() if v["status"].startswith("failed")]
    if failed:
        print(f"gpu_check: FAILED stages: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
