"""benchmarks/paired_stats.py: exact paired tests against hand-enumerated values and the normal limit."""
from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "paired_stats.py"
_spec = importlib.util.spec_from_file_location("paired_stats", _PATH)
ps = importlib.util.module_from_spec(_spec)
sys.modules["paired_stats"] = ps
_spec.loader.exec_module(ps)


def test_wilcoxon_all_same_sign_is_the_smallest_p():
    w, p, n = ps.wilcoxon_exact([0.01 * i for i in range(1, 9)])
    assert (w, n) == (36.0, 8) and p == pytest.approx(2 / 256)
    assert ps.wilcoxon_exact([-v for v in range(1, 9)])[1] == pytest.approx(2 / 256)


def test_wilcoxon_hand_enumerated_small_case():
    # ranks 1, 2, 3; W+ = 2 + 3 = 5; null W+ over 8 sign sets: 0,1,2,3,3,4,5,6; |W - 3| >= 2 in 4 of 8
    w, p, n = ps.wilcoxon_exact([-1.0, 2.0, 3.0])
    assert (w, n) == (5.0, 3) and p == pytest.approx(0.5)


def test_wilcoxon_drops_zeros_and_averages_tied_ranks():
    w, p, n = ps.wilcoxon_exact([0.0, 1.0, -1.0, 2.0])
    assert n == 3 and w == pytest.approx(1.5 + 3)        # |d| = 1, 1, 2: ranks 1.5, 1.5, 3
    # brute force over the same tied ranks
    r, centre = np.array([1.5, 1.5, 3.0]), 3.0
    null = [sum(ri for ri, s in zip(r, signs) if s) for signs in itertools.product([0, 1], repeat=3)]
    assert p == pytest.approx(np.mean([abs(x - centre) >= abs(w - centre) for x in null]))
    assert ps.wilcoxon_exact([0.0, 0.0]) == (0.0, 1.0, 0)


def test_wilcoxon_matches_normal_approximation_for_many_pairs():
    rng = np.random.default_rng(1)
    d = rng.normal(0.4, 1.0, size=18)
    w, p, n = ps.wilcoxon_exact(d)
    mu, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    z = (abs(w - mu) - 0.5) / sd
    p_norm = math.erfc(z / math.sqrt(2))
    assert p == pytest.approx(p_norm, abs=0.01)


def test_sign_test_exact_binomial():
    assert ps.sign_test([1, 2, 3, 4, 5, 6, 7, 8]) == (8, 8, pytest.approx(2 / 256))
    k, n, p = ps.sign_test([1, 2, 3, -1, 0])
    assert (k, n) == (3, 4) and p == pytest.approx(2 * (1 + 4) / 16)
    assert ps.sign_test([]) == (0, 0, 1.0)


def test_permutation_mean():
    assert ps.permutation_mean([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    assert ps.permutation_mean([1.0, -1.0]) == pytest.approx(1.0)
    assert ps.permutation_mean([float("nan"), 2.0]) == pytest.approx(1.0)


def test_holm():
    assert ps.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = ps.holm([0.5, float("nan"), 0.001])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.002)


def test_too_many_values_refused():
    with pytest.raises(ValueError, match="n <= 20"):
        ps.wilcoxon_exact(np.ones(21))
