"""Length reward on the number of reasoning steps K (paper: K_min = 4, K_max = 10).

    R_len = 0                      if K_min <= K <= K_max
          = -(K_min - K) / K_min   if K < K_min   (K = 0 -> -1)
          = -(K - K_max) / K_max   if K > K_max   (unbounded below: K = 30 -> -2 with K_max = 10)
"""
from __future__ import annotations


def length_reward(k: int, k_min: int = 4, k_max: int = 10) -> float:
    """R_len for K = k steps (see module docstring)."""
    if k < 0 or k_min < 1 or k_max < k_min:
        raise ValueError(f"length_reward: need k >= 0 and 1 <= k_min <= k_max, got k={k}, "
                         f"k_min={k_min}, k_max={k_max}")
    if k < k_min:
        return -(k_min - k) / k_min
    if k > k_max:
        return -(k - k_max) / k_max
    return 0.0
