"""WebDataset input pipeline -- the only module in pce_dist that imports webdataset.

Every loader process (one per rank x worker) runs the same explicit list of stages::

    shard list   manifest entries -> URLs (local dir, URL prefix or pipe: template)
    shuffle      shard order shuffled by (seed, epoch); eval keeps manifest order
    split        by rank, then by worker: contiguous *sample* ranges of that order
    tar          verify the shard against the manifest (pce_dist.integrity), then read only
                 the samples of the range (the rest is read past, not decoded)
    shuffle      bounded sample buffer, seeded by (seed, epoch, rank, worker)
    skip         resume: drop the samples of already-trained batches, before decoding
    decode       PNG/JPEG -> uint8 CHW
    augment      random crop with padding, horizontal flip; seeded per (seed, epoch, key)
    batch        exactly the planned number of batches; pad if short; normalise

Damaged data -- a missing, truncated or altered shard, a manifest count that does not fit
the tar, an undecodable sample -- goes to one handler, ``_Stats.bad``: it raises
``CorruptDataError`` naming the shard (and key), unless ``data.max_skipped_fraction`` > 0;
then it skips, counts and warns, and raises once a loader process has skipped more than that
fraction of its planned samples. Why fail by default: a rank that silently pads its batches
with repeats trains on a fraction of the data and still exits 0.

Why split by sample range instead of ``wds.split_by_node``/``split_by_worker`` (which
deal out whole shards): the model runs all-to-all collectives in every forward, so every
rank must take exactly the same number of steps. Dealing out whole shards of unequal
size can only equalise by dropping whole shards, and needs shards >= ranks x workers.
The manifest records each shard's sample count, so the exact range each loader process
owns is computed up front: equal counts for any number of shards, at most
``world_size x (batch_size + 1)`` samples dropped per epoch, and ``len()`` known without
reading any data (the arithmetic is in ``pce_dist.data_plan``). The price is that a shard
straddling two ranges is read (not decoded) up to the range start by the second reader.
The full contract is in docs/data.md.

Shape legend: B = per-rank batch, C = channels, H x W = image size.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import shlex
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep.writer import MANIFEST, MANIFEST_VERSION  # the writer owns the file's name and format
from pce_dist import integrity
from pce_dist.config import DataConfig
from pce_dist.data_plan import (ShardInfo, ShardSlice, WorkerPlan, plan_eval, plan_train,
                                rank_range, resampled_slices)
from pce_dist.integrity import CorruptDataError

__all__ = ["CorruptDataError", "Manifest", "read_manifest", "build_train_loader", "build_eval_loader",
           "TrainLoader", "EvalLoader"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
MAX_WARNINGS = 20  # per loader process; the counts in stats() stay exact beyond it


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    root: str
    splits: dict[str, list[ShardInfo]]
    num_classes: int
    class_names: list[str]
    image_size: tuple[int, int]  # (H, W)
    channels: int
    source: str

    @property
    def path(self) -> str:
        """Where the manifest was read from: what error messages name."""
        return resolve_url(self.root, MANIFEST)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"{self.root}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def check_model(self, *, in_channels: int, image_size: int, num_classes: int) -> None:
        """Raise ``ValueError`` when the model config does not fit this dataset."""
        h, w = self.image_size
        if in_channels != self.channels or (h, w) != (image_size, image_size) or num_classes != self.num_classes:
            raise ValueError(
                f"{self.root} holds {self.channels}x{h}x{w} images of {self.num_classes} classes but the model "
                f"expects model.in_channels={in_channels}, model.image_size={image_size}, "
                f"model.num_classes={num_classes}")


def resolve_url(root: str, name: str) -> str:
    """``root`` is a directory, a URL prefix, or a template with ``{name}`` (pipe: commands).

    In a ``pipe:`` command the name is shell-quoted: names are validated against the
    writer's pattern already, but a command line is no place to rely on one check.
    """
    if root.startswith("pipe:"):
        name = shlex.quote(name)
    if "{name}" in root:
        return root.replace("{name}", name)
    if "://" in root or root.startswith("pipe:"):
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root) / name)


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate ``<root>/manifest.json``; errors name the file."""
    root = str(root)
    where = resolve_url(root, MANIFEST)
    try:
        if "://" in where or where.startswith("pipe:"):
            with gopen(where) as f:
                text = f.read().decode()
        else:
            text = Path(where).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where}: no dataset manifest; prepare the data first, e.g. "
            f"python data_prep/make_shards.py --source digits --out {root}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read the manifest: {exc}") from None
    try:
        raw = json.loads(text)
        if raw.get("format_version") != MANIFEST_VERSION:
            raise ValueError(f"format_version {raw.get('format_version')!r}, expected {MANIFEST_VERSION}")
        splits, seen = {}, set()
        for split, entry in raw["splits"].items():
            shards = []
            for e in (integrity.shard_entry(split, s) for s in entry["shards"]):
                if e["name"] in seen:
                    raise ValueError(f"shard {e['name']} is listed twice")
                seen.add(e["name"])
                shards.append(ShardInfo(e["name"], resolve_url(root, e["name"]), e["num_samples"],
                                        e["sha256"], e["size"]))
            if sum(s.num_samples for s in shards) != int(entry["num_samples"]):
                raise ValueError(f"split {split!r}: shard counts do not add up to num_samples")
            splits[split] = shards
        h, w = (int(v) for v in raw["image_size"])
        manifest = Manifest(root, splits, int(raw["num_classes"]), [str(c) for c in raw["class_names"]],
                            (h, w), int(raw["channels"]), str(raw.get("source", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{where}: invalid manifest: {what}") from None
    if manifest.channels not in (1, 3) or len(manifest.class_names) != manifest.num_classes:
        raise ValueError(f"{where}: invalid manifest: channels must be 1 or 3 and class_names "
                         f"must have num_classes entries")
    return manifest


def select_shards(shards: list[ShardInfo], spec: str) -> list[ShardInfo]:
    """Keep the shards whose file names match a brace pattern (``::`` separates patterns)."""
    if not spec:
        return shards
    wanted = expand_urls(spec)
    by_name = {s.name: s for s in shards}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"data.train_shards: {missing[:3]} not in the manifest's train split")
    return [by_name[n] for n in wanted]


# ----------------------------------------------------------------------------- stages


class _Stats:
    """Counters of one loader process, and its one handler for damaged data (``bad``).

    Each batch carries the change of the counters since the previous batch (``delta``).
    """

    FIELDS = ("samples_skipped", "samples_padded", "samples_resumed_over", "shards_opened", "shards_failed")

    def __init__(self, *, max_skipped_fraction: float = 0.0, num_planned: int = 0,
                 who: str = "a loader process"):
        self.counts = dict.fromkeys(self.FIELDS, 0)
        self._sent = dict.fromkeys(self.FIELDS, 0)
        self.warnings = 0
        self.max_skipped_fraction, self.num_planned, self.who = max_skipped_fraction, num_planned, who

    def delta(self) -> dict[str, int]:
        d = {k: self.counts[k] - self._sent[k] for k in self.FIELDS}
        self._sent = dict(self.counts)
        return d

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            log.warning(message)
        elif self.warnings == MAX_WARNINGS + 1:
            log.warning("further data warnings from this loader process are suppressed (see stats())")

    def bad(self, message: str, *, num_samples: int, shard: bool, cause: BaseException | None = None) -> None:
        """Damage that costs ``num_samples`` planned samples: raise, or (under a tolerance) skip them.

        ``shard``: the fault is a whole shard's (counted in ``shards_failed``), not one sample's.
        The tolerance is per loader process, against the samples it planned to read, so it
        is decided locally, with no collective, and the same way on every rank.
        """
        if self.max_skipped_fraction == 0:
            raise CorruptDataError(message) from cause
        self.counts["samples_skipped"] += num_samples
        self.counts["shards_failed"] += int(shard)
        skipped = self.counts["samples_skipped"]
        if skipped > self.max_skipped_fraction * self.num_planned:
            raise CorruptDataError(
                f"{self.who} skipped {skipped} of its {self.num_planned} planned samples, more than "
                f"data.max_skipped_fraction={self.max_skipped_fraction} allows; the last: {message}") from cause
        self.warn(message + "; skipped")


def read_shards(slices: Iterator[ShardSlice], *, stats: _Stats, verify: str,
                give_up_after: int = 0) -> Iterator[dict]:
    """tar stage: check each shard against the manifest, yield the raw samples (dicts of bytes) of its slice.

    Damage goes to ``stats.bad`` and costs the slice's samples not yet yielded: all of them
    when found before reading (missing file, wrong size or digest), the rest when found
    while reading (truncated, unreadable), none when found after (a stream's digest, a
    sample beyond the manifest's count: those samples were used, the shard is reported).
    ``give_up_after`` > 0 (resampled mode) stops an endless loop over unreadable shards.
    """
    empty_in_a_row = 0
    for sl in slices:
        stats.counts["shards_opened"] += 1
        produced = [0]
        try:
            yield from _slice_samples(sl, verify, produced)
        except CorruptDataError as exc:
            stats.bad(str(exc), num_samples=sl.stop - sl.start - produced[0], shard=True, cause=exc)
        except Exception as exc:  # unreadable or truncated tar: named below
            missing = sl.stop - sl.start - produced[0]
            if missing == 0:
                # e.g. ``pipe:curl`` exiting non-zero because we closed the pipe after our range
                log.debug("shard %s: %s after its samples were read; ignored", sl.url, _reason(exc))
            else:
                stats.bad(f"shard {sl.url}: {missing} of samples {sl.start}..{sl.stop - 1} unreadable "
                          f"({type(exc).__name__}: {_reason(exc)})", num_samples=missing, shard=True, cause=exc)
        empty_in_a_row = 0 if produced[0] else empty_in_a_row + 1
        if give_up_after and empty_in_a_row >= give_up_after:
            raise CorruptDataError(f"{empty_in_a_row} shards in a row gave no readable sample (last: {sl.url})")


def _slice_samples(sl: ShardSlice, verify: str, produced: list[int]) -> Iterator[dict]:
    """The samples ``sl.start .. sl.stop-1`` of one verified shard; ``produced[0]`` counts them."""
    shard = sl.shard
    local = integrity.is_local(shard.url)
    if local:
        integrity.check_local(shard, verify)  # before the first sample is used
    with gopen(shard.url) as raw:
        stream = raw if local or verify == "off" else integrity.StreamCheck(raw, shard, verify)
        samples = group_by_keys(tar_file_expander([{"url": shard.url, "stream": stream}]))
        position = 0
        for sample in samples:
            if position >= sl.start:
                produced[0] += 1
                yield sample
            position += 1
            if position == sl.stop:
                break
        if position < sl.stop:
            raise CorruptDataError(f"shard {shard.url}: ended after {position} samples but manifest.json lists "
                                   f"{shard.num_samples} (truncated?)")
        if sl.ends_shard:  # the manifest's count is checkable here for the price of one header
            try:
                extra = next(samples, None)
            except Exception as exc:
                raise CorruptDataError(f"shard {shard.url}: unreadable after its {shard.num_samples} samples "
                                       f"({type(exc).__name__}: {_reason(exc)})") from exc
            if extra is not None:
                raise CorruptDataError(
                    f"shard {shard.url}: holds more than the {shard.num_samples} samples manifest.json lists "
                    f"(sample {extra.get('__key__')!r} follows them): the manifest does not describe this shard")
        if isinstance(stream, integrity.StreamCheck):
            stream.finish()


def _reason(exc: Exception) -> str:
    # webdataset appends the stream and URL to exception args; the first arg is the message.
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def shuffle_samples(samples: Iterator, *, bufsize: int, seed: str) -> Iterator:
    """Reservoir-style buffer: emit a random buffered sample for each new one."""
    if bufsize <= 1:
        yield from samples
        return
    rng, buf = random.Random(seed), []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def skip_samples(samples: Iterator, *, count: int, stats: _Stats) -> Iterator:
    """Resume: drop ``count`` raw samples (no decode), then pass the rest through."""
    samples = iter(samples)
    for _ in itertools.islice(samples, count):
        stats.counts["samples_resumed_over"] += 1
    yield from samples


def decode_image(data: bytes, ext: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Encoded image -> uint8 ``C x H x W`` array; raises on bad bytes or a size mismatch.

    Arrays stay numpy until the batch is stacked: one tensor per batch, not per sample.
    """
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[ext]]) as im:  # no format sniffing
        arr_HWC = np.asarray(im if im.mode == mode else im.convert(mode), dtype=np.uint8)
    if arr_HWC.shape[:2] != size:
        raise ValueError(f"image is {arr_HWC.shape[0]}x{arr_HWC.shape[1]}, manifest says {size[0]}x{size[1]}")
    return arr_HWC[None] if arr_HWC.ndim == 2 else arr_HWC.transpose(2, 0, 1)


def decode_samples(samples: Iterator[dict], *, channels: int, size: tuple[int, int], num_classes: int,
                   stats: _Stats) -> Iterator[tuple[np.ndarray, int, str]]:
    """decode stage; an undecodable sample goes to the bad-data handler ``stats.bad``."""
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None or "cls" not in sample:
                raise ValueError(f"missing image or cls member (has {sorted(k for k in sample if k[0] != '_')})")
            image_CHW = decode_image(sample[ext], ext, channels, size)
            label = int(sample["cls"])
            if not 0 <= label < num_classes:
                raise ValueError(f"label {label} outside 0..{num_classes - 1}")
        except Exception as exc:  # PIL raises many types for bad bytes
            stats.bad(f"corrupt sample {key!r} in shard {url}: {type(exc).__name__}: {exc}",
                      num_samples=1, shard=False, cause=exc)
            continue
        yield image_CHW, label, key


def augment_samples(samples: Iterator, *, padding: int, hflip: bool, seed: str) -> Iterator:
    """Random crop after zero padding, random horizontal flip.

    The random draws are seeded per (seed, epoch, key), so a sample is augmented the same
    way whatever rank/worker reads it and whether or not the epoch was resumed.
    """
    if padding == 0 and not hflip:
        yield from samples
        return
    for image_CHW, label, key in samples:
        rng = random.Random(f"{seed}/{key}")
        if padding:
            _, h, w = image_CHW.shape
            padded = np.pad(image_CHW, ((0, 0), (padding, padding), (padding, padding)))
            top, left = rng.randint(0, 2 * padding), rng.randint(0, 2 * padding)
            image_CHW = padded[:, top:top + h, left:left + w]
        if hflip and rng.random() < 0.5:
            image_CHW = image_CHW[:, :, ::-1]
        yield image_CHW, label, key


def normalize(images_BCHW: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 pixels -> the model's float32 input, ``(x / 255 - mean) / std`` per channel.

    The one definition of the model's input: the loaders and ``pce_dist.predict`` use it.
    Computed as ``x * scale - shift`` in two in-place passes, in numpy because torch's
    intra-op threads cost more than they save on a batch this small.
    """
    scale_C11 = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(-1, 1, 1)
    shift_C11 = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(-1, 1, 1)
    out_BCHW = images_BCHW.astype(np.float32)
    out_BCHW *= scale_C11
    out_BCHW -= shift_C11
    return out_BCHW


def fixed_batches(samples: Iterator, *, num_batches: int, batch_size: int, shape_CHW: tuple[int, int, int],
                  mean: list[float], std: list[float], pad_mode: str, stats: _Stats,
                  finite: bool = True) -> Iterator[tuple]:
    """batch stage: exactly ``num_batches`` batches of ``batch_size``, whatever arrives.

    A short stream (samples skipped under ``data.max_skipped_fraction``; eval ranks with
    a smaller share) is padded so the rank still takes the planned number of steps:
    ``pad_mode="reuse"`` (train) repeats the most recent real samples of this process,
    ``"invalid"`` (eval) adds zero images with ``valid=False``. Yields ``(images_BCHW float32
    normalised, labels_B int64, valid_B bool, stats delta, new shard digests)``.

    ``finite`` (all but resampled mode): before the last batch goes out, pull once past the
    plan. Without a shuffle buffer nothing else would resume the tar stage after its last
    sample, so the checks that run there (the manifest's count, a stream's digest) would be
    skipped for every process's last shard.
    """
    samples = iter(samples)
    recent: deque = deque(maxlen=batch_size)
    for k in range(num_batches):
        batch = [(img, label, True) for img, label, _key in itertools.islice(samples, batch_size)]
        if finite and k == num_batches - 1 and next(samples, None) is not None:
            raise RuntimeError("a loader process got more samples than its planned batches")  # invariant
        recent.extend(batch)
        short = batch_size - len(batch)
        if short and pad_mode == "reuse":
            if not recent:
                raise RuntimeError("a loader process got no readable sample to pad its batches with; "
                                   "see the warnings above for the shards at fault")
            pool = list(recent)
            batch += [pool[i % len(pool)] for i in range(short)]
        elif short:
            batch += [(np.zeros(shape_CHW, dtype=np.uint8), 0, False)] * short
        stats.counts["samples_padded"] += short
        images_BCHW = torch.from_numpy(normalize(np.stack([b[0] for b in batch]), mean, std))
        labels_B = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        valid_B = torch.tensor([b[2] for b in batch], dtype=torch.bool)
        if pad_mode == "invalid":
            images_BCHW[~valid_B] = 0.0
        yield images_BCHW, labels_B, valid_B, stats.delta(), integrity.take_new_digests()


# ----------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class _StreamOptions:
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    batch_size: int
    shuffle_buffer: int
    padding: int
    hflip: bool
    mean: list[float]
    std: list[float]
    verify: str  # data.verify
    max_skipped_fraction: float
    rank: int  # for messages
    pad_mode: str  # "reuse" (train) or "invalid" (eval)
    augment_seed: str
    resample_from: tuple[ShardInfo, ...] = ()  # non-empty: resampled mode


class _PlannedStream(IterableDataset):
    """The per-process pipeline. Every DataLoader worker holds a copy and picks its plan
    by worker id. ``rotate`` (= start_step) makes worker 0 play the plan whose batch comes
    next, so DataLoader's round-robin yields the uninterrupted order after a resume."""

    def __init__(self, plans: list[WorkerPlan], opts: _StreamOptions, rotate: int = 0):
        super().__init__()
        self.plans, self.opts, self.rotate = plans, opts, rotate

    def __iter__(self):
        info = get_worker_info()
        index = ((info.id if info else 0) + self.rotate) % len(self.plans)
        return iter(self.pipeline(self.plans[index], index))

    def pipeline(self, plan: WorkerPlan, index: int = 0) -> wds.DataPipeline:
        o = self.opts
        stats = _Stats(max_skipped_fraction=o.max_skipped_fraction, num_planned=plan.num_samples,
                       who=f"rank {o.rank} loader process {index}")
        return wds.DataPipeline(
            partial(self._shard_slices, plan),  # shuffled by (seed, epoch), split by rank and worker
            partial(read_shards, stats=stats, verify=o.verify, give_up_after=2 * len(o.resample_from)),
            partial(shuffle_samples, bufsize=o.shuffle_buffer, seed=plan.seed),
            partial(skip_samples, count=plan.skip_samples, stats=stats),
            partial(decode_samples, channels=o.channels, size=o.image_size, num_classes=o.num_classes,
                    stats=stats),
            partial(augment_samples, padding=o.padding, hflip=o.hflip, seed=o.augment_seed),
            partial(fixed_batches, num_batches=plan.num_batches, batch_size=o.batch_size,
                    shape_CHW=(o.channels, *o.image_size), mean=o.mean, std=o.std,
                    pad_mode=o.pad_mode, stats=stats, finite=not o.resample_from),
        )

    def _shard_slices(self, plan: WorkerPlan) -> Iterator[ShardSlice]:
        if self.opts.resample_from:
            return resampled_slices(self.opts.resample_from, seed=plan.seed)
        return iter(plan.slices)


class _Loader:
    """Shared iteration: DataLoader over the planned stream, stats aggregation, length check."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if len(cfg.mean) != manifest.channels or len(cfg.std) != manifest.channels:
            raise ValueError(f"data.mean/data.std need {manifest.channels} entries for the "
                             f"{manifest.channels}-channel images of {manifest.root}")
        self.cfg, self.manifest, self.rank, self.world_size = cfg, manifest, rank, world_size
        self.num_workers = max(1, cfg.num_workers)  # loader processes per rank (0 = in-process)
        self._num_batches, self._start_step = 0, 0
        self._stream: _PlannedStream | None = None
        self._stats: dict[str, int] = {}
        self._planned: dict[str, int] = {}

    def __len__(self) -> int:
        return self._num_batches

    def stats(self) -> dict[str, int]:
        """This rank's accounting for the current/last epoch (see docs/data.md)."""
        return {"rank": self.rank, **self._planned, **self._stats}

    def _batches(self) -> Iterator[tuple]:
        cfg = self.cfg
        # A private generator: DataLoader would otherwise draw its worker base seed from the
        # global torch RNG, shifting the dropout stream of a resumed run by one draw.
        # (Our pipeline seeds itself from (seed, epoch, ...), not from the worker seed.)
        loader = DataLoader(self._stream, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            generator=torch.Generator().manual_seed(0))
        self._stats = {"batches": 0, "samples_seen": 0, **dict.fromkeys(_Stats.FIELDS, 0)}
        expected = self._num_batches - self._start_step
        batches = iter(loader)
        try:
            for images_BCHW, labels_B, valid_B, delta, digests in batches:
                integrity.remember_digests(digests)  # the next epoch's loader processes inherit them
                for k, v in delta.items():
                    self._stats[k] += v
                self._stats["batches"] += 1
                self._stats["samples_seen"] += int(labels_B.numel()) - delta["samples_padded"]
                yield images_BCHW, labels_B, valid_B
        finally:
            # Stop this epoch's workers now (also on an early break or a worker error), not
            # when the garbage collector gets to the iterator: an exception traceback keeps
            # it alive, and workers forked meanwhile for the next loader would inherit it.
            from pce_dist.compat import shutdown_loader_workers

            shutdown_loader_workers(batches)
        if self._stats["batches"] != expected:  # invariant: every process yields its planned batches
            raise RuntimeError(f"rank {self.rank} produced {self._stats['batches']} batches, planned {expected}")


class TrainLoader(_Loader):
    """Iterable of ``(images_BCHW, labels_B)``; ``len()`` = batches per epoch on every rank.

    After ``set_epoch(e, start_step=s)`` iteration yields batches ``s .. len()-1`` of epoch
    ``e``. ``build_train_loader`` returns one already set.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, *, rank: int, world_size: int, seed: int):
        super().__init__(cfg, manifest, rank, world_size)
        self.seed = seed
        self.shards = select_shards(manifest.shards(cfg.train_split), cfg.train_shards)
        integrity.require_checkable(self.shards, cfg.verify, manifest.path)
        total = sum(s.num_samples for s in self.shards)
        self._num_batches = train_batches_per_epoch(cfg, manifest, world_size)
        if not cfg.resampled and len(self.shards) < world_size * self.num_workers:
            log.info("%d train shards for %d loader processes: processes share shards and each reads "
                     "past the samples before its range; more shards (--shard-size) read less",
                     len(self.shards), world_size * self.num_workers)
        _, count = rank_range(total, rank, world_size)
        self._planned = {"samples_dropped": 0 if cfg.resampled else count - self._num_batches * cfg.batch_size}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Plan ``epoch``; iteration resumes at batch ``start_step`` (skipped batches are not decoded)."""
        if not 0 <= start_step <= self._num_batches:
            raise ValueError(f"start_step {start_step} is outside 0..{self._num_batches} for this epoch")
        cfg = self.cfg
        plans = plan_train(self.shards, num_batches=self._num_batches, rank=self.rank,
                           world_size=self.world_size, batch_size=cfg.batch_size, num_workers=self.num_workers,
                           seed=self.seed, epoch=epoch, start_step=start_step, resampled=cfg.resampled)
        opts = _StreamOptions(
            channels=self.manifest.channels, image_size=self.manifest.image_size,
            num_classes=self.manifest.num_classes, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
            padding=cfg.random_crop_padding, hflip=cfg.hflip, mean=list(cfg.mean), std=list(cfg.std),
            verify=cfg.verify, max_skipped_fraction=cfg.max_skipped_fraction, rank=self.rank,
            pad_mode="reuse", augment_seed=f"augment/{self.seed}/{epoch}",
            resample_from=tuple(self.shards) if cfg.resampled else ())
        self._stream = _PlannedStream(plans, opts, rotate=start_step)
        self._start_step, self.epoch = start_step, epoch
        self._planned.update(epoch=epoch, start_step=start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images_BCHW, labels_B, _valid_B in self._batches():
            yield images_BCHW, labels_B


class EvalLoader(_Loader):
    """Iterable of ``(images_BCHW, labels_B, valid_B)`` over a whole split, no augmentation.

    Every rank yields ``len()`` batches (the longest rank's count); slots beyond a rank's
    share, or left by unreadable samples, hold zero images with ``valid_B = False``.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, split: str, *, rank: int, world_size: int):
        super().__init__(cfg, manifest, rank, world_size)
        shards = manifest.shards(split)
        if sum(s.num_samples for s in shards) == 0:
            raise ValueError(f"{manifest.path}: split {split!r} has no samples, so there is nothing to evaluate; "
                             f"point data.eval_split / data.val_split at a split with samples")
        integrity.require_checkable(shards, cfg.verify, manifest.path)
        self.split = split
        self._num_batches, plans = plan_eval(shards, rank=rank, world_size=world_size,
                                             batch_size=cfg.batch_size, num_workers=self.num_workers)
        opts = _StreamOptions(
            channels=manifest.channels, image_size=manifest.image_size, num_classes=manifest.num_classes,
            batch_size=cfg.batch_size, shuffle_buffer=0, padding=0, hflip=False, mean=list(cfg.mean), std=list(cfg.std),
            verify=cfg.verify, max_skipped_fraction=cfg.max_skipped_fraction, rank=rank,
            pad_mode="invalid", augment_seed="")
        self._stream = _PlannedStream(plans, opts)
        total = sum(s.num_samples for s in shards)
        self._planned = {"split_samples": total, "rank_samples": rank_range(total, rank, world_size)[1]}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self._batches()


def train_batches_per_epoch(cfg: DataConfig, manifest: Manifest, world_size: int) -> int:
    """Batches every rank yields per epoch of the train split: the length of the schedule,
    known from the manifest alone (no loader is built to learn it)."""
    shards = select_shards(manifest.shards(cfg.train_split), cfg.train_shards)
    total = sum(s.num_samples for s in shards)
    nominal = cfg.samples_per_epoch if cfg.resampled and cfg.samples_per_epoch else total
    num_batches = (nominal // world_size) // cfg.batch_size
    if num_batches == 0:
        raise ValueError(
            f"{manifest.root} split {cfg.train_split!r} has {nominal} samples: fewer than "
            f"world_size={world_size} x data.batch_size={cfg.batch_size}, so some rank would get no "
            f"batch; lower data.batch_size, use fewer ranks"
            + (", or raise data.samples_per_epoch" if cfg.resampled else ", or use more data"))
    return num_batches


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, epoch: int,
                       start_step: int = 0, manifest: Manifest | None = None) -> TrainLoader:
    """The train split for one epoch on one rank; resume with ``start_step`` (batches done)."""
    loader = TrainLoader(cfg, manifest or read_manifest(cfg.root), rank=rank, world_size=world_size, seed=seed)
    loader.set_epoch(epoch, start_step)
    return loader


def build_eval_loader(cfg: DataConfig, split: str, *, rank: int, world_size: int,
                      manifest: Manifest | None = None) -> EvalLoader:
    """A whole split, each sample once across ranks, equal ``len()`` on every rank."""
    return EvalLoader(cfg, manifest or read_manifest(cfg.root), split, rank=rank, world_size=world_size)
