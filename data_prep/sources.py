"""Dataset readers: each turns one on-disk format into a ``SourceData`` of uint8 images.

A reader validates its input up front (files present, headers and sizes consistent,
labels in range) so that a wrong ``--input`` fails before anything is written, and
every error names the file it is about. Images are exposed through ``Split``, an index
over an image sequence, so that carving a validation split or shuffling the order never
copies pixel arrays (CIFAR's 60k x 3072 bytes would otherwise be copied twice).

Image arrays are ``HW`` (grayscale) or ``HWC`` (RGB), dtype uint8.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed, independent of --seed: the digits test set never changes


# ----------------------------------------------------------------------------- errors


class SourceError(ValueError):
    """The input exists but is not what the source expects; ``path`` names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class SourceMissing(SourceError, FileNotFoundError):
    """An input file or directory the source needs does not exist."""


# ----------------------------------------------------------------------------- containers


@dataclass
class Split:
    """``images[index[i]]`` with label ``labels[index[i]]``; ``keys`` name samples stably."""

    images: Sequence[np.ndarray]
    labels: np.ndarray  # int64, one per entry of ``images``
    index: np.ndarray  # int64 positions into images/labels, in output order
    name: str  # source split name, used in sample keys ("train_0001234")

    @classmethod
    def of(cls, images: Sequence[np.ndarray], labels: np.ndarray, name: str) -> "Split":
        labels = np.asarray(labels, dtype=np.int64)
        return cls(images, labels, np.arange(len(labels), dtype=np.int64), name)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, positions: np.ndarray) -> "Split":
        return Split(self.images, self.labels, self.index[positions], self.name)

    def label_at(self, i: int) -> int:
        return int(self.labels[self.index[i]])

    def image_at(self, i: int) -> np.ndarray:
        return self.images[int(self.index[i])]

    def key_at(self, i: int) -> str:
        # The key encodes where the sample came from, so it survives re-shuffling and
        # validation carving; dots are not allowed (WebDataset splits key.ext at the dot).
        return f"{self.name}_{int(self.index[i]):07d}"


@dataclass
class SourceData:
    name: str
    class_names: list[str]
    channels: int  # 1 = grayscale, 3 = RGB
    image_size: tuple[int, int]  # (H, W)
    splits: dict[str, Split]
    input: str  # what was read, recorded in the manifest


