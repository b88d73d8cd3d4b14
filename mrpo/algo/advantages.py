"""Group-relative advantages: GRPO, Dr.GRPO, GDPO.

rewards: [n, R] UNWEIGHTED reward columns (RewardModel.columns: answer, process, length, ...);
weights: [R] (None = all ones). NaN = missing for that completion (an unjudged process reward, a custom
reward that failed): never counted as 0. n = num_groups * group_size, group-major (the G completions of
a prompt are consecutive). Standard deviations are the unbiased (Bessel-corrected) torch.std, as in
TRL's and EasyR1's GRPO; a group of identical rewards gets advantage 0.

    grpo     a missing value takes the mean of its column's present values in the same group (it sits
             exactly where the group mean puts it); a column with no present value in a group is left
             out of that group (its advantages come from the other columns alone). Then
             r = sum_k w_k r_k;                A = (r - mean_g) / (std_g + eps)     (scale="group")
                                               A = (r - mean_g) / (std_batch + eps) (scale="batch")
                                               A =  r - mean_g                      (scale="none")
    dr_grpo  as grpo, A = r - mean_g (no std division, whatever `scale` says)
    gdpo     per column, over its present values in the group: (x - mean_g) / (std_g + eps), a missing
             value -> 0 (= the group mean); then s = sum_k w_k * that; then over the batch:
             A = (s - mean) / (std + eps)   (GDPO, arXiv:2601.05242: weights after the group normalisation)
"""
from __future__ import annotations

import torch


def _present_group_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, G, R] with NaNs. Returns (mask of present values [B, G, R], mean of the present values
    per group and column [B, 1, R], 0 where a group has none)."""
    present = ~torch.isnan(x)
    count = present.sum(dim=1, keepdim=True)
    mean = torch.where(present, x, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    return present, mean


def _impute_group_mean(x: torch.Tensor) -> torch.Tensor:
    """x: [B, G, R]; a missing value -> its column's group mean; a column with no present value in a
    group -> 0 there (so it adds nothing to that group's totals)."""
    present, mean = _present_group_mean(x)
    return torch.where(present, x, mean.expand_as(x))


def _nan_group_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, G, R] with NaNs; per group and column (x - mean) / (std + eps) over the present values,
    missing -> 0. Unbiased std (0 with fewer than 2 present values)."""
    present, mean = _present_group_mean(x)
    dev = torch.where(present, x - mean, 0.0)
    var = (dev ** 2).sum(dim=1, keepdim=True) / (present.sum(dim=1, keepdim=True) - 1).clamp(min=1)
    return dev / (var.sqrt() + eps)


def compute_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo", scale: str = "group",
                       eps: float = 1e-4, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-completion advantages [n] (float32) from unweighted rewards [n, R] (or [n]) and their column
    weights [R] (None = ones); see the module docstring."""
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    if rewards.dim() != 2:
        raise ValueError(f"compute_advantages: rewards must be [n, R], got shape {tuple(rewards.shape)}")
    n, num_columns = rewards.shape
    if group_size < 1 or n % group_size:
        raise ValueError(f"compute_advantages: {n} completions is not a multiple of group_size={group_size}")
    if method not in ("grpo", "dr_grpo", "gdpo"):
        raise ValueError(f"compute_advantages: method={method!r} is not one of 'grpo', 'dr_grpo', 'gdpo'")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"compute_advantages: scale={scale!r} is not one of 'group', 'batch', 'none'")
    w = torch.ones(num_columns, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if w.shape != (num_columns,) or not torch.isfinite(w).all():
        raise ValueError(f"compute_advantages: weights must be {num_columns} finite values (one per reward "
                         f"column), got {w.tolist()}")
    r = rewards.detach().to(torch.float64)
    w = w.to(r.device)
    groups = n // group_size
    r = r.reshape(groups, group_size, num_columns)                        # [B, G, R]

    if method == "gdpo":
        s = (_nan_group_norm(r, eps) * w).sum(dim=-1).reshape(n)
        std = s.std() if n > 1 else s.new_zeros(())
        return ((s - s.mean()) / (std + eps)).to(torch.float32)

    total = (_impute_group_mean(r) * w).sum(dim=-1)                       # [B, G]
    centered = total - total.mean(dim=1, keepdim=True)
    if method == "dr_grpo" or scale == "none":
        adv = centered
    elif scale == "group":
        std = total.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(total[:, :1])
        adv = centered / (std + eps)
    else:
        std = total.std() if n > 1 else total.new_zeros(())
        adv = centered / (std + eps)
    return adv.reshape(n).to(torch.float32)
