"""Ask a trained model about images: ``python -m pce_dist.predict MODEL IMAGE [IMAGE ...]``.

    python -m pce_dist.predict MODEL IMAGE [IMAGE ...] [--top-k 3] [--routing-png OUT.png]
                               [--tracking-uri URI] [--json]

``MODEL`` is a ``pce_dist.export`` file (``.safetensors`` / ``.pt``) or an MLflow model
(``runs:/<run id>/model``, ``models:/<name>/<version>``, or its local directory); an MLflow
model is read from the safetensors copy logged beside it, so nothing is unpickled.

Each image (PNG, JPEG, anything Pillow reads; any size) is prepared as the run's data
was: converted to the model's channels (grayscale or RGB), resized shorter side first and
centre-cropped to the model's input size when it differs (``data_prep``'s ImageFolder
rule), and normalised with the run's ``data.mean`` / ``data.std`` (``pce_dist.data``).

Printed per image: the top-k classes with probabilities, and for each PCE layer the patch
grid as the top-weight expert of every patch -- which expert looked at which region.
``--routing-png`` draws the same as a picture (``pce_dist.plots.routing_maps``: one row per
image, each layer's grid coloured by expert). ``--json`` prints it all as one object.

Exit status 2 with ``error: ...`` naming the file for an unreadable model or image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import plots
from .data import normalize
from .export import Exported, read_model


@dataclasses.dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]]  # (class index, class name, probability), best first
    experts: list[list[list[int]]]  # per PCE layer: the [grid_h][grid_w] top-weight expert of each patch


def load_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """uint8 ``C x size x size``, prepared as ``data_prep`` prepares an ImageFolder; ValueError names the file."""
    from data_prep.imagefolder import resize_center_crop

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read the image: {exc}") from None
    if (im.width, im.height) != (size, size):
        im = resize_center_crop(im, size)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def predict(exported: Exported, images: list[str], top_k: int = 3) -> tuple[list[Prediction], torch.Tensor, list]:
    """Predictions for ``images``; also the model inputs and per layer ``(weights_NE, grid_h, grid_w)``."""
    model, cfg = exported.model, exported.model.cfg
    data = exported.config["data"]
    raw_BCHW = np.stack([load_image(p, cfg.in_channels, cfg.image_size) for p in images])
    x_BCHW = torch.from_numpy(normalize(raw_BCHW, list(data["mean"]), list(data["std"])))
    with torch.no_grad():
        out = model(x_BCHW)
    probs_BK = out.logits_BK.float().softmax(dim=1)
    names = exported.class_names or [str(k) for k in range(cfg.num_classes)]
    k = min(top_k, cfg.num_classes)
    top_p, top_i = probs_BK.topk(k, dim=1)
    layers = [(route.weights_NE, layer.extractor.grid_h, layer.extractor.grid_w)
              for route, layer in zip(out.routes, model.pce_layers())]
    experts_per_layer = [w.argmax(1).reshape(len(images), gh, gw).tolist() for w, gh, gw in layers]
    result = [Prediction(image=str(path),
                         top=[(int(i), names[int(i)], float(p)) for p, i in zip(top_p[b], top_i[b])],
                         experts=[grid[b] for grid in experts_per_layer])
              for b, path in enumerate(images)]
    return result, x_BCHW, layers


def _print(pred: Prediction) -> None:
    best = ", ".join(f"{name} {p:.3f}" for _, name, p in pred.top)
    print(f"{pred.image}: {best}")
    for layer, grid in enumerate(pred.experts):
        rows = " / ".join(" ".join(str(e) for e in row) for row in grid)
        print(f"  layer {layer} experts ({len(grid)}x{len(grid[0])} patches, row by row): {rows}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="exported file, or MLflow model URI (runs:/ID/model, models:/NAME/VERSION)")
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--routing-png", default=None, help="write the images with each layer's patch grid "
                                                        "coloured by expert")
    ap.add_argument("--tracking-uri", default=None, help="store of a runs:/ or models:/ URI "
                                                         "(default: MLFLOW_TRACKING_URI)")
    ap.add_argument("--json", action="store_true", help="print the predictions as one JSON object")
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        exported = read_model(args.model, args.tracking_uri)
        if args.routing_png and not exported.model.pce_layers():
            raise ValueError(f"{args.model}: a dense model has no routing to draw (--routing-png)")
        preds, x_BCHW, layers = predict(exported, args.images, args.top_k)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.routing_png:
        plots.routing_maps(x_BCHW, [(w.float(), gh, gw) for w, gh, gw in layers], args.routing_png,
                           class_names=exported.class_names, predictions=[p.top[0][0] for p in preds],
                           input_pad=exported.model.cfg.input_pad)
    if args.json:
        print(json.dumps({"model": args.model, "predictions": [
            {"image": p.image, "top": [{"index": i, "class": n, "probability": q} for i, n, q in p.top],
             "experts": p.experts} for p in preds], "routing_png": args.routing_png}, indent=1))
    else:
        for pred in preds:
            _print(pred)
        if args.routing_png:
            print(f"routing picture: {args.routing_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
