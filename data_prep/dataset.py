"""``prepare()``: a source -> arranged splits -> shards + ``manifest.json`` in one directory.

Order of operations in the output directory, chosen so an interrupted or failed run is
never mistaken for a finished one:

1. read and validate the source (a wrong ``--input`` fails before anything is touched);
2. delete stale ``.*.tmp`` files and the old manifest;
3. write every shard atomically (temp name, fsync, rename);
4. delete shards of an earlier run that this run did not rewrite;
5. write the manifest, atomically, last.

A reader therefore treats "manifest present" as "dataset complete". If writing fails
(e.g. an undecodable image in an ImageFolder tree) the shards of this run are removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
from tqdm import tqdm

from .sources import SourceData, Split, load_source, stratified_split
from .writer import (MANIFEST_VERSION, clean_stale, encode_image, remove_shards_except,
                     sha256_file, shard_name, write_manifest, write_shard)

VERSION = "1.0"
DEFAULT_SHARD_SIZE = 1000  # ~2-4 MB of 28x28..32x32 PNGs: enough shards to spread over ranks x workers


def arrange_splits(data: SourceData, val_fraction: float, seed: int) -> dict[str, Split]:
    """Carve ``val`` from train (stratified) and shuffle the train order, both from ``seed``.

    The train order is shuffled once here because sources are often sorted by class
    (ImageFolder always is); the loader's shard shuffle and bounded sample buffer could
    not undo whole shards of a single class. Eval splits keep source order.
    """
    splits = dict(data.splits)
    train = splits["train"]
    if val_fraction > 0:
        if "val" in splits:
            raise ValueError(f"{data.input} already has a val split; drop --val-fraction")
        kept, carved = stratified_split(train.labels[train.index], val_fraction, seed)
        if len(carved) == 0:
            raise ValueError(f"--val-fraction {val_fraction} carves no sample from {len(train)} "
                             f"training samples; use a larger fraction")
        splits["val"], train = train.take(carved), train.take(kept)
    rng = np.random.default_rng([seed, 1])  # distinct stream from the carve's
    splits["train"] = train.take(rng.permutation(len(train)))
    order = [s for s in ("train", "val", "test") if s in splits]
    return {s: splits[s] for s in order}


def _encoded(split: Split, start: int, stop: int, fmt: str, bar: tqdm) -> Iterator[tuple[str, bytes, int]]:
    for i in range(start, stop):
        yield split.key_at(i), encode_image(split.image_at(i), fmt), split.label_at(i)
        bar.update(1)


def prepare(source: str, out: str | Path, input: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
            val_fraction: float = 0.0, seed: int = 0, image_format: str = "png",
            image_size: int | None = None, channels: int | None = None,
            progress: bool | None = None) -> dict:
    """Write ``{split}-NNNNNN.tar`` shards and ``manifest.json`` into ``out``; return the manifest.

    Args:
        source: one of ``data_prep.SOURCES``.
        out: output directory (created; an earlier run's output there is replaced).
        input: file or directory to read; ``None`` uses the source's default location.
        shard_size: samples per shard (the last shard of a split may be smaller).
        val_fraction: fraction of train carved into a stratified ``val`` split.
        seed: drives the val carve and the train order.
        image_format: ``png`` (lossless) or ``jpg``.
        image_size, channels: ImageFolder only -- resize to a square / force 1 or 3 channels.
        progress: tqdm bar on stderr; ``None`` shows it only on a terminal.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"--format must be png or jpg, got {image_format!r}")
    data = load_source(source, input, image_size=image_size, channels=channels)
    splits = arrange_splits(data, val_fraction, seed)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    written: list[str] = []
    entries: dict[str, dict] = {}
    total = sum(len(s) for s in splits.values())
    try:
        with tqdm(total=total, unit="img", desc=f"{source} -> {out}",
                  disable=None if progress is None else not progress) as bar:
            for name, split in splits.items():
                shards = []
                for start in range(0, len(split), shard_size):
                    fname = shard_name(name, len(shards))
                    stop = min(start + shard_size, len(split))
                    count = write_shard(out / fname, _encoded(split, start, stop, image_format, bar),
                                        image_format)
                    written.append(fname)
                    # size and digest let the loader refuse a truncated or altered shard (docs/data.md)
                    shards.append({"name": fname, "num_samples": count, "size": (out / fname).stat().st_size,
                                   "sha256": sha256_file(out / fname)})
                entries[name] = {"num_samples": len(split), "shards": shards}
    except BaseException:
        for fname in written:  # whole but orphaned without a manifest: do not leave them
            (out / fname).unlink(missing_ok=True)
        raise
    remove_shards_except(out, set(written))

    manifest = {
        "format_version": MANIFEST_VERSION,
        "source": data.name,
        "num_classes": len(data.class_names),
        "class_names": data.class_names,
        "image_size": list(data.image_size),
        "channels": data.channels,
        "image_format": image_format,
        "splits": entries,
        "data_prep": {
            "version": VERSION,
            "pillow": PIL.__version__,  # PNG bytes depend on the zlib Pillow was built with
            "args": {"source": source, "input": data.input, "shard_size": shard_size,
                     "val_fraction": val_fraction, "seed": seed, "format": image_format,
                     "image_size": image_size, "channels": channels},
        },
    }
    write_manifest(out, manifest)
    return manifest
