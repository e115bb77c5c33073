"""Export a sharded checkpoint to one file that ``PCENet`` loads anywhere.

    python -m pce_dist.export CHECKPOINT_DIR OUT.safetensors   # or OUT.pt
    python -m pce_dist.export --mlflow RUN_DIR                 # also log it as the run's MLflow model

``CHECKPOINT_DIR`` is a ``step_*`` directory, or a run's ``checkpoints`` directory / its
``latest`` file (the newest complete checkpoint is used; a damaged one is an error naming
the file -- export never silently picks an older model). The format follows the suffix:

* ``.safetensors``: every tensor, with the resolved (redacted) run config as JSON in the
  metadata under ``pce_dist.config``. Loading it cannot run code, in any tool.
* ``.pt``: ``torch.save({"config": <config dict>, "model": <state dict>})`` -- plain tensors
  and containers only, so ``torch.load(..., weights_only=True)`` reads it.

Both carry the class names (from the training run, else the data manifest) so that
``pce_dist.predict`` can name what it sees.

Load either with ``pce_dist.export.load_exported(path)`` -- one process, no DeepSpeed. It
never unpickles anything but tensors and plain containers: a ``.pt`` that needs more is
refused naming the file.

``--mlflow RUN_DIR`` exports the run's newest checkpoint to ``RUN_DIR/model.safetensors``
and logs it into the run's MLflow run (``pce_dist.tracking.model``) -- what a finished run
does by itself (``tracking.log_model``), for runs whose store was down at the end, or that
were stopped. The store is the run's (``MLFLOW_TRACKING_URI`` wins, as in training: set it
when the config's URI had a password, which ``config.yaml`` does not keep).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import full_model_state, load_plain, read_meta, resolve
from .config import config_from_dict
from .model import PCENet, build_model
from .redact import redact_obj

SUFFIXES = (".safetensors", ".pt")
_CONFIG_KEY = "pce_dist.config"  # safetensors metadata key holding the run config as JSON
_CLASSES_KEY = "pce_dist.class_names"  # ... and the class names (JSON list), when known
RUN_EXPORT = "model.safetensors"  # where a run's own export goes: RUN_DIR/model.safetensors


@dataclasses.dataclass
class Exported:
    """An exported model, read back: the network in eval mode, its run config, its class names."""

    model: PCENet
    config: dict
    class_names: list[str] | None  # None: the export did not know them (predict shows indices)


def _manifest_class_names(config: dict) -> list[str] | None:
    """The class names of the run's data manifest, or None when it cannot be read here."""
    from .data import read_manifest

    root = config.get("data", {}).get("root", "")
    num_classes = config.get("model", {}).get("num_classes")
    try:
        names = list(read_manifest(root).class_names)
    except (OSError, ValueError) as exc:
        print(f"note: class names unknown ({root}/manifest.json: {exc}); predict will show class indices",
              file=sys.stderr)
        return None
    if len(names) != num_classes:  # data.root now holds another dataset (a relative path, another cwd)
        print(f"note: class names unknown ({root}/manifest.json lists {len(names)} classes, the model has "
              f"{num_classes}); predict will show class indices", file=sys.stderr)
        return None
    return names


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: the export format follows the suffix; use one of {', '.join(SUFFIXES)}")


def export(ckpt: str | Path, out: str | Path, class_names: list[str] | None = None) -> Path:
    """Write the checkpoint's model to ``out``; ``class_names`` default to the data manifest's."""
    out = Path(out)
    _check_suffix(out)
    state, config = full_model_state(resolve(ckpt))
    config = redact_obj(config)  # checkpoints of format 1 stored the live config
    if class_names is None:
        class_names = _manifest_class_names(config)
    model = build_model(config_from_dict(config).model)
    model.load_state_dict(state)  # strict: proves the file is complete before writing it
    return save_export(model, config, out, class_names)


def save_export(model: PCENet, config: dict, out: str | Path, class_names: list[str] | None = None) -> Path:
    """Write ``model`` with its (redacted) run ``config`` dict to ``out``, atomically; format by suffix."""
    out = Path(out)
    _check_suffix(out)
    # safetensors refuses tensors that share storage; a clone per tensor is cheap at this size
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {_CONFIG_KEY: json.dumps(config)}
        if class_names is not None:
            metadata[_CLASSES_KEY] = json.dumps(list(class_names))
        save_file(tensors, str(tmp), metadata=metadata)
    else:
        torch.save({"config": config, "model": tensors, "class_names": class_names}, tmp)
    os.replace(tmp, out)
    return out


