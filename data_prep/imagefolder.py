"""ImageFolder trees, including the TinyImageNet layout.

Accepted layouts (class = directory name; images found recursively under it, so
TinyImageNet's ``train/<wnid>/images/*.JPEG`` needs no special case)::

    root/train/<class>/...  [root/val/<class>/...]  [root/test/<class>/...]
    root/<class>/...                       (no split dirs: everything is train)
    TinyImageNet: root/train/<wnid>/images/*.JPEG, root/val/images/*.JPEG with
    root/val/val_annotations.txt (file <TAB> wnid ...), optional root/wnids.txt for the
    class order; its test/ has no labels and is ignored.

Directory split names are kept (``val/`` -> split ``val``), so for TinyImageNet train
with ``data.eval_split=val``.

Images are decoded lazily while shards are written: a 100k-image tree is never held in
memory, and a file that fails to decode is reported by name at that point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .sources import SourceData, SourceError, SourceMissing, Split

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


class ImageFiles(Sequence):
    """``files[i]`` -> uint8 array (HW or HWC), converted to ``mode`` and optionally resized."""

    def __init__(self, paths: list[Path], mode: str, resize_to: int | None):
        self.paths, self.mode, self.resize_to = paths, mode, resize_to
        self.expect: tuple[int, int] | None = None  # (H, W) every image must have

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SourceError(path, f"cannot decode image: {exc}") from None
        if self.resize_to:
            im = resize_center_crop(im, self.resize_to)
        if self.expect is not None and (im.height, im.width) != self.expect:
            raise SourceError(path, f"image is {im.height}x{im.width} but the dataset is "
                                    f"{self.expect[0]}x{self.expect[1]}; pass --image-size N to resize all")
        return np.asarray(im, dtype=np.uint8)


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` then a centred square crop: keeps the aspect ratio."""
    scale = size / min(im.width, im.height)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_order(root: Path, train_dir: Path) -> list[str]:
    found = [d.name for d in _subdirs(train_dir)]
    wnids = root / "wnids.txt"
    if not wnids.is_file():
        if not found:
            raise SourceError(train_dir, "no class directories found")
        return found
    classes = [line.strip() for line in wnids.read_text().splitlines() if line.strip()]
    for name in found:
        if name not in classes:
            raise SourceError(train_dir / name, f"class directory is not listed in {wnids}")
    for name in classes:
        if name not in found:
            raise SourceMissing(train_dir / name, f"class listed in {wnids} has no training directory")
    return classes


def _labelled_dirs(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for class_dir in _subdirs(split_dir):
        if class_dir.name not in index:
            raise SourceError(class_dir, f"class {class_dir.name!r} does not exist in the training "
                                         f"split ({len(classes)} classes)")
        files = _images_under(class_dir)
        paths += files
        labels += [index[class_dir.name]] * len(files)
    if not paths:
        raise SourceError(split_dir, "no images found (expected <class>/<image> below it)")
    return paths, labels


def _tiny_val(val_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """TinyImageNet's val/: one flat images/ dir labelled by val_annotations.txt."""
    annotations = val_dir / "val_annotations.txt"
    index = {c: i for i, c in enumerate(classes)}
    labelled: dict[str, int] = {}
    for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise SourceError(annotations, f"line {lineno}: expected '<file>\\t<wnid>...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise SourceError(annotations, f"line {lineno}: class {wnid!r} of {name} is not one of "
                                           f"the {len(classes)} training classes")
        labelled[name] = index[wnid]
    image_dir = val_dir / "images"
    on_disk = {p.name: p for p in _images_under(image_dir)} if image_dir.is_dir() else {}
    for name in labelled:
        if name not in on_disk:
            raise SourceMissing(image_dir / name, f"listed in {annotations} but missing")
    for name in on_disk:
        if name not in labelled:
            raise SourceError(on_disk[name], f"image has no entry in {annotations}")
    names = sorted(labelled)
    return [on_disk[n] for n in names], [labelled[n] for n in names]


def load_imagefolder(input: str | None, image_size: int | None = None,
                     channels: int | None = None) -> SourceData:
    if not input:
        raise SourceMissing("--input", "imagefolder needs --input ROOT (root/train/<class>/<image>)")
    root = Path(input)
    if not root.is_dir():
        raise SourceMissing(root, "image folder root not found")
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    channels = channels or 3  # RGB unless asked: mixed trees (TinyImageNet has gray JPEGs) stay uniform
    mode = "L" if channels == 1 else "RGB"

    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _class_order(root, train_dir)
    tiny = (root / "val" / "val_annotations.txt").is_file()
    lists = {"train": _labelled_dirs(train_dir, classes)}
    if train_dir != root:
        if tiny:
            lists["val"] = _tiny_val(root / "val", classes)
        elif (root / "val").is_dir():
            lists["val"] = _labelled_dirs(root / "val", classes)
        if (root / "test").is_dir() and not tiny:  # TinyImageNet's test/ is unlabelled
            lists["test"] = _labelled_dirs(root / "test", classes)

    splits = {name: Split.of(ImageFiles(paths, mode, image_size), np.asarray(labels), name)
              for name, (paths, labels) in lists.items()}
    first = splits["train"].images[0]  # fixes the dataset's (H, W); later images must match
    for split in splits.values():
        split.images.expect = first.shape[:2]
    return SourceData("imagefolder", classes, channels, tuple(first.shape[:2]), splits, str(root))
