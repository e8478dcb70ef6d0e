"""ResumableBatchSampler: length-bucketed batches that stay a pure function of (seed, epoch)."""

import random

import pytest
import torch

from flexkd.data.sampling import ResumableBatchSampler, token_counts

N, B = 1000, 16
# Sentence-like lengths: mostly short, a long tail up to the 64-token cap.
LENGTHS = [min(64, 5 + int(random.Random(i).expovariate(1 / 18))) for i in range(N)]


def sampler(seed=0, epoch=0, lengths=LENGTHS, **kwargs) -> ResumableBatchSampler:
    s = ResumableBatchSampler(N, B, seed, lengths=lengths, **kwargs)
    s.set_epoch(epoch)
    return s


def test_every_example_once_per_epoch_in_full_batches():
    for epoch in (0, 1):
        batches = list(sampler(epoch=epoch))
        assert sorted(i for b in batches for i in b) == list(range(N))
        assert len(batches) == len(sampler()) == 63  # ceil(1000 / 16)
        assert sorted(len(b) for b in batches)[1:] == [B] * 62  # one short batch (1000 % 16 = 8)


def test_bucketed_batches_pad_far_less_than_random_ones():
    bucketed, real = token_counts(list(sampler()), LENGTHS)
    unbucketed, real_too = token_counts(list(sampler(lengths=None)), LENGTHS)
    assert real == real_too == sum(LENGTHS)
    # Padding (computed - real tokens) drops to well under half.
    assert bucketed - real < 0.25 * (unbucketed - real)
    # Within a batch the lengths are close: most batches span a few tokens at most.
    spans = sorted(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in sampler())
    assert spans[len(spans) // 2] <= 2


def test_token_counts_by_hand():
    assert token_counts([[0, 1], [2]], [3, 5, 2]) == (2 * 5 + 2, 10)


def test_order_depends_on_seed_and_epoch_and_nothing_else():
    base = list(sampler(seed=0, epoch=0))
    assert base == list(sampler(seed=0, epoch=0))
    assert base != list(sampler(seed=1, epoch=0))
    assert base != list(sampler(seed=0, epoch=1))
    # Not sorted across the epoch: the batch order is shuffled (first batches not all short).
    first = [max(LENGTHS[i] for i in b) for b in base[:10]]
    assert len(set(first)) > 3


def test_fast_forward_resumes_at_the_exact_batch():
    full = list(sampler(seed=3, epoch=2))
    resumed = sampler(seed=3)
    resumed.set_epoch(2)  # what checkpointing does on resume
    resumed.fast_forward(17)
    assert list(resumed) == full[17:]
    assert list(resumed) == full  # the skip applies to one iteration only


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_streams_of_similar_lengths(world_size):
    streams = [list(sampler(rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == -(-63 // world_size)
    seen = [i for s in streams for b in s for i in b]
    # Every example is served; only the wrap-around at the end repeats a few batches.
    assert set(seen) == set(range(N))
    wrapped = world_size * len(streams[0]) - 63
    assert len(seen) - N <= wrapped * B
    no_wrap = [i for s in streams for b in s[:-1] for i in b]
    assert len(no_wrap) == len(set(no_wrap))
    # At each step the ranks' batches are of similar length, so no rank waits long for
    # another: the step's cost (the longest rank) is close to the ranks' mean cost.
    longest = [[max(LENGTHS[i] for i in b) for b in s] for s in streams]
    step_max = sum(max(step) for step in zip(*longest, strict=True))
    step_mean = sum(sum(step) / world_size for step in zip(*longest, strict=True))
    assert step_max < 1.1 * step_mean


def test_without_lengths_the_order_is_unchanged():
    """Bucketing off reproduces the previous sampler exactly: slices of one seeded randperm."""
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 1)
    perm = torch.randperm(N, generator=gen).tolist()
    expected = [perm[i:i + B] for i in range(0, N, B)]
    assert list(sampler(seed=5, epoch=1, lengths=None)) == expected
    two = [list(sampler(seed=5, epoch=1, lengths=None, rank=r, world_size=2)) for r in (0, 1)]
    assert two[0] == expected[0::2] and two[1] == expected[1::2] + [expected[0]]


def test_evaluation_order_is_longest_first_and_covers_every_example():
    batches = list(ResumableBatchSampler(N, B, seed=0, shuffle=False, lengths=LENGTHS))
    assert sorted(i for b in batches for i in b) == list(range(N))
    flat = [LENGTHS[i] for b in batches for i in b]
    assert flat == sorted(LENGTHS, reverse=True)
    assert list(ResumableBatchSampler(N, B, seed=0, shuffle=False)) == [
        list(range(i, min(i + B, N))) for i in range(0, N, B)]


def test_lengths_must_match_the_examples():
    with pytest.raises(ValueError, match="999 lengths for 1000 examples"):
        ResumableBatchSampler(N, B, 0, lengths=LENGTHS[:-1])
