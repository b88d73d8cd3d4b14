"""Runs triton_cases.py in a subprocess: under TRITON_INTERPRET=1 on CPU (the variable only takes
effect if set before triton is first imported, which this pytest process has already done), or
natively on CUDA when a GPU is present; and compiles the CUDA kernels ahead of time (no GPU needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases.py")


def test_triton_backend_cases():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", str(CASES)],
        cwd=CASES.parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"triton cases failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


LOSS_SIG = {
    "logits_ptr": "*bf16", "stride_row": "i64", "targets_ptr": "*i64", "adv_ptr": "*fp32", "step_ptr": "*i32",
    "nsteps_ptr": "*i32", "valid_ptr": "*i8", "correct_ptr": "*i8", "tokw_ptr": "*fp32", "old_ptr": "*fp32",
    "ref_ptr": "*fp32", "logp_ptr": "*fp32", "ent_ptr": "*fp32", "loss_ptr": "*fp32", "ahat_ptr": "*fp32",
    "clip_ptr": "*i8", "kl_ptr": "*fp32", "V": "i32", "inv_t": "fp32", "eps_low": "fp32", "eps_high": "fp32",
    "beta": "fp32",
}
FLAGS = ("HAS_OLD", "HAS_REF", "SHAPING", "WITH_ENTROPY", "COMPUTE_GRAD")


@pytest.mark.parametrize("on,credit", [(True, 0), (False, 1), (True, 2)])  # credit: abs, signed, zero
def test_cuda_kernels_compile_ahead_of_time(on, credit):
    """Compiles the CUDA (non-interpreted) kernels for sm_90 with bf16 logits; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mrpo_kernels.fused_mrpo_loss import K3_MAX, LOG_RATIO_MAX, _mrpo_loss_kernel
    from mrpo_kernels.linear_logprobs import _logprobs_kernel
    from mrpo_kernels.utils import triton_interpreted

    if triton_interpreted(_mrpo_loss_kernel):
        pytest.skip("triton was imported in interpreter mode")
    target = GPUTarget("cuda", 90, 32)
    consts = {**{f: on for f in FLAGS}, "VALID_CREDIT": credit, "LOG_RATIO_MAX": LOG_RATIO_MAX, "K3_MAX": K3_MAX,
              "BLOCK_V": 2048}
    sig = {**LOSS_SIG, **{k: "constexpr" for k in consts}}
    kernel = triton.compile(ASTSource(_mrpo_loss_kernel, sig, consts), target=target, options={"num_warps": 8, "enable_fp_fusion": True})
    assert kernel.asm["cubin"]
    sig = {k: LOSS_SIG[k] for k in ("logits_ptr", "stride_row", "targets_ptr", "logp_ptr", "ent_ptr", "V", "inv_t")}
    consts = {"WITH_ENTROPY": on, "BLOCK_V": 4096}
    kernel = triton.compile(ASTSource(_logprobs_kernel, {**sig, "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"},
                                      consts), target=target, options={"num_warps": 16, "enable_fp_fusion": True})
    assert kernel.asm["cubin"]
