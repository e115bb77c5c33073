"""Is this shard the one manifest.json describes? Checked when the shard is opened, cheaply.

``data_prep`` records each shard's name, sample count, byte size and sha256; ``pce_dist.data``
checks them through this module (no webdataset here: ``os`` and ``hashlib`` only):

* **name** -- refused when the manifest is read unless it is exactly what
  ``data_prep.writer.shard_name`` writes (``{split}-NNNNNN.tar``): a ``pipe:`` data root
  pastes the name into a shell command. (``pce_dist.data`` also shell-quotes it there, so
  loosening the pattern one day cannot turn into an injection.)
* **local files** -- ``stat`` before the first byte is read: a missing file, or a size
  other than the manifest's, fails before any sample is used. With ``data.verify=sha256``
  the file is hashed too, once per process per ``(path, size, mtime_ns)``; the digests a
  loader process computes travel back to its rank's main process with the batches, so the
  loader processes of later epochs (forked from it) inherit them and hash nothing again.
* **streams** (URLs, ``pipe:``) -- cannot be stat'ed or read twice: the bytes are counted
  and hashed as the tar reader pulls them, and once the reader has its samples the rest
  of the stream is drained (raw bytes: no tar parsing, no decoding) to finish the digest.
  A mismatch is therefore found after that slice's samples were used; it still fails the run.
* **sample count** -- ``pce_dist.data``: a reader whose slice ends at the shard's last
  sample (by the manifest) peeks one more; finding one means the manifest undercounts.

Why hash when the tar reader notices a truncated file anyway: bytes overwritten in place,
or a shard replaced by another that happens to parse, decode "fine" into the wrong data.
The cost is small next to decoding; docs/data.md has the measurement.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, BinaryIO

from data_prep.writer import is_shard_name  # the writer owns the name pattern
from pce_dist.data_plan import ShardInfo

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20  # read size for hashing and draining: large enough that Python overhead vanishes


class CorruptDataError(RuntimeError):
    """A shard or sample is missing, damaged, or not what manifest.json says; the message names it.

    Raised at the first such problem by default; with ``data.max_skipped_fraction`` > 0 only
    once a loader process has skipped more than that fraction of its planned samples.
    """


# ----------------------------------------------------------------------------- manifest entries


def shard_entry(split: str, entry: Any) -> dict:
    """Validate one ``splits.<split>.shards[]`` entry; returns name, num_samples, sha256, size.

    Raises ``ValueError`` naming the offending name or field (the caller adds the manifest's path).
    """
    if not isinstance(entry, dict) or "name" not in entry or "num_samples" not in entry:
        raise ValueError(f"split {split!r}: a shard entry needs 'name' and 'num_samples', got {entry!r}")
    name = entry["name"]
    if not is_shard_name(name, split):
        raise ValueError(f"split {split!r} lists shard name {name!r}; only names of the form "
                         f"'{split}-NNNNNN.tar' (as data_prep writes them) are accepted")
    num_samples, size, sha256 = entry["num_samples"], entry.get("size"), entry.get("sha256", "")
    if type(num_samples) is not int or num_samples < 0:
        raise ValueError(f"shard {name}: num_samples must be an integer >= 0, got {num_samples!r}")
    if size is not None and (type(size) is not int or size < 0):
        raise ValueError(f"shard {name}: size must be an integer number of bytes, got {size!r}")
    if not isinstance(sha256, str) or (sha256 and not _SHA256_RE.fullmatch(sha256)):
        raise ValueError(f"shard {name}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return {"name": name, "num_samples": num_samples, "sha256": sha256, "size": size}


def require_checkable(shards: list[ShardInfo], verify: str, where: str) -> None:
    """``ValueError`` when ``data.verify`` asks for a check the manifest has no value for.

    Refused up front rather than skipped per shard: a check that silently does nothing is
    the failure this module exists to prevent.
    """
    if verify == "sha256":
        lacking, instead = [s.name for s in shards if not s.sha256], "data.verify=size or data.verify=off"
    elif verify == "size":
        lacking, instead = [s.name for s in shards if s.size is None], "data.verify=sha256 or data.verify=off"
    else:
        return
    if lacking:
        more = ", ..." if len(lacking) > 3 else ""
        raise ValueError(f"{where}: data.verify={verify} needs a {verify!r} for every shard, and {len(lacking)} "
                         f"have none ({', '.join(lacking[:3])}{more}); re-create the manifest with "
                         f"data_prep/make_shards.py, or set {instead}")


# ----------------------------------------------------------------------------- local files


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 hex, this process
_NEW_DIGESTS: list[tuple[tuple[str, int, int], str]] = []  # computed here, not yet sent to the parent


def take_new_digests() -> list[tuple[tuple[str, int, int], str]]:
    """Digests this process computed since the last call (a loader process sends them with a batch)."""
    new = list(_NEW_DIGESTS)
    _NEW_DIGESTS.clear()
    return new


def remember_digests(items) -> None:
    """Keep digests computed by a loader process, for the processes forked later (next epochs)."""
    _DIGESTS.update((tuple(key), digest) for key, digest in items)


def _file_sha256(path: str, key: tuple[str, int, int]) -> str:
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
        _NEW_DIGESTS.append((key, digest))
    return digest


def check_local(shard: ShardInfo, verify: str) -> None:
    """Before a local shard is read: it exists, and has the manifest's size (and digest)."""
    try:
        st = os.stat(shard.url)
    except FileNotFoundError:
        raise CorruptDataError(f"shard {shard.url}: file missing (manifest.json lists {shard.name} "
                               f"with {shard.num_samples} samples)") from None
    except OSError as exc:
        raise CorruptDataError(f"shard {shard.url}: cannot stat it: {exc}") from None
    if verify == "off":
        return
    if shard.size is not None and st.st_size != shard.size:
        raise CorruptDataError(f"shard {shard.url}: {st.st_size} bytes but manifest.json says {shard.size} "
                               f"(truncated or replaced)")
    if verify == "sha256":
        digest = _file_sha256(shard.url, (shard.url, st.st_size, st.st_mtime_ns))
        if digest != shard.sha256:
            raise CorruptDataError(f"shard {shard.url}: sha256 {digest[:16]}... does not match manifest.json's "
                                   f"{shard.sha256[:16]}... (the file was altered or replaced)")


# ----------------------------------------------------------------------------- streams


class StreamCheck:
    """A read-only stream wrapper that counts and hashes the bytes passing through it.

    The tar reader reads through it; ``finish()`` then drains what the reader left (the
    samples after its slice, the tar's end blocks) and compares size and digest with the
    manifest. ``verify="size"`` only counts (no hashing).
    """

    def __init__(self, stream: BinaryIO, shard: ShardInfo, verify: str):
        self.stream, self.shard = stream, shard
        self.num_bytes = 0
        self._hash = hashlib.sha256() if verify == "sha256" else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.num_bytes += len(data)
        if self._hash is not None:
            self._hash.update(data)
        return data

    def __str__(self) -> str:  # webdataset names the stream in its error messages
        return self.shard.url

    def finish(self) -> None:
        try:
            while self.read(_BLOCK):
                pass
        except Exception as exc:  # e.g. the pipe command exiting non-zero
            raise CorruptDataError(f"shard {self.shard.url}: could not be read to its end to verify it "
                                   f"({type(exc).__name__}: {exc})") from exc
        size = self.shard.size
        if size is not None and self.num_bytes != size:
            raise CorruptDataError(f"shard {self.shard.url}: streamed {self.num_bytes} bytes but manifest.json "
                                   f"says {size} (truncated or replaced); its samples above were already used")
        if self._hash is not None and self._hash.hexdigest() != self.shard.sha256:
            raise CorruptDataError(f"shard {self.shard.url}: sha256 {self._hash.hexdigest()[:16]}... of the "
                                   f"streamed bytes does not match manifest.json's {self.shard.sha256[:16]}... "
                                   f"(altered or replaced); its samples above were already used")
