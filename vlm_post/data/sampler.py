"""A shuffling sampler that an interrupted run can resume part-way through an epoch.

Each epoch's order is a permutation drawn from its own generator seeded with
``seed + epoch``, so it depends on nothing but those two numbers. A resumed run
starts the interrupted epoch at the first example it had not trained on, so it
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.resume_epoch, self.resume_start = -1, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        """Start ``epoch`` at its ``start``-th example (the examples before it were trained on)."""
        self.resume_epoch, self.resume_start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        start = self.resume_start if self.epoch == self.resume_epoch else 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.size
