"""Shared helpers for the benchmark scripts: timing, peak memory, machine info and the long CSV.

Timing: warm-up, then the median (p50) and p20/p80 of repeats, in milliseconds. On CUDA
`triton.testing.do_bench` (CUDA events, L2 flushed); on CPU `time.perf_counter` around each call, with
the providers of one case interleaved round by round so that load from other processes hits them alike.

Peak memory above the inputs, in bytes:
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory
  allocated before the call (the inputs).
- CPU: measured in a fresh process per case (see `run_isolated`): the peak resident set size
  (VmHWM) above the resident size after the inputs were allocated. The high-water mark is reset with
  `echo 5 > /proc/self/clear_refs` when the kernel allows it; otherwise VmHWM minus that baseline is
  used (an upper bound if an earlier peak, e.g. the input allocation, was higher).
  That process fixes glibc's mmap threshold so that freed large blocks return to the OS instead of
  staying resident in the heap (which would raise the baseline and hide later peaks).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)

CSV_FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "V", "D", "dtype",
              "p50", "p20", "p80", "device", "torch", "triton", "timestamp", "note"]


# ----------------------------------------------------------------------------- timing


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a list of values (linear interpolation)."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    return tuple(float(np.quantile(a, q)) for q in QUANTILES)  # type: ignore[return-value]


def quantiles_ms(samples_s: Iterable[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of a list of durations in seconds."""
    return quantiles(1e3 * float(t) for t in samples_s)


def time_interleaved_cpu(fns: dict[str, Callable[[], object]], warmup: int = 1,
                         reps: int = 5) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each fn over `reps` rounds: (wall, cpu), each {name: [s]}.

    Every round calls every fn once, in a rotated order, so background load from other processes on a
    shared machine hits all providers alike. CPU time (all threads of this process) does not count time
    spent waiting for a core, so it is the steadier measure under load; it includes OpenMP spin-waits.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def time_cuda(fn: Callable[[], object], grad_to_none=None, warmup_ms: int = 25,
              rep_ms: int = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of fn on the current CUDA device via triton.testing.do_bench."""
    from triton.testing import do_bench

    out = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
    return tuple(float(x) for x in out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """Peak resident memory of fn() above the current RSS, in bytes, and the method used.

    Call it in a fresh process after allocating the inputs (and a small warm-up), so that the baseline
    RSS holds the inputs and nothing larger came before.
    """
    import gc

    gc.collect()
    # Without clear_refs the result is exact when fn() sets a new high-water mark and an upper bound
    # (the older mark minus the baseline) otherwise.
    method = "clear_refs" if reset_peak_rss() else "hwm-diff"
    base = _proc_status_kib("VmRSS")
    out = fn()
    peak = _proc_status_kib("VmHWM")
    del out
    return max(0, peak - base) * 1024, method


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by fn() above what was allocated before it, in bytes."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base)


_POOL = None


def run_isolated(fn: Callable, *args, preload: Iterable[str] = (), timeout_s: float = 900.0):
    """fn(*args) in a fresh process (one per call) and its result; {"error": ...} if the process fails.

    Processes are forked from a forkserver that imported `preload` once, so a case costs no interpreter
    or torch start-up, yet shares no allocator state or memory high-water mark with earlier cases.
    fn must be importable (module level). Call `set_malloc_mmap_threshold()` in fn before allocating.
    """
    global _POOL
    import concurrent.futures as cf
    import multiprocessing as mp

    if _POOL is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        _POOL = cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1)
    try:
        return _POOL.submit(fn, *args).result(timeout=timeout_s)
    except Exception as e:  # a crash (e.g. killed for memory) or an exception inside fn
        if isinstance(e, cf.process.BrokenProcessPool):
            _POOL.shutdown(cancel_futures=True)
            _POOL = None
        return {"error": f"{type(e).__name__}: {e}"}


def set_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold so that freed large blocks go back to the OS at once.

    By default the threshold grows (up to 32 MiB) after large frees, and blocks below it stay resident
    in the heap after being freed, so RSS would no longer follow the live tensors.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------- machine info and CSV


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' or e.g. 'AMD EPYC (2 threads)'."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '1.52 1.20 0.98' ('n/a' where unknown)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional for CPU-only use
        triton_version = "n/a"
    return {"torch": torch.__version__, "triton": triton_version}


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_csv(path: str | Path, rows: list[dict], append: bool = False) -> Path:
    """Write rows (dicts with CSV_FIELDS keys; missing keys become empty) to a long-format CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    return path


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
