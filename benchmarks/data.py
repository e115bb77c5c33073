"""Input-pipeline throughput: the train loader with 0, 1, 2 workers vs reading the same tar bytes.

    python benchmarks/data.py                       # Fashion-MNIST shards in data/fashion-mnist
    python benchmarks/data.py --root DIR --json     # one JSON object on stdout

Baselines, all in this one process, over the train split:
  * ``raw_read``: read every shard file sequentially into memory (an I/O upper bound);
  * ``read_decode``: iterate the tars with ``tarfile`` and decode each PNG with Pillow,
    single-threaded -- what one loader process must at least do per image.
The loader figure includes worker start-up and everything up to normalised batches.
Each number is the median over ``--repeats`` runs, with min/max as the spread; the
page cache is warmed first, so this measures CPU cost, not the disk.

Whether the loader keeps up with training is the comparison that matters:
``train_step_img_per_s`` measures what one rank's training step consumes (the
fashion_mnist config's model), and ``loader_headroom`` is loader img/s over that.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from pce_dist.config import DataConfig  # noqa: E402
from pce_dist.data import build_train_loader, read_manifest  # noqa: E402


def train_step_img_per_s(cfg: DataConfig, steps: int = 5) -> float:
    """Images/s one rank's training step consumes at ``cfg.batch_size``.

    The model of ``configs/fashion_mnist.yaml`` (``digits.yaml`` for digits shards), forward + loss + backward + AdamW step on
    batches of the manifest's shape, one process (no collectives: the most a single rank
    can consume), median over ``steps`` timed steps after one warm-up step.
    """
    import torch

    from pce_dist.config import load_config
    from pce_dist.model import build_model, pce_loss

    manifest = read_manifest(cfg.root)
    config = {"digits": "digits.yaml"}.get(manifest.source, "fashion_mnist.yaml")  # a model for this image size
    run_cfg = load_config(REPO / "configs" / config)
    model = build_model(run_cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h, w = manifest.image_size
    x = torch.randn(cfg.batch_size, manifest.channels, h, w)
    y = torch.randint(0, run_cfg.model.num_classes, (cfg.batch_size,))
    rates = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = pce_loss(model(x), y, run_cfg.model).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            rates.append(cfg.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def summarise(samples: list[float]) -> dict:
    med = statistics.median(samples)
    return {"median": round(med, 1), "min": round(min(samples), 1), "max": round(max(samples), 1),
            "spread": round((max(samples) - min(samples)) / med, 3) if med else None}


def time_raw_read(paths: list[Path], num_samples: int) -> float:
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    return num_samples / (time.perf_counter() - start)


def time_read_decode(paths: list[Path], num_samples: int) -> float:
    start = time.perf_counter()
    for p in paths:
        with tarfile.open(p, "r|") as tar:
            for member in tar:
                if member.name.endswith((".png", ".jpg")):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        im.load()
    return num_samples / (time.perf_counter() - start)


def time_loader(cfg: DataConfig, epoch: int) -> float:
    start = time.perf_counter()
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, epoch=epoch)
    count = sum(int(labels_B.numel()) for _, labels_B in loader)
    return count / (time.perf_counter() - start)


def ensure_shards(root: Path, source: str) -> None:
    if (root / "manifest.json").is_file():
        return
    from data_prep import prepare

    print(f"preparing {source} shards in {root} ...", file=sys.stderr)
    prepare(source, root)


def run(root: Path, source: str, workers: list[int], repeats: int, batch_size: int) -> dict:
    ensure_shards(root, source)
    manifest = read_manifest(root)
    shards = manifest.shards("train")
    paths = [Path(s.url) for s in shards]
    n = manifest.num_samples("train")
    time_raw_read(paths, n)  # warm the page cache
    raw = [time_raw_read(paths, n) for _ in range(repeats)]
    decode = [time_read_decode(paths, n) for _ in range(repeats)]
    result = {
        "dataset": str(root), "source": manifest.source, "num_samples": n, "num_shards": len(shards),
        "batch_size": batch_size, "repeats": repeats,
        "raw_read_img_per_s": summarise(raw),
        "read_decode_img_per_s": summarise(decode),
        "loader": {},
    }
    for w in workers:
        cfg = DataConfig(root=str(root), batch_size=batch_size, num_workers=w,
                         mean=[0.5] * manifest.channels, std=[0.5] * manifest.channels)
        rates = [time_loader(cfg, epoch=r) for r in range(repeats)]
        result["loader"][f"workers={w}"] = {
            "img_per_s": summarise(rates),
            "vs_raw_read": round(statistics.median(rates) / statistics.median(raw), 4),
            "vs_read_decode": round(statistics.median(rates) / statistics.median(decode), 3),
        }
    step = train_step_img_per_s(DataConfig(root=str(root), batch_size=batch_size))
    result["train_step_img_per_s"] = step
    result["loader_headroom"] = {k: round(v["img_per_s"]["median"] / step, 2) for k, v in result["loader"].items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "data" / "fashion-mnist"), help="shard dir (prepared if absent)")
    p.add_argument("--source", default="fashion-mnist", help="data_prep source used when --root is absent")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    result = run(Path(args.root), args.source, args.workers, args.repeats, args.batch_size)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['source']}: {result['num_samples']} train images in {result['num_shards']} shards, "
          f"batch {result['batch_size']}, median [min..max] of {result['repeats']} runs")
    for name, key in (("raw read", "raw_read_img_per_s"), ("read+decode", "read_decode_img_per_s")):
        s = result[key]
        print(f"  {name:<14} {s['median']:>10.0f} img/s  [{s['min']:.0f}..{s['max']:.0f}]")
    for name, v in result["loader"].items():
        s = v["img_per_s"]
        print(f"  loader {name:<7} {s['median']:>10.0f} img/s  [{s['min']:.0f}..{s['max']:.0f}]  "
              f"{v['vs_raw_read']:.3f}x raw read, {v['vs_read_decode']:.2f}x read+decode")
    step = result["train_step_img_per_s"]
    print(f"  train step (one rank consumes) {step:.0f} img/s; loader headroom: "
          + ", ".join(f"{k} {v:.1f}x" for k, v in result["loader_headroom"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
