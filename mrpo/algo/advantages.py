"""Group-relative advantages: GRPO, Dr.GRPO, GDPO.

rewards: [n, R] reward components (columns, e.g. answer/process/length/format, already weighted);
NaN = disabled or unjudged, treated as absent. n = num_groups * group_size, group-major (the G
completions of a prompt are consecutive). Standard deviations are the unbiased (Bessel-corrected)
torch.std, as in TRL's and EasyR1's GRPO; a group of identical rewards gets advantage 0.

    grpo     r = nansum over columns;  A = (r - mean_g) / (std_g + eps)   (scale="group")
                                       A = (r - mean_g) / (std_batch + eps) (scale="batch")
                                       A =  r - mean_g                      (scale="none")
    dr_grpo  A = r - mean_g  (no std division, whatever `scale` says)
    gdpo     per column: (x - nanmean_g) / (nanstd_g + eps), NaN -> 0; summed over columns;
             then over the batch: (s - mean) / (std + eps)
"""
from __future__ import annotations

import torch


def _nan_group_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, G] with NaNs; (x - nanmean) / (nanstd + eps) per row, NaN -> 0. Unbiased std (0 if < 2 values)."""
    present = ~torch.isnan(x)
    cnt = present.sum(dim=1, keepdim=True)
    x0 = torch.where(present, x, torch.zeros_like(x))
    mean = x0.sum(dim=1, keepdim=True) / cnt.clamp(min=1)
    dev = torch.where(present, x - mean, torch.zeros_like(x))
    var = (dev ** 2).sum(dim=1, keepdim=True) / (cnt - 1).clamp(min=1)
    return torch.where(present, dev / (var.sqrt() + eps), torch.zeros_like(x))


def compute_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo", scale: str = "group",
                       eps: float = 1e-4) -> torch.Tensor:
    """Per-completion advantages [n] (float32) from rewards [n, R] or [n]; see module docstring."""
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    if rewards.dim() != 2:
        raise ValueError(f"compute_advantages: rewards must be [n, R], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"compute_advantages: {n} completions is not a multiple of group_size={group_size}")
    if method not in ("grpo", "dr_grpo", "gdpo"):
        raise ValueError(f"compute_advantages: method={method!r} is not one of 'grpo', 'dr_grpo', 'gdpo'")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"compute_advantages: scale={scale!r} is not one of 'group', 'batch', 'none'")
    r = rewards.detach().to(torch.float64)
    groups = n // group_size

    if method == "gdpo":
        cols = r.T.reshape(r.shape[1], groups, group_size)                  # [R, B, G]
        normed = torch.stack([_nan_group_norm(c, eps) for c in cols])
        s = normed.sum(dim=0).reshape(n)
        std = s.std() if n > 1 else s.new_zeros(())
        return ((s - s.mean()) / (std + eps)).to(torch.float32)

    total = torch.nansum(r, dim=1).reshape(groups, group_size)              # [B, G]
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
