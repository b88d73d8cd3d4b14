"""Runs triton_cases.py in a subprocess: under TRITON_INTERPRET=1 on CPU (the variable only takes
effect if set before triton is first imported, which this pytest process has already done), or
natively on CUDA when a GPU is present. The ahead-of-time CUDA compilation is test_aot_compile.py."""
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

