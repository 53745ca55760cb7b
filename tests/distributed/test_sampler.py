"""ShardSampler: what DDP correctness rests on, checked without starting processes."""

from __future__ import annotations

import pytest

from segplat.data.datamodule import ShardSampler

pytestmark = pytest.mark.distributed


def _shards(length: int, world: int, shuffle: bool, pad: bool, epoch: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ShardSampler(length, rank, world, shuffle=shuffle, seed=3, pad=pad)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_training_shards_cover_the_epoch_with_equal_lengths_and_reshuffle() -> None:
    shards = _shards(11, 3, shuffle=True, pad=True, epoch=1)
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank: no one waits in all-reduce
    assert set().union(*shards) == set(range(11))
    assert _shards(11, 3, True, True, epoch=2) != shards  # a new order each epoch
    # the global order is the same for any world size, so one process with batch 2b sees what 2 x b see
    one = _shards(12, 1, True, True, epoch=1)[0]
    two = _shards(12, 2, True, True, epoch=1)
    assert [i for pair in zip(*two) for i in pair] == one


def test_evaluation_shards_never_repeat_a_sample() -> None:
    shards = _shards(11, 3, shuffle=False, pad=False)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(11))  # no padding duplicate: the summed confusion matrix is exact
