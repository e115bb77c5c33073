"""Who reads what: the sample ranges of every rank and loader process, as pure arithmetic.

No I/O, no torch, no webdataset: ``pce_dist.data`` turns these plans into pipelines. Kept
apart so the counting -- every rank the same number of batches, each sample at most once
per epoch (exactly once in eval) -- can be checked on its own (tests/unit/test_data_plan.py).

Terms: a rank's samples are a contiguous range of the epoch's shard order (the shards
concatenated); each of its ``W`` loader processes ("workers") owns a contiguous
sub-range holding a whole number of batches; batch ``k`` of a rank comes from worker
``k % W``, the order DataLoader's round-robin over workers yields.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name in the manifest, e.g. "train-000003.tar"
    url: str  # what gopen opens: a path, a URL or a pipe: command
    num_samples: int
    sha256: str = ""  # hex digest of the whole file; "" = the manifest has none
    size: int | None = None  # bytes; None = a manifest written before sizes were recorded


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``start .. stop-1`` of one shard; the reader checks the shard against ``shard``."""

    shard: ShardInfo
    start: int  # first sample ordinal in the shard
    stop: int  # one past the last

    @property
    def url(self) -> str:
        return self.shard.url

    @property
    def ends_shard(self) -> bool:
        """The slice runs to the shard's last sample (by the manifest): its reader can peek past it."""
        return self.stop == self.shard.num_samples


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader process reads and yields in one epoch."""

    slices: tuple[ShardSlice, ...]  # unused in resampled mode
    num_batches: int
    skip_samples: int  # resume: samples (post-shuffle, pre-decode) of already-trained batches
    seed: str  # shuffle-buffer / resampling seed of this process
    num_samples: int = 0  # samples it reads (resumed-over ones included): the base of data.max_skipped_fraction


def shuffled_shards(shards: list[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def slice_range(shards: list[ShardInfo], lo: int, hi: int) -> list[ShardSlice]:
    """Samples ``[lo, hi)`` of the concatenation of ``shards`` as per-shard slices."""
    out, offset = [], 0
    for s in shards:
        a, b = max(lo, offset), min(hi, offset + s.num_samples)
        if a < b:
            out.append(ShardSlice(s, a - offset, b - offset))
        offset += s.num_samples
        if offset >= hi:
            break
    return out


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first sample, count) of ``rank``'s contiguous share; shares differ by at most 1."""
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def batches_per_worker(num_batches: int, num_workers: int) -> list[int]:
    """Batch ``k`` of a rank comes from worker ``k % W`` -- the order DataLoader's
    round-robin over workers produces -- so worker ``w`` makes this many batches."""
    q, r = divmod(num_batches, num_workers)
    return [q + (w < r) for w in range(num_workers)]


def plan_train(shards: list[ShardInfo], *, num_batches: int, rank: int, world_size: int, batch_size: int,
               num_workers: int, seed: int, epoch: int, start_step: int = 0,
               resampled: bool = False) -> list[WorkerPlan]:
    """Plans of one rank's ``num_workers`` loader processes for one training epoch.

    The rank's range of the (seed, epoch)-shuffled shard sequence is cut into one
    contiguous sub-range per worker, each a whole number of batches; on resume, worker
    ``w`` skips the samples of its batches among the first ``start_step``.
    """
    B, W = batch_size, num_workers
    first, _ = rank_range(sum(s.num_samples for s in shards), rank, world_size)
    order = shuffled_shards(shards, seed, epoch)
    counts = batches_per_worker(num_batches, W)
    skips = batches_per_worker(start_step, W)  # the same round-robin count, for k < start_step
    plans = []
    for w in range(W):
        slices = () if resampled else tuple(slice_range(order, first, first + counts[w] * B))
        plans.append(WorkerPlan(slices, counts[w] - skips[w], skips[w] * B,
                                seed=f"{seed}/{epoch}/{rank}/{world_size}/{w}/{W}", num_samples=counts[w] * B))
        first += counts[w] * B
    return plans


def plan_eval(shards: list[ShardInfo], *, rank: int, world_size: int, batch_size: int,
              num_workers: int) -> tuple[int, list[WorkerPlan]]:
    """(batches on every rank, plans): the longest rank's batch count; shorter ranks' last
    workers get fewer samples than batch slots and pad with invalid samples."""
    B, W = batch_size, num_workers
    total = sum(s.num_samples for s in shards)
    first, count = rank_range(total, rank, world_size)
    longest = (total + world_size - 1) // world_size  # the largest rank share
    num_batches = (longest + B - 1) // B
    plans, offset = [], 0
    for n in batches_per_worker(num_batches, W):
        lo, hi = min(count, offset), min(count, offset + n * B)
        plans.append(WorkerPlan(tuple(slice_range(shards, first + lo, first + hi)), n, 0, seed="",
                                num_samples=hi - lo))
        offset += n * B
    return num_batches, plans


def resampled_slices(shards: tuple[ShardInfo, ...], *, seed: str) -> Iterator[ShardSlice]:
    """Whole shards drawn with replacement, weighted by size so every sample is equally
    likely. Endless: ``fixed_batches`` stops pulling after its planned batches."""
    rng, weights = random.Random(f"resample/{seed}"), [s.num_samples for s in shards]
    while True:
        s = rng.choices(shards, weights)[0]
        yield ShardSlice(s, 0, s.num_samples)
