"""The low-data setting: the distillation stage trains on a fixed random subset of the train split.

The subset is drawn with its own seed (`data.subset_seed`), never the run seed, so every
strategy and seed of a sweep sees the same examples and paired differences compare methods on
the same data. It keeps file order, so "the first N training examples" (the probe, pre-flight)
stay the first N of the subset. One seed's subsets are nested: a smaller fraction keeps a prefix
of the same permutation, so 1% of the data is part of 5%, and 5% part of 20%.
"""

from __future__ import annotations

import torch


def subset_size(n: int, fraction: float) -> int:
    """max(1, round(fraction * n)) examples of a split of n (all of them at fraction 1)."""
    return n if fraction >= 1.0 else min(n, max(1, round(fraction * n)))


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The sorted positions of the subset among n rows: a pure function of (n, fraction, seed)."""
    k = subset_size(n, fraction)
    if k == n:
        return list(range(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k]
    return sorted(chosen.tolist())
