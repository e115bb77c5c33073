"""Turn a dataset into WebDataset shards plus ``manifest.json``.

    python data_prep/make_shards.py --source digits --out data/digits
    python data_prep/make_shards.py --source fashion-mnist --out data/fashion-mnist --val-fraction 0.1
    python data_prep/make_shards.py --source cifar10 --input cifar-10-python.tar.gz --out data/cifar10
    python data_prep/make_shards.py --source imagefolder --input tiny-imagenet-200 --out data/tin

Exit status 2 with ``error: ...`` on stderr for bad arguments or bad input. All logic
lives in the importable ``data_prep`` package; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep import DEFAULT_SHARD_SIZE, SOURCES, prepare  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", default=None,
                   help="file or directory to read (fashion-mnist defaults to the Debian location)")
    p.add_argument("--out", required=True, help="output directory (an earlier run there is replaced)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="carve this fraction of train into a stratified 'val' split")
    p.add_argument("--seed", type=int, default=0, help="seed of the val carve and the train order")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (png is lossless)")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder: resize (shorter side + centre crop) to N x N")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="imagefolder: 1 = grayscale, 3 = RGB (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = prepare(args.source, args.out, input=args.input, shard_size=args.shard_size,
                           val_fraction=args.val_fraction, seed=args.seed, image_format=args.format,
                           image_size=args.image_size, channels=args.channels,
                           progress=False if args.no_progress else None)
    except (ValueError, OSError) as exc:  # SourceError/SourceMissing are ValueError subclasses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {s['num_samples']} in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
