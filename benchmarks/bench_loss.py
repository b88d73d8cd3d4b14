"""Loss microbenchmark: our fused MRPO loss vs naive PyTorch, Liger-Kernel and the 3-matmul bound.

    python benchmarks/bench_loss.py --quick                 # CPU smoke run, ~2-3 min on 2 cores
    python benchmarks/bench_loss.py                         # CPU sweep: N x V in {32000,128256,151936}, D=1024, fp32
    python benchmarks/bench_loss.py --device cuda           # GPU sweep: bf16, D=4096, N up to 16384

Providers (one shape: N tokens packed in N/T sequences of T tokens, hidden [N, D], lm_head [V, D]):
  ours-torch   mrpo_kernels, backend="torch" (chunked PyTorch; the CPU training path)
  ours-triton  mrpo_kernels, backend="triton" (CUDA only)
  naive        full N x V logits in fp32: log_softmax + gather (fwd); mrpo.algo.reference (fwd+bwd)
  liger        Liger-Kernel: LigerFusedLinearGRPOLoss (fwd+bwd, beta=0, matching loss_type) and its
               chunked selective log-prob (fwd); no MRPO shaping (Liger has none)
  bound        bare matmuls of the same shapes: hidden @ W^T (fwd); + dlogits @ W and dlogits^T @ hidden
               (fwd+bwd) -- the FLOP floor any exact method pays (6 N D V in fwd+bwd)
Modes: "fwd" (linear_logprobs: log-probs only, no autograd state) and "fwd+bwd" (loss + backward to
hidden and weight).

Time: p50/p20/p80 in ms (CPU: providers interleaved round by round in one process; CUDA: do_bench).
Memory: peak bytes above the inputs (CPU: fresh process per case, peak RSS; CUDA: max allocated).
Cases whose estimated memory exceeds --mem-budget-gib are recorded as "n/a" with the reason.
Writes benchmarks/results/loss_<tag>.csv (long format), loss_<tag>_V<V>.png and loss_<tag>.md, and
prints ours/bound, ours/liger and ours/naive ratios.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROVIDERS = ["ours-torch", "ours-triton", "naive", "liger", "bound"]
MODES = ["fwd", "fwd+bwd"]
KERNEL_NAME = {"fwd": "linear_logprobs", "fwd+bwd": "fused_linear_mrpo_loss"}
LIGER_LOSS_TYPE = {"seq-mean-token-mean": "grpo", "token-mean": "bnpo", "seq-mean-token-sum-norm": "dr_grpo"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """One benchmark case's tensors. hidden: [N, D], weight: [V, D], per-token tensors [N], B = N / T."""
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor        # [N] int64
    advantages: torch.Tensor     # [N] fp32, A_i of the token's sequence
    step_index: torch.Tensor     # [N] int32, -1 for the answer span
    num_steps: torch.Tensor      # [N] int32
    step_valid: torch.Tensor     # [N] bool
    answer_correct: torch.Tensor # [N] bool
    cu_seqlens: torch.Tensor     # [B+1] int32
    seq_adv: torch.Tensor        # [B] fp32 (Liger takes per-sequence advantages)
    mask: torch.Tensor           # [B, T] ones (Liger's attention mask; no padding)
    B: int
    T: int
    dlogits: torch.Tensor | None = None  # [N, V] upstream gradient stand-in for the bound

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_inputs(N: int, V: int, D: int, dtype: torch.dtype, device: str, seq_len: int, grad: bool,
                seed: int = 0, weight: torch.Tensor | None = None, dlogits: bool = False) -> Inputs:
    """Random inputs with realistic step structure: each sequence of T tokens has K in [1, 12] steps
    covering its first 7/8 and an answer span (no step) in the last 1/8; 70% of steps valid, half of
    the answers correct. Logits ~ N(0, 1)."""
    T = min(seq_len, N)
    if N % T:
        raise ValueError(f"N={N} is not a multiple of the sequence length T={T}; pick N or --seq-len to fit")
    B = N // T
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, D, device=device, dtype=dtype, generator=gen)
    if weight is None:
        weight = torch.randn(V, D, device=device, dtype=dtype, generator=gen).mul_(D ** -0.5)
    hidden.requires_grad_(grad)
    weight.requires_grad_(grad)

    g = torch.Generator().manual_seed(seed + 1)  # small per-token metadata: build on CPU, then move
    targets = torch.randint(0, V, (N,), generator=g)
    seq_adv = torch.randn(B, generator=g)
    K = torch.randint(1, 13, (B,), generator=g)
    correct = torch.rand(B, generator=g) < 0.5
    n_reason = T - max(1, T // 8)
    pos = torch.arange(T)
    step_index = torch.where(pos[None, :] < n_reason, pos[None, :] * K[:, None] // n_reason, -1)  # [B, T]
    valid_steps = torch.rand(B, 12, generator=g) < 0.7
    step_valid = torch.gather(valid_steps, 1, step_index.clamp_min(0)) & (step_index >= 0)
    to = dict(device=device)
    return Inputs(
        hidden=hidden, weight=weight, targets=targets.to(**to),
        advantages=seq_adv.repeat_interleave(T).to(**to),
        step_index=step_index.reshape(N).to(torch.int32).to(**to),
        num_steps=K.repeat_interleave(T).to(torch.int32).to(**to),
        step_valid=step_valid.reshape(N).to(**to),
        answer_correct=correct.repeat_interleave(T).to(**to),
        cu_seqlens=torch.arange(0, N + 1, T, dtype=torch.int32).to(**to),
        seq_adv=seq_adv.to(**to), mask=torch.ones(B, T, **to), B=B, T=T,
        dlogits=(torch.randn(N, V, device=device, dtype=dtype, generator=gen).mul_(1e-3) if dlogits else None),
    )


# ----------------------------------------------------------------------------- providers


@dataclass
class Settings:
    shaping: str = "mrpo"
    loss_agg: str = "seq-mean-token-mean"
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    liger_compiled: bool = False
    chunk_size: int | None = None


def _loss_kwargs(x: Inputs, s: Settings) -> dict:
    return dict(eps_low=s.eps_low, eps_high=s.eps_high, beta=0.0, temperature=s.temperature,
                loss_agg=s.loss_agg, max_completion_length=x.T, shaping=s.shaping)


def _step_args(x: Inputs) -> tuple:
    return (x.hidden, x.weight, x.targets, x.advantages, x.step_index, x.num_steps, x.step_valid,
            x.answer_correct, x.cu_seqlens)


def make_fn(provider: str, mode: str, x: Inputs, s: Settings):
    """A zero-argument callable running one provider once on x (fwd+bwd: clears grads, then loss.backward())."""
    if provider.startswith("ours-"):
        from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs

        backend = provider.split("-", 1)[1]
        if mode == "fwd":
            return lambda: linear_logprobs(x.hidden, x.weight, x.targets, temperature=s.temperature,
                                           backend=backend)

        def ours_step():
            x.zero_grad()
            loss, _ = fused_linear_mrpo_loss(*_step_args(x), **_loss_kwargs(x, s), backend=backend,
                                             chunk_size=s.chunk_size)
            loss.backward()
            return loss
        return ours_step

    if provider == "naive":
        if mode == "fwd":
            @torch.no_grad()
            def naive_fwd():
                dt = torch.promote_types(x.hidden.dtype, torch.float32)  # as mrpo.algo.reference
                logits = (x.hidden.to(dt) @ x.weight.to(dt).T) / s.temperature
                return torch.log_softmax(logits, dim=-1).gather(1, x.targets[:, None]).squeeze(1)
            return naive_fwd
        from mrpo.algo.reference import reference_mrpo_loss

        def naive_step():
            x.zero_grad()
            out = reference_mrpo_loss(*_step_args(x), **_loss_kwargs(x, s))
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss
        return naive_step

    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        ids = x.targets.view(x.B, x.T)
        if mode == "fwd":
            @torch.no_grad()
            def liger_fwd():
                return LigerFusedLinearPPOBase.chunk_forward(x.hidden.view(x.B, x.T, -1), x.weight, ids,
                                                             temperature=s.temperature)
            return liger_fwd
        liger = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=s.liger_compiled, use_ref_model=False, epsilon_low=s.eps_low,
            epsilon_high=s.eps_high, loss_type=LIGER_LOSS_TYPE[s.loss_agg], max_completion_length=x.T,
            temperature=s.temperature)

        def liger_step():
            x.zero_grad()
            loss, _ = liger(x.hidden.view(x.B, x.T, -1), x.weight, ids, x.mask, x.seq_adv)
            loss.backward()
            return loss
        return liger_step

    if provider == "bound":
        h, w, dl = x.hidden.detach(), x.weight.detach(), x.dlogits
        if mode == "fwd":
            return lambda: h @ w.T

        def bound_step():
            return h @ w.T, dl @ w, dl.T @ h
        return bound_step
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def unavailable_reason(provider: str, device: str) -> str | None:
    """Why a provider cannot run here (None when it can)."""
    if provider == "ours-triton" and not device.startswith("cuda"):
        return "n/a: Triton backend needs CUDA (on CPU it only runs under TRITON_INTERPRET=1, a correctness tool)"
    if provider == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as e:  # broken or missing install: record instead of failing the sweep
            return f"n/a: liger_kernel import failed: {type(e).__name__}: {e}"
    return None


def estimate_extra_bytes(provider: str, mode: str, N: int, V: int, D: int, esize: int) -> int:
    """Rough peak memory above the inputs, used only to skip cases that would not fit (bytes)."""
    nv = N * V
    grads = (N + V) * D * esize if mode == "fwd+bwd" else 0
    if provider == "naive":
        return (nv * 4 * (2 if mode == "fwd" else 5)) + nv * esize + grads
    if provider == "bound":
        return nv * esize * (1 if mode == "fwd" else 2) + grads  # fwd+bwd includes the dlogits input
    return 4 * V * D + grads  # chunked providers: a few V x D fp32 buffers at most


# ----------------------------------------------------------------------------- one case


def _rows(base: dict, provider: str, metric: str, unit: str, vals, note: str = "") -> dict:
    p50, p20, p80 = vals if vals is not None else ("", "", "")
    return {**base, "provider": provider, "metric": metric, "unit": unit, "p50": p50, "p20": p20, "p80": p80,
            "note": note}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def mem_case(spec: dict) -> dict:
    """Peak CPU memory of one provider/mode/shape; run in a fresh process (common.run_isolated)."""
    common.set_malloc_mmap_threshold()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    s = Settings(**spec["settings"])
    dtype = DTYPES[spec["dtype"]]
    grad = spec["mode"] == "fwd+bwd"
    need_dl = spec["provider"] == "bound" and grad
    x = make_inputs(spec["N"], spec["V"], spec["D"], dtype, "cpu", spec["seq_len"], grad, dlogits=need_dl)
    # warm up library state (thread pools, MKL buffers) on a small slice sharing the same weight
    n_small = min(x.T, 64)
    small = make_inputs(n_small, spec["V"], spec["D"], dtype, "cpu", n_small, grad, weight=x.weight,
                        dlogits=need_dl)
    make_fn(spec["provider"], spec["mode"], small, s)()
    del small
    x.zero_grad()
    nbytes, method = common.cpu_peak_extra_bytes(make_fn(spec["provider"], spec["mode"], x, s))
    return {"bytes": nbytes, "method": method}


PRELOAD = ["torch", "numpy", "mrpo_kernels", "mrpo.algo.reference", "liger_kernel.chunked_loss"]


def run_case(args, provider_list: list[str], mode: str, N: int, V: int, s: Settings, meta: dict) -> list[dict]:
    """Time (and measure memory of) every provider at one (mode, N, V); returns CSV rows."""
    dtype = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    base = {**meta, "kernel": KERNEL_NAME[mode], "mode": mode, "x_name": "N", "x_value": N, "V": V,
            "D": args.d, "dtype": args.dtype}
    rows, runnable = [], []
    for p in provider_list:
        reason = unavailable_reason(p, args.device)
        est = estimate_extra_bytes(p, mode, N, V, args.d, esize)
        if reason is None and est > args.mem_budget_gib * GIB:
            reason = f"n/a: skipped, needs ~{est / GIB:.1f} GiB > budget {args.mem_budget_gib:.1f} GiB"
        if reason:
            rows += [_rows(base, p, "time", "ms", None, reason), _rows(base, p, "peak_mem_extra", "MiB", None, reason)]
        else:
            runnable.append(p)
    if not runnable:
        return rows
    grad = mode == "fwd+bwd"
    x = make_inputs(N, V, args.d, dtype, args.device, args.seq_len, grad,
                    dlogits=("bound" in runnable and grad))
    fns = {p: make_fn(p, mode, x, s) for p in runnable}

    if args.device.startswith("cuda"):
        for p, fn in fns.items():
            try:
                if not args.no_time:
                    t = common.time_cuda(fn, grad_to_none=[x.hidden, x.weight] if grad else None)
                    rows.append(_rows(base, p, "time", "ms", t))
                x.zero_grad()
                m = common.cuda_peak_extra_bytes(fn) / 2 ** 20
                x.zero_grad()
                rows.append(_rows(base, p, "peak_mem_extra", "MiB", (m, m, m)))
            except torch.OutOfMemoryError:
                x.zero_grad()
                torch.cuda.empty_cache()
                rows += [_rows(base, p, "time", "ms", None, "n/a: CUDA out of memory"),
                         _rows(base, p, "peak_mem_extra", "MiB", None, "n/a: CUDA out of memory")]
        del fns, x
        torch.cuda.empty_cache()
        return rows

    wall, cpu = ({}, {}) if args.no_time else common.time_interleaved_cpu(fns, warmup=args.warmup, reps=args.reps)
    del fns, x
    for p in wall:
        rows.append(_rows(base, p, "time", "ms", common.quantiles_ms(wall[p]), f"wall, reps={args.reps}"))
        rows.append(_rows(base, p, "cpu_time", "ms", common.quantiles_ms(cpu[p]),
                          f"process CPU time (all threads), reps={args.reps}"))
    if args.no_mem:
        return rows
    for p in runnable:
        spec = {"provider": p, "mode": mode, "N": N, "V": V, "D": args.d, "dtype": args.dtype,
                "seq_len": args.seq_len, "settings": dict(s.__dict__), "threads": torch.get_num_threads()}
        out = common.run_isolated(mem_case, spec, preload=PRELOAD)
        if "error" in out:
            rows.append(_rows(base, p, "peak_mem_extra", "MiB", None, f"n/a: {out['error']}"))
        else:
            m = out["bytes"] / 2 ** 20
            rows.append(_rows(base, p, "peak_mem_extra", "MiB", (m, m, m), f"peak RSS, {out['method']}"))
    return rows


def check_agreement(args, s: Settings) -> list[str]:
    """Outputs agree before anything is timed (smallest N, first V): log-probs of every provider vs
    naive; loss and gradients of ours vs naive (shaping as set) and vs Liger (shaping "none").
    Returns report lines; a disagreement is printed loudly and marked MISMATCH (the run goes on)."""
    dtype = DTYPES[args.dtype]
    N, V = min(args.n), args.v[0]
    fp32 = dtype == torch.float32
    lp_tol, grad_tol = (1e-3, 1e-3) if fp32 else (1e-1, 5e-2)   # bf16: Liger rounds logits to bf16
    runnable = [p for p in args.providers if p != "bound" and not unavailable_reason(p, args.device)]
    ours = [p for p in runnable if p.startswith("ours-")]
    lines = []

    def report(what, err, tol):
        ok = err <= tol
        lines.append(f"check N={N} V={V}: {what}: {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'MISMATCH'}")
        print(("  " if ok else "  WARNING ") + lines[-1], flush=True)

    if "naive" in runnable:
        x = make_inputs(N, V, args.d, dtype, args.device, args.seq_len, grad=False)
        ref = make_fn("naive", "fwd", x, s)().float()
        for p in [q for q in runnable if q != "naive"]:
            out = make_fn(p, "fwd", x, s)().reshape(-1).float()
            report(f"{p} vs naive log-probs, max abs diff", float((out - ref).abs().max()), lp_tol)
        del x
    x = make_inputs(N, V, args.d, dtype, args.device, args.seq_len, grad=True)

    def run(p, st):
        loss = make_fn(p, "fwd+bwd", x, st)()
        return loss.item(), x.hidden.grad.float().clone(), x.weight.grad.float().clone()

    s_none = Settings(**{**s.__dict__, "shaping": "none"})
    for other, st in (("naive", s), ("liger", s_none)):
        if other not in runnable:
            continue
        lb, hb, wb = run(other, st)
        for p in ours:
            la, ha, wa = run(p, st)
            report(f"{p} vs {other} (shaping={st.shaping}) loss, abs diff", abs(la - lb), 1e-4 if fp32 else 1e-2)
            report(f"{p} vs {other} grad_hidden, rel norm diff", float((ha - hb).norm() / hb.norm().clamp_min(1e-30)),
                   grad_tol)
            report(f"{p} vs {other} grad_weight, rel norm diff", float((wa - wb).norm() / wb.norm().clamp_min(1e-30)),
                   grad_tol)
    x.zero_grad()
    return lines


# ----------------------------------------------------------------------------- report


def summarize(rows: list[dict], device: str) -> list[str]:
    """Markdown lines: per (mode, V, N) the p50 time and peak extra memory of each provider, the ratios
    ours/bound, ours/liger, ours/naive of wall time (and of CPU time on CPU), then their geometric means."""
    ours = "ours-triton" if device.startswith("cuda") else "ours-torch"
    val = {}
    for r in rows:
        if r["p50"] != "":
            val[(r["mode"], int(r["V"]), int(r["x_value"]), r["provider"], r["metric"])] = float(r["p50"])
    keys = sorted({(k[0], k[1], k[2]) for k in val}, key=lambda k: (MODES.index(k[0]), k[1], k[2]))
    provs = [p for p in PROVIDERS if any(k[3] == p for k in val)]
    has_time = any(k[4] == "time" for k in val)
    has_cpu = any(k[4] == "cpu_time" for k in val)
    others = ["bound", "liger", "naive"]
    head = ["mode", "V", "N"] + ([f"{p} ms" for p in provs] + [f"{ours}/{b}" for b in others] if has_time else []) \
        + ([f"{ours}/{b} (CPU time)" for b in others] if has_cpu else []) + [f"{p} MiB" for p in provs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    logs: dict[tuple, list[float]] = {}

    def ratio(mode, V, N, metric, b):
        a, c = val.get((mode, V, N, ours, metric)), val.get((mode, V, N, b, metric))
        if not a or not c:
            return "n/a"
        logs.setdefault((mode, metric, b), []).append(math.log(a / c))
        return f"{a / c:.2f}x"

    for mode, V, N in keys:
        cells = [mode, str(V), str(N)]
        if has_time:
            cells += [_fmt(val[(mode, V, N, p, "time")]) if (mode, V, N, p, "time") in val else "n/a" for p in provs]
            cells += [ratio(mode, V, N, "time", b) for b in others]
        cells += [ratio(mode, V, N, "cpu_time", b) for b in others] if has_cpu else []
        cells += [f"{val[(mode, V, N, p, 'peak_mem_extra')]:.0f}" if (mode, V, N, p, "peak_mem_extra") in val
                  else "n/a" for p in provs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for (mode, metric, b), ls in sorted(logs.items()):
        lines.append(f"- geometric mean {ours}/{b}, {mode}, {'wall time' if metric == 'time' else 'CPU time'}: "
                     f"{math.exp(sum(ls) / len(ls)):.2f}x over {len(ls)} shapes")
    return lines


def plot(rows: list[dict], out_prefix: Path) -> list[Path]:
    """One PNG per V: time and peak extra memory vs N, per provider, for each mode ([] without matplotlib,
    e.g. on the bare GPU machine of benchmarks/gpu_check.sh: the CSV and the Markdown carry the numbers)."""
    try:
        import matplotlib
    except ImportError:
        print("bench_loss: matplotlib is not installed: no PNG plots")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for V in sorted({int(r["V"]) for r in rows}):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
        for j, mode in enumerate(MODES):
            for i, (metric, unit) in enumerate([("time", "ms"), ("peak_mem_extra", "MiB")]):
                ax = axes[i][j]
                for p in PROVIDERS:
                    pts = sorted((int(r["x_value"]), float(r["p50"]), float(r["p20"]), float(r["p80"]))
                                 for r in rows if int(r["V"]) == V and r["mode"] == mode and r["provider"] == p
                                 and r["metric"] == metric and r["p50"] != "")
                    if not pts:
                        continue
                    xs, ys, lo, hi = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=p)
                    if metric == "time":
                        ax.fill_between(xs, lo, hi, alpha=0.2)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (tokens)")
                ax.set_ylabel(f"{'time' if metric == 'time' else 'peak memory above inputs'} ({unit})")
                ax.set_title(f"{mode}: {KERNEL_NAME[mode]}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        r0 = next(r for r in rows if int(r["V"]) == V)
        fig.suptitle(f"MRPO loss, V={V}, D={r0['D']}, {r0['dtype']}, {r0['device']}")
        fig.tight_layout()
        path = Path(f"{out_prefix}_V{V}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--quick", action="store_true", help="small sweep (CPU: N 128..512, V=32000; ~2-3 min)")
    ap.add_argument("--n", type=int, nargs="+", help="token counts N (default: per device)")
    ap.add_argument("--v", type=int, nargs="+", help="vocab sizes V (default: 32000 128256 151936)")
    ap.add_argument("--d", type=int, help="hidden size D (default: 1024 CPU, 4096 CUDA)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: float32 CPU, bfloat16 CUDA")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence T (default: 256 CPU, 1024 CUDA)")
    ap.add_argument("--max-nv", type=float, help="skip (N, V) pairs with N*V above this (keeps CPU runs short)")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--shaping", choices=["mrpo", "none"], default="mrpo", help="our loss's shaping (Liger: none)")
    ap.add_argument("--loss-agg", choices=list(LIGER_LOSS_TYPE), default="seq-mean-token-mean")
    ap.add_argument("--reps", type=int, help="CPU timing repeats (default 5, --quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="CPU warm-up calls per provider")
    ap.add_argument("--mem-budget-gib", type=float,
                    help="skip providers whose estimated extra memory exceeds this (default: CPU min(6, "
                         "MemAvailable/3); CUDA 90%% of free memory)")
    ap.add_argument("--no-mem", action="store_true", help="skip the per-case memory processes (CPU)")
    ap.add_argument("--no-time", action="store_true", help="measure peak memory only (e.g. to larger N)")
    ap.add_argument("--no-check", action="store_true", help="skip the ours-vs-naive/Liger loss check")
    ap.add_argument("--liger-compiled", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile Liger's loss math (auto: on for CUDA, off for CPU where compiling "
                         "takes ~20 s per process and covers only O(N) elementwise work)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tag", help="output name: results/loss_<tag>.* (default: <device>[_quick])")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device} requested but torch.cuda.is_available() is False")
    if args.quick:
        args.n = args.n or ([1024, 4096] if cuda else [128, 256, 512])
        args.v = args.v or ([151936] if cuda else [32000])
    args.n = args.n or ([1024, 2048, 4096, 8192, 16384] if cuda else [128, 256, 512, 1024, 2048])
    args.v = args.v or [32000, 128256, 151936]
    args.d = args.d or (4096 if cuda else 1024)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.seq_len = args.seq_len or (1024 if cuda else 256)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.mem_budget_gib is None:
        if cuda:
            args.mem_budget_gib = 0.9 * torch.cuda.mem_get_info(torch.device(args.device))[0] / GIB
        else:
            args.mem_budget_gib = min(6.0, common.mem_available_bytes() / 3 / GIB)
    args.tag = args.tag or (args.device.replace(":", "") + ("_quick" if args.quick else ""))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(shaping=args.shaping, loss_agg=args.loss_agg,
                 liger_compiled={"on": True, "off": False}.get(args.liger_compiled, args.device.startswith("cuda")))
    ver = common.versions()
    meta = {"device": common.device_name(args.device), **ver, "timestamp": common.timestamp()}
    load0 = common.load_average()
    print(f"bench_loss: {meta['device']}, torch {ver['torch']}, triton {ver['triton']}, dtype {args.dtype}, "
          f"D={args.d}, T={args.seq_len}, N={args.n}, V={args.v}, modes={args.modes}, "
          f"mem budget {args.mem_budget_gib:.1f} GiB, load average {load0}")
    checks = [] if args.no_check else check_agreement(args, s)

    t_start = time.time()
    rows = []
    for V in args.v:
        for N in args.n:
            if args.max_nv and N * V > args.max_nv:
                print(f"  skip N={N} V={V}: N*V > --max-nv {args.max_nv:.3g}")
                continue
            for mode in args.modes:
                t0 = time.time()
                case_rows = run_case(args, args.providers, mode, N, V, s, meta)
                rows += case_rows
                metric, unit = ("peak_mem_extra", "MiB") if args.no_time else ("time", "ms")
                msg = ", ".join(f"{r['provider']} {_fmt(float(r['p50']))}" for r in case_rows
                                if r["metric"] == metric and r["p50"] != "")
                print(f"  {mode:8s} V={V:6d} N={N:6d}: {msg} {unit}  [{time.time() - t0:.0f} s]", flush=True)

    out_dir = Path(args.out_dir)
    csv_path = common.write_csv(out_dir / f"loss_{args.tag}.csv", rows)
    pngs = plot(rows, out_dir / f"loss_{args.tag}")
    load1 = common.load_average()
    table = summarize(rows, args.device)
    cmd = "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [f"# Loss benchmark: {meta['device']}", "",
          f"`{cmd.strip()}` at {meta['timestamp']}; torch {ver['torch']}, triton {ver['triton']}; "
          f"{args.dtype}, D={args.d}, T={args.seq_len} tokens/sequence, shaping={args.shaping}, "
          f"loss_agg={args.loss_agg}; load average before {load0}, after {load1}; "
          f"wall {time.time() - t_start:.0f} s.", "",
          "Time: p50 ms. Memory: peak above inputs, MiB. Ratios of p50 times.", ""] + table \
        + ([""] + [f"- {c}" for c in checks] if checks else [])
    md_path = out_dir / f"loss_{args.tag}.md"
    md_path.write_text("\n".join(md) + "\n")
    print("\n".join(table))
    print(f"bench_loss: load average before {load0}, after {load1}; wrote {csv_path}, {md_path}, "
          + ", ".join(str(p) for p in pngs))


if __name__ == "__main__":
    main()
