"""Compiles every CUDA Triton kernel of mrpo_kernels ahead of time, without a GPU, and reports the
resources each variant uses: registers, spill bytes, stack frame and shared memory, per arch.

A variant is one kernel x target arch (sm_80, sm_90) x logits dtype (bf16, fp16, fp32) x autotune
config (BLOCK_V, num_warps, num_stages of linear_logprobs.AUTOTUNE_CONFIGS) x constexpr branch
(every combination the launchers can pass). Each is compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` to PTX and cubin, then the PTX goes once more through the ptxas
Triton ships (the one it uses for that arch) with `-v`, whose report gives registers and spills.
Argument types and the 16-byte divisibility hints are those of a real launch from the launchers in
linear_logprobs.py / fused_mrpo_loss.py (torch tensors are 16-byte aligned; V of real vocabularies is
a multiple of 16).

    python benchmarks/aot_compile.py                  # full sweep -> results/aot_compile.{csv,md}
    python benchmarks/aot_compile.py --branches cover  # every branch value, 13 of the 64 loss-kernel branches
    python benchmarks/aot_compile.py --jobs 2 --arch 90 --dtype bf16

tests/kernels/test_aot_compile.py compiles a representative subset of the same variants.
Works with triton 3.6 .. 3.9 (ASTSource(fn, signature, constexprs, attrs) with constexprs in the
signature as "constexpr", backends.nvidia.compiler.get_ptxas); needs no CUDA driver.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARCHS = (80, 90)
DTYPES = ("bf16", "fp16", "fp32")

# Runtime argument types of each kernel as its launcher passes them ("{logits}": the logits dtype).
# stride_row and V are Python ints below 2**31 (i32); targets are int64 token ids.
ARG_TYPES = {
    "_logprobs_kernel": {
        "logits_ptr": "*{logits}", "stride_row": "i32", "targets_ptr": "*i64", "logp_ptr": "*fp32",
        "ent_ptr": "*fp32", "V": "i32", "inv_t": "fp32",
    },
    "_mrpo_loss_kernel": {
        "logits_ptr": "*{logits}", "stride_row": "i32", "targets_ptr": "*i64", "adv_ptr": "*fp32",
        "step_ptr": "*i32", "nsteps_ptr": "*i32", "valid_ptr": "*i8", "correct_ptr": "*i8",
        "tokw_ptr": "*fp32", "old_ptr": "*fp32", "ref_ptr": "*fp32", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
        "loss_ptr": "*fp32", "ahat_ptr": "*fp32", "clip_ptr": "*i8", "kl_ptr": "*fp32", "V": "i32",
        "inv_t": "fp32", "eps_low": "fp32", "eps_high": "fp32", "beta": "fp32",
    },
}
DIVISIBLE_INTS = ("V", "stride_row")  # 16 | V for real vocabularies, and the row stride is V


@dataclass(frozen=True)
class Variant:
    kernel: str
    arch: int
    logits: str
    block_v: int
    num_warps: int
    num_stages: int
    branch: tuple  # ((constexpr name, value), ...) without BLOCK_V

    @property
    def branch_str(self) -> str:
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.branch)


@dataclass
class Result:
    variant: Variant
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared_bytes: int | None = None
    compile_s: float = 0.0
    error: str = ""


def kernels():
    """{name: the non-interpreted JITFunction}; refuses interpreter-mode kernels (TRITON_INTERPRET=1)."""
    from mrpo_kernels.fused_mrpo_loss import _mrpo_loss_kernel
    from mrpo_kernels.linear_logprobs import _logprobs_kernel
    from mrpo_kernels.utils import triton_interpreted

    if triton_interpreted(_logprobs_kernel):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: unset it to compile for CUDA")
    return {"_logprobs_kernel": _logprobs_kernel, "_mrpo_loss_kernel": _mrpo_loss_kernel}


LOSS_FLAGS = ("HAS_OLD", "HAS_REF", "WITH_ENTROPY", "COMPUTE_GRAD")


def branches(kernel: str, cover: bool = False) -> list[tuple]:
    """Every constexpr combination (except BLOCK_V) the launchers pass to `kernel`.

    cover=True: for the loss kernel a subset in which every branch value occurs: all flags off, all on,
    each flag flipped from either, and every (SHAPING, VALID_CREDIT) with all other flags on (13 of 64)."""
    if kernel == "_logprobs_kernel":
        return [(("WITH_ENTROPY", e),) for e in (False, True)]
    from mrpo_kernels.fused_mrpo_loss import K3_MAX, LOG_RATIO_MAX

    shapings = ((False, 0), (True, 0), (True, 1), (True, 2))   # credit matters only when shaping
    combos = [(flags, sc) for flags in itertools.product((False, True), repeat=len(LOSS_FLAGS)) for sc in shapings]
    if cover:
        keep = set()
        for base in (False, True):
            keep.add(((base,) * 4, shapings[2 if base else 0]))
            for i in range(len(LOSS_FLAGS)):
                flipped = tuple(not base if j == i else base for j in range(len(LOSS_FLAGS)))
                keep.add((flipped, shapings[2 if base else 0]))
        keep.update(((True,) * 4, sc) for sc in shapings)
        combos = [c for c in combos if c in keep]
    out = []
    for (has_old, has_ref, with_entropy, grad), (shaping, credit) in combos:
        out.append((("HAS_OLD", has_old), ("HAS_REF", has_ref), ("SHAPING", shaping), ("VALID_CREDIT", credit),
                    ("WITH_ENTROPY", with_entropy), ("COMPUTE_GRAD", grad),
                    ("LOG_RATIO_MAX", LOG_RATIO_MAX), ("K3_MAX", K3_MAX)))
    return out


def autotune_configs() -> list[tuple[int, int, int]]:
    """(BLOCK_V, num_warps, num_stages) of every autotune config of the kernels."""
    from mrpo_kernels.linear_logprobs import AUTOTUNE_CONFIGS

    return [(c.kwargs["BLOCK_V"], c.num_warps, c.num_stages) for c in AUTOTUNE_CONFIGS]


def all_variants(archs=ARCHS, dtypes=DTYPES, kernel_names=tuple(ARG_TYPES), cover: bool = False) -> list[Variant]:
    return [
        Variant(k, arch, dt, bv, nw, ns, br)
        for k in kernel_names for arch in archs for dt in dtypes
        for bv, nw, ns in autotune_configs() for br in branches(k, cover)
    ]


def ast_source(fn, variant: Variant):
    """The ASTSource of one variant: signature over all arguments (constexprs typed "constexpr"),
    constexpr values, and tt.divisibility=16 on pointers and the divisible ints."""
    from triton.compiler import ASTSource

    types = {k: v.format(logits=variant.logits) for k, v in ARG_TYPES[variant.kernel].items()}
    consts = {**dict(variant.branch), "BLOCK_V": variant.block_v}
    unknown = set(fn.arg_names) - set(types) - set(consts)
    stale = (set(types) | set(consts)) - set(fn.arg_names)
    if unknown or stale:
        raise ValueError(f"{variant.kernel}: update ARG_TYPES/branches in {Path(__file__).name}: "
                         f"untyped arguments {sorted(unknown)}, unknown names {sorted(stale)}")
    signature = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or n in DIVISIBLE_INTS}
    return ASTSource(fn, signature, consts, attrs)


_PTXAS_RE = {
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and stack frame of the kernel in `ptx` from `ptxas -v` (the ptxas Triton uses
    for `arch`, same --gpu-name)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
             "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"no '{key}' in the ptxas report: {log.strip()[-500:]}")
        out[key] = int(m.group(1))
    return out


def compile_variant(variant: Variant) -> Result:
    """Compiles one variant for its arch and measures it; errors are recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = Result(variant)
    t0 = time.perf_counter()
    try:
        fn = kernels()[variant.kernel]
        compiled = triton.compile(
            ast_source(fn, variant), target=GPUTarget("cuda", variant.arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        res.shared_bytes = int(compiled.metadata.shared)
        for k, v in ptxas_report(compiled.asm["ptx"], variant.arch).items():
            setattr(res, k, v)
    except Exception as exc:  # noqa: BLE001 - a compile error is a finding to report
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
    res.compile_s = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------------------------- report
CSV_FIELDS = ["kernel", "arch", "logits_dtype", "BLOCK_V", "num_warps", "num_stages", "constexprs", "registers",
              "spill_stores", "spill_loads", "stack_frame", "shared_bytes", "compile_s", "error"]


def write_csv(results: list[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in results:
            v = r.variant
            w.writerow([v.kernel, f"sm_{v.arch}", v.logits, v.block_v, v.num_warps, v.num_stages, v.branch_str,
                        r.registers, r.spill_stores, r.spill_loads, r.stack_frame, r.shared_bytes,
                        f"{r.compile_s:.2f}", r.error])


def summary_md(results: list[Result], versions: str, wall_s: float, branches_mode: str = "all") -> str:
    """Per kernel x arch x dtype x config: variants, max registers, max spills, max shared memory."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        v = r.variant
        groups.setdefault((v.kernel, v.arch, v.logits, v.block_v, v.num_warps, v.num_stages), []).append(r)
    n_err = sum(bool(r.error) for r in results)
    n_spill = sum(bool(r.spill_stores or r.spill_loads) for r in results)
    lines = [
        "# Ahead-of-time compilation of the mrpo_kernels Triton kernels (no GPU)",
        "",
        f"{versions}. {len(results)} variants (kernel x arch x logits dtype x autotune config x constexpr "
        f"branch; loss-kernel branches: {branches_mode}) in {wall_s:.0f} s: **{n_err} compile errors, "
        f"{n_spill} variants with spills**.",
        "Registers, spills and stack from `ptxas -v` (Triton's own ptxas for the arch); shared memory from "
        "the compiled kernel's metadata. Max over the constexpr branches of each row.",
        f"Re-run: `python benchmarks/aot_compile.py --branches {branches_mode}` (see its docstring).",
        "",
        "| kernel | arch | logits | BLOCK_V | warps | stages | branches | max regs | max spill st/ld (B) "
        "| max stack (B) | max shared (B) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mx(rs, key):
        vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
        return max(vals) if vals else "-"

    for key, rs in groups.items():
        kernel, arch, dt, bv, nw, ns = key
        lines.append(
            f"| {kernel} | sm_{arch} | {dt} | {bv} | {nw} | {ns} | {len(rs)} | {mx(rs, 'registers')} | "
            f"{mx(rs, 'spill_stores')}/{mx(rs, 'spill_loads')} | {mx(rs, 'stack_frame')} | {mx(rs, 'shared_bytes')} "
            f"| {sum(bool(r.error) for r in rs)} |"
        )
    bad = [r for r in results if r.error or r.spill_stores or r.spill_loads]
    if bad:
        lines += ["", "## Variants with errors or spills", ""]
        for r in bad[:200]:
            v = r.variant
            lines.append(f"- {v.kernel} sm_{v.arch} {v.logits} BLOCK_V={v.block_v} warps={v.num_warps} "
                         f"{v.branch_str}: {r.error or f'spills {r.spill_stores}/{r.spill_loads} B'}")
    return "\n".join(lines) + "\n"


def versions_line() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = {a: subprocess.run([get_ptxas(a).path, "--version"], capture_output=True, text=True).stdout
             .strip().splitlines()[-1] for a in ARCHS}
    return f"triton {triton.__version__}; ptxas: " + "; ".join(f"sm_{a}: {v}" for a, v in ptxas.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES, help="logits/hidden dtypes")
    ap.add_argument("--kernel", nargs="+", default=list(ARG_TYPES), choices=list(ARG_TYPES))
    ap.add_argument("--branches", choices=["all", "cover"], default="all",
                    help="constexpr branches of the loss kernel: all 64 combinations, or a cover in which every "
                         "branch value occurs (13; see `branches`)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compile processes")
    ap.add_argument("--out", default=str(RESULTS_DIR / "aot_compile"), help="path stem of the .csv and .md")
    args = ap.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)
    kernels()  # fail fast in interpreter mode
    variants = all_variants(tuple(args.arch), tuple(args.dtype), tuple(args.kernel), args.branches == "cover")
    print(f"{len(variants)} variants, {args.jobs} processes", flush=True)
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, r in enumerate(pool.map(compile_variant, variants, chunksize=8)):
            results.append(r)
            if r.error or r.spill_stores or r.spill_loads:
                print(f"  {r.variant.kernel} sm_{r.variant.arch} {r.variant.logits} {r.variant.block_v}/"
                      f"{r.variant.num_warps} {r.variant.branch_str}: {r.error or 'SPILLS'}", flush=True)
            if (i + 1) % 200 == 0:
                print(f"  {i + 1}/{len(variants)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(results, out.with_suffix(".csv"))
    md = summary_md(results, versions_line(), wall, args.branches)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