def check_labels(path: str | Path, labels: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise SourceError(path, f"label {int(labels[i])} at index {i} is outside 0..{num_classes - 1}")


# ----------------------------------------------------------------------------- digits


def load_digits_source() -> SourceData:
    """scikit-learn's 8x8 digits (values 0..16), scaled to 0..255, stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # N x 8 x 8
    full = Split.of(images, bunch.target, "digits")
    rest, test = stratified_split(full.labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return SourceData(
        name="digits", class_names=[str(c) for c in range(10)], channels=1, image_size=(8, 8),
        splits={"train": full.take(rest), "test": full.take(test)},
        input="sklearn.datasets.load_digits",
    )


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, carved) with ``round(fraction * n_c)`` of every class carved.

    Per-class rounding keeps rare classes represented in both parts; both outputs are
    sorted so the result depends only on (labels, fraction, seed).
    """
    rng = np.random.default_rng(seed)
    carved = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = int(np.floor(fraction * len(members) + 0.5))
        carved.append(rng.permutation(members)[:count])
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), carved_idx)
    return kept.astype(np.int64), carved_idx.astype(np.int64)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SourceError(path, f"corrupt gzip data: {exc}") from None
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (the MNIST container): magic 0,0,0x08(ubyte),ndim; big-endian dims; data."""
    raw = _read_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise SourceError(path, f"not an IDX file of {ndim}-d unsigned bytes (bad magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(path, "truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise SourceError(path, f"size {len(raw)} bytes does not match dims {dims} ({expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    stem = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}[kind]
    candidates = [f"{prefix}-{stem}", f"{prefix}-{stem.replace('-idx', '.idx')}"]
    for name in candidates:
        for suffix in (".gz", ""):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    raise SourceMissing(root / (candidates[0] + ".gz"),
                        "not found (also tried without .gz); on Debian/Ubuntu: "
                        "apt-get install dataset-fashion-mnist, or pass --input DIR")


def load_fashion_mnist(input: str | None) -> SourceData:
    root = Path(input or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise SourceMissing(root, "Fashion-MNIST directory not found; on Debian/Ubuntu: "
                                  "apt-get install dataset-fashion-mnist, or pass --input DIR")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path, lbl_path = _find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels")
        images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
        if len(images) != len(labels):
            raise SourceError(lbl_path, f"{len(labels)} labels but {img_path.name} holds {len(images)} images")
        if images.shape[1:] != (28, 28):
            raise SourceError(img_path, f"images are {images.shape[1:]}, expected (28, 28)")
        check_labels(lbl_path, labels, 10)
        splits[split] = Split.of(images, labels, split)
    return SourceData("fashion-mnist", list(FASHION_MNIST_CLASSES), 1, (28, 28), splits, str(root))


# ----------------------------------------------------------------------------- CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR ships as pickles; refuse anything but the numpy globals those contain, so a
    tampered archive cannot run code when it is read."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        with warnings.catch_warnings():  # numpy>=2 warns on the numpy.core alias old files use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


class _CifarFiles:
    """Members of ``cifar-1x0-python.tar.gz`` or of its extracted directory, by base name."""

    def __init__(self, path: Path, top: str):
        self.path, self.top = path, top
        if not path.exists():
            raise SourceMissing(path, f"not found; pass the {top}.tar.gz archive or its extracted directory")
        self._members: dict[str, bytes] | None = None
        if path.is_dir():
            self.dir = path / top if (path / top).is_dir() else path
        else:
            self.dir = None
            try:
                with tarfile.open(path, "r:*") as tar:
                    self._members = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()
                                     for m in tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise SourceError(path, f"not a readable tar archive: {exc}") from None

    def where(self, name: str) -> str:
        return f"{self.path}:{self.top}/{name}" if self.dir is None else str(self.dir / name)

    def load(self, name: str) -> dict:
        if self.dir is not None:
            file = self.dir / name
            if not file.is_file():
                raise SourceMissing(file, f"not found; expected the {self.top} layout")
            raw = file.read_bytes()
        elif name in self._members:
            raw = self._members[name]
        else:
            raise SourceMissing(self.where(name), "member missing from the archive")
        try:
            obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        except Exception as exc:  # any unpickling failure means "wrong format"
            raise SourceError(self.where(name), f"not a CIFAR pickle: {exc}") from None
        if not isinstance(obj, dict):
            raise SourceError(self.where(name), "not a CIFAR pickle (expected a dict)")
        return obj


def _cifar_batch(files: _CifarFiles, name: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = files.load(name)
    if b"data" not in d or label_key not in d:
        raise SourceError(files.where(name), f"missing b'data' or {label_key!r}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise SourceError(files.where(name), f"expected uint8 data of shape (N, 3072) with N labels, "
                                             f"got {data.dtype} {data.shape} and {len(labels)} labels")
    check_labels(files.where(name), labels, num_classes)
    # Rows are the R, G and B planes of a 32x32 image, one after the other.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _names(files: _CifarFiles, meta: str, key: bytes, expected: int) -> list[str]:
    d = files.load(meta)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in d.get(key, [])]
    if len(names) != expected:
        raise SourceError(files.where(meta), f"expected {expected} entries under {key!r}, got {len(names)}")
    return names


def load_cifar(input: str | None, num_classes: int) -> SourceData:
    if not input:
        archive = "cifar-10-python.tar.gz" if num_classes == 10 else "cifar-100-python.tar.gz"
        raise SourceMissing("--input", f"cifar{num_classes} needs --input (the {archive} archive "
                                       f"or its extracted directory)")
    if num_classes == 10:
        files = _CifarFiles(Path(input), "cifar-10-batches-py")
        parts = [_cifar_batch(files, f"data_batch_{i}", b"labels", 10) for i in range(1, 6)]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _cifar_batch(files, "test_batch", b"labels", 10)
        names = _names(files, "batches.meta", b"label_names", 10)
    else:
        files = _CifarFiles(Path(input), "cifar-100-python")
        train = _cifar_batch(files, "train", b"fine_labels", 100)
        test = _cifar_batch(files, "test", b"fine_labels", 100)
        names = _names(files, "meta", b"fine_label_names", 100)
    splits = {"train": Split.of(*train, "train"), "test": Split.of(*test, "test")}
    return SourceData(f"cifar{num_classes}", names, 3, (32, 32), splits, str(Path(input)))


# ----------------------------------------------------------------------------- registry


def load_source(source: str, input: str | None, **options) -> SourceData:
    """Dispatch on the ``--source`` name; ``options`` are ImageFolder's resize/channels."""
    from .imagefolder import load_imagefolder  # imports this module; loaded lazily

    loaders: dict[str, Callable[[], SourceData]] = {
        "digits": load_digits_source,
        "fashion-mnist": lambda: load_fashion_mnist(input),
        "cifar10": lambda: load_cifar(input, 10),
        "cifar100": lambda: load_cifar(input, 100),
        "imagefolder": lambda: load_imagefolder(input, **options),
    }
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(loaders)}")
    if source != "imagefolder" and any(v is not None for v in options.values()):
        raise ValueError(f"--image-size/--channels only apply to imagefolder, not {source}")
    if source == "digits" and input:
        raise ValueError("digits is embedded in scikit-learn and takes no --input")
    return loaders[source]()


SOURCES = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
