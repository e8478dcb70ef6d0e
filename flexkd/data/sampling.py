"""A batch sampler whose order is a pure function of (seed, epoch), so a resumed run can
fast-forward to the exact batch an interrupted one stopped at."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty split")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (with the restored epoch after a resume)."""
        self.epoch = int(epoch)

    def fast_forward(self, batches: int) -> None:
        """Skip the first `batches` batches of the next iteration (they were already trained on)."""
        self._skip = int(batches)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __iter__(self):
        order = self.order(self.epoch)
        skip, self._skip = self._skip, 0
        for start in range(skip * self.batch_size, self.num_examples, self.batch_size):
            yield order[start:start + self.batch_size]
