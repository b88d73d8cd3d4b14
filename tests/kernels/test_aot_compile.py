"""The CUDA Triton kernels compile ahead of time for sm_80 and sm_90 without a GPU, and ptxas reports
no spills: a representative subset of benchmarks/aot_compile.py's full sweep (the largest tile with the
fewest warps, where register pressure peaks, and the smallest tile with the most warps; every flag on,
which is the longest code path; bf16 and fp32 logits)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "aot_compile.py"
_spec = importlib.util.spec_from_file_location("aot_compile", _PATH)
aot = importlib.util.module_from_spec(_spec)
sys.modules["aot_compile"] = aot  # dataclasses look their module up
_spec.loader.exec_module(aot)


def _require_compiled_kernels():
    from mrpo_kernels.utils import triton_interpreted
    from mrpo_kernels.linear_logprobs import _logprobs_kernel

    if triton_interpreted(_logprobs_kernel):
        pytest.skip("triton was imported with TRITON_INTERPRET=1")


def _subset():
    configs = aot.autotune_configs()
    heaviest = max(configs, key=lambda c: (c[0], -c[1]))   # largest BLOCK_V, fewest warps
    lightest = min(configs, key=lambda c: (c[0], -c[1]))   # smallest BLOCK_V, most warps
    out = []
    for kernel in aot.ARG_TYPES:
        full = aot.branches(kernel)[-1]                    # every flag on (and credit "zero" for the loss)
        for arch in aot.ARCHS:
            for dtype, (bv, nw, ns) in (("bf16", heaviest), ("fp32", heaviest), ("bf16", lightest)):
                out.append(aot.Variant(kernel, arch, dtype, bv, nw, ns, full))
    return out


@pytest.mark.parametrize("variant", _subset(), ids=lambda v: f"{v.kernel}-sm{v.arch}-{v.logits}-{v.block_v}x{v.num_warps}")
def test_kernel_compiles_without_spills(variant):
    _require_compiled_kernels()
    res = aot.compile_variant(variant)
    assert not res.error, res.error
    assert res.registers is not None and 0 < res.registers <= 255
    assert res.spill_stores == 0 and res.spill_loads == 0, f"{variant}: spills {res.spill_stores}/{res.spill_loads} B"
    assert res.shared_bytes is not None and res.shared_bytes >= 0


def test_sweep_covers_every_branch_and_config():
    """The sweep enumerates each constexpr combination the launchers can pass, for every autotune config."""
    from mrpo_kernels.linear_logprobs import AUTOTUNE_CONFIGS

    loss_branches = [dict(b) for b in aot.branches("_mrpo_loss_kernel")]
    assert len(loss_branches) == 2**4 * 4 == len({tuple(sorted(b.items())) for b in loss_branches})
    for flag in ("HAS_OLD", "HAS_REF", "SHAPING", "WITH_ENTROPY", "COMPUTE_GRAD"):
        assert {b[flag] for b in loss_branches} == {False, True}
    assert {b["VALID_CREDIT"] for b in loss_branches if b["SHAPING"]} == {0, 1, 2}
    variants = aot.all_variants()
    assert len(variants) == len(aot.ARCHS) * len(aot.DTYPES) * len(AUTOTUNE_CONFIGS) * (2 + len(loss_branches))
    cover = [dict(b) for b in aot.branches("_mrpo_loss_kernel", cover=True)]
    assert all(b in loss_branches for b in cover) and len(cover) < len(loss_branches)
    for flag in ("HAS_OLD", "HAS_REF", "SHAPING", "WITH_ENTROPY", "COMPUTE_GRAD"):
        assert {b[flag] for b in cover} == {False, True}
        # each flag is flipped alone from all-off and from all-on
        others = [f for f in aot.LOSS_FLAGS if f != flag]
        for base in (False, True):
            if flag in aot.LOSS_FLAGS:
                assert any(b[flag] != base and all(b[o] == base for o in others) for b in cover), (flag, base)
    assert {b["VALID_CREDIT"] for b in cover if b["SHAPING"]} == {0, 1, 2}


def test_signature_matches_kernel_arguments():
    """A kernel argument added or renamed without updating the sweep's types is an error, not a skip."""
    _require_compiled_kernels()
    fns = aot.kernels()
    for v in aot.all_variants(archs=(90,), dtypes=("bf16",))[:1] + aot.all_variants(archs=(90,), dtypes=("bf16",))[-1:]:
        src = aot.ast_source(fns[v.kernel], v)
        assert list(src.signature) == fns[v.kernel].arg_names
    bad = aot.Variant("_logprobs_kernel", 90, "bf16", 1024, 4, 3, (("WITH_ENTROPY", True), ("NOT_AN_ARG", 1)))
    with pytest.raises(ValueError, match="NOT_AN_ARG"):
        aot.ast_source(fns["_logprobs_kernel"], bad)
