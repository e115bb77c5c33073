"""Deterministic, atomic WebDataset shard writing.

Determinism: every tar member gets fixed metadata (mtime 0, uid/gid 0, empty owner
names, mode 0644, USTAR format), members are written in sample order, and images are
encoded with fixed encoder parameters, so the same input and arguments give the same
bytes (for a given Pillow/zlib build, which the manifest records).

Atomicity: a shard is written to ``.<name>.tmp`` in the output directory, fsynced, and
renamed onto ``<name>`` only when complete; ``os.replace`` is atomic within a
filesystem, so a reader or a killed run never sees a partial file under a shard name.
The manifest is written the same way and last.

Sample layout (readable by stock ``tar`` and ``webdataset.WebDataset``)::

    <key>.png   (or .jpg)  the image
    <key>.cls              the integer label as ASCII text
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # "size" per shard was added later without a bump: readers treat it as optional
TEMP_SUFFIX = ".tmp"
# Names this tool owns in --out, and the only shard names a reader accepts from a manifest:
# fullmatch with [0-9] (not \d, which admits non-ASCII digits, nor $, which admits a trailing
# newline), because a pipe: data root pastes the name into a shell command.
SHARD_RE = re.compile(r"(train|val|test)-[0-9]{6}\.tar")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str, split: str) -> bool:
    """Whether ``name`` is what ``shard_name(split, i)`` writes for some ``i``."""
    m = SHARD_RE.fullmatch(name) if isinstance(name, str) else None
    return m is not None and m.group(1) == split


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless, fixed zlib level) or JPEG (quality 95, 4:4:4); no metadata chunks."""
    buf = io.BytesIO()
    im = Image.fromarray(image)
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpg":
        im.save(buf, format="JPEG", quality=95, subsampling=0, optimize=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png or jpg")
    return buf.getvalue()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform/filesystem; durability is best effort
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Run ``write(f)`` on ``.<name>.tmp`` next to ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, samples: Iterator[tuple[str, bytes, int]], ext: str) -> int:
    """Write ``(key, image_bytes, label)`` samples to one tar, atomically; returns the count."""
    count = 0

    def write(f) -> None:
        nonlocal count
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, label in samples:
                cls = str(label).encode()
                tar.addfile(_member(f"{key}.{ext}", len(image)), io.BytesIO(image))
                tar.addfile(_member(f"{key}.cls", len(cls)), io.BytesIO(cls))
                count += 1

    write_atomically(path, write)
    return count


def clean_stale(out: Path) -> None:
    """Remove temp files of an earlier killed run and the old manifest.

    The manifest goes first so that, while shards are being replaced, no manifest can
    point at a mixture of old and new shards.
    """
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
            p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


def remove_shards_except(out: Path, keep: set[str]) -> None:
    """Delete shard files this tool owns (``SHARD_RE``) that the new run did not write."""
    for p in out.iterdir():
        if SHARD_RE.fullmatch(p.name) and p.name not in keep:
            p.unlink()


def write_manifest(out: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomically(out / MANIFEST, lambda f: f.write(text.encode()))
