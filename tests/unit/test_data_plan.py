"""Planning arithmetic of pce_dist.data as properties over random shard layouts (no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pce_dist.data_plan import ShardInfo, plan_eval, plan_train, rank_range, slice_range

pytestmark = pytest.mark.unit

layouts = st.lists(st.integers(0, 40), min_size=1, max_size=12)


def samples_of(plans) -> list[tuple[str, int]]:
    return [(sl.url, i) for p in plans for sl in p.slices for i in range(sl.start, sl.stop)]


@settings(max_examples=150, deadline=None)
@given(sizes=layouts, world_size=st.integers(1, 5), workers=st.integers(1, 4), batch=st.integers(1, 9),
       epoch=st.integers(0, 3), start_fraction=st.floats(0, 1))
def test_train_plans_are_disjoint_full_batches(sizes, world_size, workers, batch, epoch, start_fraction):
    shards = [ShardInfo(f"s{i}", f"u{i}", n) for i, n in enumerate(sizes)]
    total = sum(sizes)
    num_batches = (total // world_size) // batch
    start_step = int(start_fraction * num_batches)
    used: list[tuple[str, int]] = []
    for rank in range(world_size):
        full = plan_train(shards, num_batches=num_batches, rank=rank, world_size=world_size, batch_size=batch,
                          num_workers=workers, seed=7, epoch=epoch)
        assert sum(p.num_batches for p in full) == num_batches  # the same on every rank
        assert all(sum(sl.stop - sl.start for sl in p.slices) == p.num_batches * batch == p.num_samples
                   for p in full)
        used += samples_of(full)
        resumed = plan_train(shards, num_batches=num_batches, rank=rank, world_size=world_size,
                             batch_size=batch, num_workers=workers, seed=7, epoch=epoch, start_step=start_step)
        assert sum(p.num_batches for p in resumed) == num_batches - start_step
        assert sum(p.skip_samples for p in resumed) == start_step * batch
        assert [p.num_samples for p in resumed] == [p.num_samples for p in full]  # resumed-over ones count
    counts = Counter(used)
    assert all(c == 1 for c in counts.values())
    assert len(used) == world_size * num_batches * batch
    assert total - len(used) < world_size * (batch + 1)  # what is dropped to equalise


@settings(max_examples=150, deadline=None)
@given(sizes=layouts, world_size=st.integers(1, 5), workers=st.integers(1, 4), batch=st.integers(1, 9))
def test_eval_plans_cover_every_sample_once_with_equal_lengths(sizes, world_size, workers, batch):
    shards = [ShardInfo(f"s{i}", f"u{i}", n) for i, n in enumerate(sizes)]
    lengths, used = set(), []
    for rank in range(world_size):
        num_batches, plans = plan_eval(shards, rank=rank, world_size=world_size, batch_size=batch,
                                       num_workers=workers)
        lengths.add(num_batches)
        assert sum(p.num_batches for p in plans) == num_batches
        assert all(sum(sl.stop - sl.start for sl in p.slices) == p.num_samples <= p.num_batches * batch
                   for p in plans)
        assert all(sl.ends_shard == (sl.stop == sizes[int(sl.url[1:])]) for p in plans for sl in p.slices)
        used += samples_of(plans)
    assert len(lengths) == 1
    assert sorted(used) == sorted((f"u{i}", j) for i, n in enumerate(sizes) for j in range(n))


def test_ranges_partition_the_samples():
    shards = [ShardInfo(f"s{i}", f"u{i}", n) for i, n in enumerate([3, 0, 5, 2])]
    got = [(s.url, s.start, s.stop) for s in slice_range(shards, 2, 9)]
    assert got == [("u0", 2, 3), ("u2", 0, 5), ("u3", 0, 1)]
    assert [rank_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
