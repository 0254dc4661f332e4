"""A shuffling sampler that an interrupted run can resume part-way through an epoch.

Each epoch's order is a permutation drawn from its own generator seeded with
``seed + epoch``, so it depends on nothing but those two numbers. A resumed run
starts the interrupted epoch at the first example it had not trained on, so it
sees exactly the batches the uninterrupted run would have seen.

Across ``num_replicas`` data-parallel processes, rank r takes every ``num_replicas``-th
example of that order from position r, so one step's batches on all ranks together are
the batch one process with the global batch size would take. It is a DistributedSampler,
so Lightning uses it as it is instead of wrapping it in one of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableRandomSampler(DistributedSampler):
    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.size, self.seed, self.epoch = size, seed, 0
        self.resume_epoch, self.resume_start = -1, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def resume_at(self, epoch: int, start: int) -> None:
        """Start ``epoch`` at its ``start``-th example, counted over all ranks (the ones before were trained on)."""
        self.resume_epoch, self.resume_start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        start = self.resume_start if self.epoch == self.resume_epoch else 0
        return iter(order[start:][self.rank :: self.num_replicas][: len(self)])

    def __len__(self) -> int:
        return self.size // self.num_replicas  # the same on every rank: the last examples that do not divide are left


class EvalShardSampler(DistributedSampler):
    """Evaluation data split over ranks in order, every problem exactly once.

    Rank r takes problems r, r + R, r + 2R, ... Under FSDP every rank must run as many evaluation batches
    (each forward gathers parameters from all ranks), so a rank left one short is topped up with a filler:
    the index ``len(dataset) + i``, which the data set returns as a copy of problem i marked
    ``is_padding``, and which no metric or record counts. (torch's DistributedSampler instead repeats
    problems that then count twice.)
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.size = size

    def __iter__(self) -> Iterator[int]:
        mine = list(range(self.rank, self.size, self.num_replicas))
        fillers = [self.size + i for i in range(len(self) - len(mine))]
        return iter(mine + fillers)

    def __len__(self) -> int:
        return (self.size + self.num_replicas - 1) // self.num_replicas