def _json_metadata(path: Path, metadata: dict, key: str) -> Any:
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its '{key}' metadata is not JSON ({exc})") from None


def _read_exported(path: Path) -> tuple[dict, dict, Any]:
    """(state dict, config dict, class names) from either format; ValueError naming ``path`` otherwise."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        config = _json_metadata(path, metadata, _CONFIG_KEY)
        if config is None:
            raise ValueError(f"{path}: has no '{_CONFIG_KEY}' metadata; it was not written by pce_dist.export")
        return state, config, _json_metadata(path, metadata, _CLASSES_KEY)
    blob = load_plain(path.read_bytes(), path)
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), dict) and isinstance(blob.get("model"), dict)):
        raise ValueError(f"{path}: not a pce_dist export (expected a dict with 'config' and 'model')")
    return blob["model"], blob["config"], blob.get("class_names")


def read_export(path: str | Path) -> Exported:
    """The exported model (eval mode), its run config and class names.

    Raises:
        ValueError: naming ``path`` -- unreadable, not an export, or it holds pickled
            objects other than tensors (refused, never run).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    state, config, class_names = _read_exported(path)
    model = build_model(config_from_dict(config).model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: its tensors do not fit its config ({str(exc).splitlines()[0]})") from None
    num_classes = model.cfg.num_classes
    if class_names is not None and not (isinstance(class_names, list) and len(class_names) == num_classes):
        raise ValueError(f"{path}: its class names are not a list of {num_classes} names")
    return Exported(model.eval(), config, [str(c) for c in class_names] if class_names is not None else None)


def load_exported(path: str | Path) -> tuple[PCENet, dict]:
    """The exported model in eval mode, and its run config dict (``read_export`` without the names)."""
    exported = read_export(path)
    return exported.model, exported.config


def export_run(run_dir: str | Path) -> tuple[Path, dict]:
    """Export a run's newest checkpoint to ``RUN_DIR/model.safetensors``; returns (file, checkpoint meta)."""
    run_dir = Path(run_dir)
    ckpt = resolve(run_dir / "checkpoints")
    return export(ckpt, run_dir / RUN_EXPORT), read_meta(ckpt)


def log_run_model(run_dir: str | Path) -> str:
    """``--mlflow RUN_DIR``: export, then log into the run's MLflow run; returns the model URI."""
    from .tracking import log_exported_model, resolve_tracking_uri

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: not a run directory (no config.yaml)")
    out, meta = export_run(run_dir)
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{run_dir}: its checkpoint names no MLflow run")
    from .config import load_config

    cfg = load_config(str(run_dir / "config.yaml"), [])
    return log_exported_model(out, run_id, resolve_tracking_uri(cfg, run_dir), step=int(meta.get("global_step", 0)),
                              register_as=cfg.tracking.register_as)


def read_model(spec: str, tracking_uri: str | None = None) -> Exported:
    """An exported file, or an MLflow model URI / directory (its safetensors copy): never unpickled code."""
    import tempfile

    from .tracking.model import download_export, is_model_uri

    if not is_model_uri(spec):
        return read_export(spec)
    with tempfile.TemporaryDirectory(prefix="pce_model_") as tmp:  # the tensors are in memory after the read
        return read_export(download_export(spec, tracking_uri, tmp))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a step_* directory, a run's checkpoints/ or its latest file")
    ap.add_argument("out", nargs="?", help="OUT.safetensors or OUT.pt")
    ap.add_argument("--mlflow", metavar="RUN_DIR", default=None,
                    help="export RUN_DIR's newest checkpoint and log it as the run's MLflow model")
    args = ap.parse_args(argv)
    if args.mlflow is not None and (args.checkpoint or args.out):
        ap.error("--mlflow RUN_DIR takes no CHECKPOINT or OUT (it writes RUN_DIR/model.safetensors)")
    if args.mlflow is None and args.out is None:
        ap.error("give CHECKPOINT OUT, or --mlflow RUN_DIR")
    try:
        if args.mlflow is not None:
            uri = log_run_model(args.mlflow)
            print(f"logged {Path(args.mlflow) / RUN_EXPORT} as MLflow model {uri}")
            return 0
        out = export(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

