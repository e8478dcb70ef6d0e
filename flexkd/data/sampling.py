"""A batch sampler whose order is a pure function of (seed, epoch), so a resumed run can
fast-forward to the exact batch an interrupted one stopped at.

Under DDP (a process group is up when Lightning builds the train loader) each rank takes every
world_size-th batch of the shared order, wrapping around so every rank has as many batches;
Lightning's own sampler injection is therefore off (`use_distributed_sampler=False`).

Given the examples' token counts (`lengths`), batches are length-bucketed: a batch is padded to
its longest example, and most short sentences would otherwise share a batch with a long one.
Training order stays random: shuffle, cut into chunks of `chunk_batches` batches, sort each chunk
by length, cut it into batches, then shuffle the batches (in groups of world_size neighbours, so
the ranks' batches at one step are about as long as each other and none waits for a longer
one). Evaluation order (shuffle=False) is simply longest first."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

CHUNK_BATCHES = 50  # batches per sorted chunk: long enough to bucket, short enough to stay random


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None,
                 lengths: Sequence[int] | None = None, chunk_batches: int = CHUNK_BATCHES):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty split")
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle = seed, shuffle
        if world_size is None:
            rank, world_size = _distributed() if shuffle else (0, 1)
        self.rank, self.world_size = rank or 0, world_size
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.chunk_batches = chunk_batches
        self.epoch = 0
        self._skip = 0
        # Lightning calls set_epoch at each epoch start on a loader's `sampler` and on its batch
        # sampler's `sampler`, never on the batch sampler itself: without this, every epoch
        # would repeat epoch 0's order (and a resumed run would not).
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (with the restored epoch after a resume)."""
        self.epoch = int(epoch)

    def fast_forward(self, batches: int) -> None:
        """Skip the first `batches` batches of the next iteration (they were already trained on)."""
        self._skip = int(batches)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        return torch.randperm(self.num_examples, generator=self._generator(epoch)).tolist()

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in the order shared by all ranks."""
        if self.lengths is not None:
            return self._bucketed(epoch)
        order = self.order(epoch)
        return [order[i:i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]

    def _bucketed(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            order = torch.sort(self.lengths, descending=True, stable=True).indices.tolist()
            return [order[i:i + self.batch_size]
                    for i in range(0, self.num_examples, self.batch_size)]
        gen = self._generator(epoch)
        perm = torch.randperm(self.num_examples, generator=gen)
        # A chunk holds whole rank groups, so a group never spans two chunks.
        groups_per_chunk = -(-self.chunk_batches // self.world_size)
        chunk = groups_per_chunk * self.world_size * self.batch_size
        batches = []
        for start in range(0, self.num_examples, chunk):
            part = perm[start:start + chunk]
            # stable: equal lengths keep their random order
            part = part[torch.sort(self.lengths[part], stable=True).indices].tolist()
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        ws = self.world_size
        groups = [batches[i:i + ws] for i in range(0, len(batches), ws)]
        # A short last group stays last, so rank r still finds its batch at r + k * world_size.
        full = len(groups) - (len(groups[-1]) < ws)
        shuffled = [groups[i] for i in torch.randperm(full, generator=gen).tolist()]
        return [b for group in shuffled + groups[full:] for b in group]

    def _all_batches(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __len__(self) -> int:
        return -(-self._all_batches() // self.world_size)

    def position(self, rank: int, k: int) -> int:
        """Where rank `rank`'s k-th batch of an epoch is in `batches(epoch)`."""
        return (rank + k * self.world_size) % self._all_batches()

    def __iter__(self):
        batches = self.batches(self.epoch)
        mine = [batches[self.position(self.rank, k)] for k in range(len(self))]
        skip, self._skip = self._skip, 0
        yield from mine[skip:]


def token_counts(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """(computed, real) tokens of `batches` when each is padded to its longest example: the
    padding is computed - real."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return padded, sum(lengths[i] for b in batches for i in b)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
