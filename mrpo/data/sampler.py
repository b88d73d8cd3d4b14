"""Deterministic, resumable prompt order shared by all ranks."""
from __future__ import annotations

import torch


class PromptSampler:
    """Deterministic per-rank prompt order: a seeded permutation per epoch, a global position.

    `position` counts prompts taken by all ranks together (each step takes per_rank * world of them, rank r
    the r-th slice), so a state saved on one number of processes continues on another with the next
    prompts of the same order, none repeated or skipped (an epoch ends when the next step's prompts do
    not fit; the rest of that epoch is dropped, as with drop_last)."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int, world: int):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, per_rank: int) -> list[int]:
        need = per_rank * self.world
        if self.position + need > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        start = self.position + self.rank * per_rank
        self.position += need
        return order[start:start + per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
