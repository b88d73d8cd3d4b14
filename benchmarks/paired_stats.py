"""Exact paired tests over a handful of seeds (no scipy needed): Wilcoxon signed-rank, sign test,
sign-flip permutation test of the mean, and Holm's step-down adjustment.

All three tests take the per-seed differences d_i = metric(A, seed i) - metric(B, seed i) and return a
two-sided p-value computed exactly by enumerating the 2^n equally likely sign assignments (n <= 20).
"""
from __future__ import annotations

import math

import numpy as np


def _clean(d) -> np.ndarray:
    x = np.asarray([v for v in d if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size > 20:
        raise ValueError(f"exact enumeration is for n <= 20 paired values, got {x.size}")
    return x


def _signs(n: int) -> np.ndarray:
    """(2^n, n) matrix of every +-1 sign assignment."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * bits


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a, ties get their average rank."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size)
    ranks[order] = np.arange(1, a.size + 1)
    for v in np.unique(a):
        tie = a == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def wilcoxon_exact(d, zero_tol: float = 1e-12) -> tuple[float, float, int]:
    """(W+, two-sided p, n used): exact Wilcoxon signed-rank test of median(d) = 0.

    Zero differences are dropped (Wilcoxon's convention); ties among |d| get average ranks and the null
    distribution is enumerated over those same ranks (exact conditional test). p = P(|W+ - E| >= |w - E|)
    under random signs; with no non-zero difference p = 1."""
    x = _clean(d)
    x = x[np.abs(x) > zero_tol]
    if x.size == 0:
        return 0.0, 1.0, 0
    r = _ranks(np.abs(x))
    w = float(r[x > 0].sum())
    null = ((_signs(x.size) > 0) * r).sum(axis=1)
    centre = r.sum() / 2
    p = float(np.mean(np.abs(null - centre) >= abs(w - centre) - 1e-9))
    return w, min(1.0, p), int(x.size)


def sign_test(d, zero_tol: float = 1e-12) -> tuple[int, int, float]:
    """(positives, n non-zero, two-sided exact binomial p) for median(d) = 0."""
    x = _clean(d)
    x = x[np.abs(x) > zero_tol]
    n, k = int(x.size), int((x > 0).sum())
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return k, n, min(1.0, 2 * tail)


def permutation_mean(d) -> float:
    """Two-sided exact sign-flip permutation p-value of mean(d) = 0 (1.0 for no values)."""
    x = _clean(d)
    if x.size == 0:
        return 1.0
    null = (_signs(x.size) * x).mean(axis=1)
    return float(np.mean(np.abs(null) >= abs(x.mean()) - 1e-12))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given; NaN passes through)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - j) * pvalues[i]))
        out[i] = running
    return out
