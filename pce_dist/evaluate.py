"""Evaluate an exported model on one process: ``python -m pce_dist.evaluate MODEL``.

    python -m pce_dist.evaluate MODEL.safetensors|MODEL.pt|runs:/ID/model [--data-root DIR] [--split test]
                                [--batch-size N] [--tracking-uri URI] [--json]

Uses the same data pipeline (``pce_dist.data``), the same metric arithmetic
(``pce_dist.evaluation``) and the same metric names (``pce_dist.metrics``) as the
distributed trainer, so the numbers are comparable. Also
prints what one image costs (``pce_dist.flops``: total and active parameters, forward
FLOPs, experts per patch), measured on the split's first batch with the trained routing --
the numbers that put a PCE run and its dense baseline side by side.

The model is read by ``pce_dist.export.read_model``, which unpickles nothing but tensors
(an MLflow model URI is read from the safetensors export logged with it): a file that
needs more is refused and the command exits with status 2 naming it, as it does for a
missing file or data root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from . import evaluation, flops
from . import metrics as names
from .config import config_from_dict
from .export import read_model


@dataclasses.dataclass(frozen=True)
class FileEvaluation:
    prefix: str  # the split's metric prefix (``names.eval_prefix``): "eval" or the split's name
    metrics: dict[str, float]  # the split's metrics and ``cost/*``
    cost: flops.Cost  # what one image costs, on the split's first batch


def evaluate_file(path: str, *, data_root: str | None = None, split: str | None = None,
                  batch_size: int | None = None, tracking_uri: str | None = None) -> FileEvaluation:
    from .data import build_eval_loader

    exported = read_model(path, tracking_uri)
    model, config = exported.model, exported.config
    cfg = config_from_dict(config)
    data_cfg = dataclasses.replace(cfg.data, root=data_root or cfg.data.root,
                                   batch_size=batch_size or cfg.data.batch_size)
    split = split or cfg.data.eval_split
    loader = build_eval_loader(data_cfg, split, rank=0, world_size=1)
    sums = evaluation.accumulate(model, loader, device=torch.device("cpu"), dtype=torch.float32,
                                 num_layers=len(model.routers()), num_experts=cfg.model.num_experts,
                                 num_classes=cfg.model.num_classes, num_patches=model.patches_per_image())
    prefix = names.eval_prefix(split, cfg.data.eval_split)
    metrics = names.eval_metrics(sums, prefix=prefix, split=split, collapse_usage=cfg.model.collapse_usage)
    x_BCHW, _, valid_B = next(iter(loader))
    cost = flops.measure(model, x_BCHW[valid_B.bool()])
    metrics.update(names.cost_metrics(cost))
    return FileEvaluation(prefix=prefix, metrics=metrics, cost=cost)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data-root", default=None, help="shards directory (default: the run's data.root)")
    ap.add_argument("--split", default=None, help="split to evaluate (default: the run's data.eval_split)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--tracking-uri", default=None, help="store of a runs:/ or models:/ URI "
                                                         "(default: MLFLOW_TRACKING_URI)")
    ap.add_argument("--json", action="store_true", help="print every metric as one JSON object")
    args = ap.parse_args(argv)
    try:
        result = evaluate_file(args.model, data_root=args.data_root, split=args.split, batch_size=args.batch_size,
                               tracking_uri=args.tracking_uri)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # a refused or unreadable model, a bad data root
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.metrics, indent=1))
    else:
        metrics, cost = result.metrics, result.cost
        accuracy = metrics[names.split_metric(result.prefix, "accuracy")]
        samples = metrics[names.split_metric(result.prefix, "samples")]
        print(f"{result.prefix} accuracy: {accuracy:.4f} on {int(samples)} samples")
        per_patch = ", ".join(f"{k:.2f}" for k in cost.experts_per_patch)
        print(f"params: {cost.total_params:,} total, {cost.active_params:,.0f} active per image; "
              f"forward {cost.forward_flops_per_image / 1e6:.1f} MFLOP/image; experts per patch: {per_patch or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
