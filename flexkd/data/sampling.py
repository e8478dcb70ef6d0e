"""A batch sampler whose order is a pure function of (seed, epoch), so a resumed run can
fast-forward to the exact batch an interrupted one stopped at.

Under DDP (a process group is up when Lightning builds the train loader) each rank takes every
world_size-th batch of the shared order, wrapping around so every rank has as many batches;
Lightning's own sampler injection is therefore off (`use_distributed_sampler=False`)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty split")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle = seed, shuffle
        if world_size is None:
            rank, world_size = _distributed() if shuffle else (0, 1)
        self.rank, self.world_size = rank or 0, world_size
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

    def _all_batches(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __len__(self) -> int:
        return -(-self._all_batches() // self.world_size)

    def __iter__(self):
        order = self.order(self.epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, self.num_examples,
                                                                 self.batch_size)]
        mine = [batches[(self.rank + k * self.world_size) % len(batches)]
                for k in range(len(self))]
        skip, self._skip = self._skip, 0
        yield from mine[skip:]


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
