"""Evaluate an exported model on one process: ``python -m pce_dist.evaluate MODEL``.

    python -m pce_dist.evaluate MODEL.safetensors|MODEL.pt [--data-root DIR] [--split test] [--batch-size N] [--json]

Uses the same data pipeline (``pce_dist.data``) and the same metric arithmetic
(``pce_dist.evaluation``) as the distributed trainer, so the numbers are comparable. Also
prints what one image costs (``pce_dist.flops``: total and active parameters, forward
FLOPs, experts per patch), measured on the split's first batch with the trained routing --
the numbers that put a PCE run and its dense baseline side by side.

The model is read by ``pce_dist.export.load_exported``, which unpickles nothing but tensors:
a file that needs more is refused and the command exits with status 2 naming it, as it
does for a missing file or data root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from . import evaluation, flops
from .config import config_from_dict
from .export import load_exported


def evaluate_file(path: str, *, data_root: str | None = None, split: str | None = None,
                  batch_size: int | None = None) -> dict[str, float]:
    from .data import build_eval_loader

    model, config = load_exported(path)
    cfg = config_from_dict(config)
    data_cfg = dataclasses.replace(cfg.data, root=data_root or cfg.data.root,
                                   batch_size=batch_size or cfg.data.batch_size)
    split = split or cfg.data.eval_split
    loader = build_eval_loader(data_cfg, split, rank=0, world_size=1)
    sums, layer_sums, _ = evaluation.accumulate(model, loader, device=torch.device("cpu"), dtype=torch.float32,
                                                num_layers=len(model.routers()), num_experts=cfg.model.num_experts,
                                                num_classes=cfg.model.num_classes)
    metrics = evaluation.metrics(sums, layer_sums, prefix="eval" if split == cfg.data.eval_split else split, split=split,
                                 collapse_usage=cfg.model.collapse_usage)
    x_BCHW, _, valid_B = next(iter(loader))
    cost = flops.measure(model, x_BCHW[valid_B.bool()])
    metrics.update({"cost/total_params": float(cost.total_params), "cost/active_params": cost.active_params,
                    "cost/fwd_mflop_per_img": cost.forward_flops_per_image / 1e6})
    metrics.update({f"cost/experts_per_patch/layer{i}": k for i, k in enumerate(cost.experts_per_patch)})
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-root", default=None, help="shards directory (default: the run's data.root)")
    ap.add_argument("--split", default=None, help="split to evaluate (default: the run's data.eval_split)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print every metric as one JSON object")
    args = ap.parse_args(argv)
    try:
        metrics = evaluate_file(args.model, data_root=args.data_root, split=args.split, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as exc:  # a refused or unreadable model, a bad data root
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        key = next(k for k in metrics if k.endswith("/accuracy"))
        print(f"{key.split('/')[0]} accuracy: {metrics[key]:.4f} on {int(metrics[key.replace('accuracy', 'samples')])} samples")
        per_patch = ", ".join(f"{v:.2f}" for k, v in metrics.items() if k.startswith("cost/experts_per_patch/"))
        print(f"params: {int(metrics['cost/total_params']):,} total, {metrics['cost/active_params']:,.0f} active per image; "
              f"forward {metrics['cost/fwd_mflop_per_img']:.1f} MFLOP/image; experts per patch: {per_patch or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
