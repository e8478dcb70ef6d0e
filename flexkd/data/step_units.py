"""Unit counts of a whole optimizer step, so that its gradient does not depend on how its batch
was split (gradient accumulation, DDP ranks).

An optimizer step sums the gradients of `accumulate` micro-batches on each of `world_size` ranks:
Lightning divides every micro-batch's loss by `accumulate` and DDP averages over the ranks. A
term that is a mean over its micro-batch's rows (response tokens, examples, tokens) then gives a
micro-batch of 3 tokens as much weight as one of 300, and the step's gradient changes with the
split. The step is instead normalised as one batch would be: each micro-batch contributes

    mean_micro * rows_micro / rows_step * (accumulate * world_size)

= sum over its rows / rows of the whole step, the factor undoing Lightning's and DDP's divisions
(`flexkd.step.normalise_to_step`). The sampler's batches are a pure function of (seed, epoch)
shared by every rank, so each rank counts the rows of the whole step before it starts.

Rows per term (`example_units`): "task" - the response tokens a causal LM predicts, or one per
example for a classifier head; "logit" - the same rows (the positions logit KD compares);
"feature" - the non-padding student tokens. "logit" and "feature" are counted only with one
shared tokenizer: with two, those terms compare aligned groups and stay per micro-batch. Terms
that are batch statistics (the correlation loss, CKA) are not sums over rows at all and also
stay per micro-batch (see `Strategy.additive_terms`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flexkd.data.sampling import ResumableBatchSampler
from flexkd.models import IGNORE_INDEX

DIVISOR = "divisor"  # the key of step_units that holds accumulate * world_size


def example_units(example: dict, shared: bool) -> dict[str, int]:
    """The rows one encoded example adds to each row-mean loss term (see the module docstring)."""
    side = example["student"]
    labels = side.labels
    # A causal label at position 0 is never predicted (response_positions shifts by one).
    targets = 1 if isinstance(labels, int) else sum(t != IGNORE_INDEX for t in labels[1:])
    units = {"task": targets}
    if shared:
        units.update(logit=targets, feature=len(side.input_ids))
    return units


def add_units(units: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for u in units:
        for key, value in u.items():
            total[key] = total.get(key, 0) + value
    return total


class StepUnitsBatchSampler(ResumableBatchSampler):
    """A ResumableBatchSampler whose batches are (index, step_units) keys for `StepExamples`:
    step_units sums `units` over every batch of the same optimizer step on every rank, plus
    DIVISOR = accumulate * world_size. Lightning steps after every `accumulate` batches of an
    epoch and after its last one, so step s holds this rank's batches s*accumulate onwards."""

    def __init__(self, units: list[dict[str, int]], accumulate: int, *args, **kwargs):
        super().__init__(len(units), *args, **kwargs)
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.units, self.accumulate = units, int(accumulate)

    def step_units(self, batches: list[list[int]], step: int) -> dict[str, int]:
        """The row counts of optimizer step `step` of the epoch whose batches are `batches`."""
        local = len(self)
        ks = range(step * self.accumulate, min((step + 1) * self.accumulate, local))
        total = add_units(self.units[i] for k in ks for rank in range(self.world_size)
                          for i in batches[self.position(rank, k)])
        total[DIVISOR] = self.accumulate * self.world_size
        return total

    def __iter__(self):
        batches = self.batches(self.epoch)
        skip, self._skip = self._skip, 0
        step, units = -1, {}
        for k in range(skip, len(self)):
            if k // self.accumulate != step:
                step = k // self.accumulate
                units = self.step_units(batches, step)
            yield [(i, units) for i in batches[self.position(self.rank, k)]]


class StepExamples:
    """The examples of a split, indexed by StepUnitsBatchSampler's (index, step_units) keys: each
    comes back with its step's counts under "step_units", which collate puts on the batch."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, dict]) -> dict:
        index, units = key
        return {**self.examples[index], "step_units": units}
