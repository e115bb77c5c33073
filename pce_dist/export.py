"""Export a sharded checkpoint to one file that ``PCENet`` loads anywhere.

    python -m pce_dist.export CHECKPOINT_DIR OUT.safetensors   # or OUT.pt

``CHECKPOINT_DIR`` is a ``step_*`` directory, or a run's ``checkpoints`` directory / its
``latest`` file (the newest complete checkpoint is used; a damaged one is an error naming
the file -- export never silently picks an older model). The format follows the suffix:

* ``.safetensors``: every tensor, with the resolved (redacted) run config as JSON in the
  metadata under ``pce_dist.config``. Loading it cannot run code, in any tool.
* ``.pt``: ``torch.save({"config": <config dict>, "model": <state dict>})`` -- plain tensors
  and containers only, so ``torch.load(..., weights_only=True)`` reads it.

Load either with ``pce_dist.export.load_exported(path)`` -- one process, no DeepSpeed. It
never unpickles anything but tensors and plain containers: a ``.pt`` that needs more is
refused naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import full_model_state, load_plain, resolve
from .config import config_from_dict
from .model import PCENet, build_model
from .redact import redact_obj

SUFFIXES = (".safetensors", ".pt")
_CONFIG_KEY = "pce_dist.config"  # safetensors metadata key holding the run config as JSON


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: the export format follows the suffix; use one of {', '.join(SUFFIXES)}")


def export(ckpt: str | Path, out: str | Path) -> Path:
    out = Path(out)
    _check_suffix(out)
    state, config = full_model_state(resolve(ckpt))
    config = redact_obj(config)  # checkpoints of format 1 stored the live config
    model = build_model(config_from_dict(config).model)
    model.load_state_dict(state)  # strict: proves the file is complete before writing it
    # safetensors refuses tensors that share storage; a clone per tensor is cheap at this size
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={_CONFIG_KEY: json.dumps(config)})
    else:
        torch.save({"config": config, "model": tensors}, tmp)
    os.replace(tmp, out)
    return out


def _read_exported(path: Path) -> tuple[dict, dict]:
    """(state dict, config dict) from either format; ValueError naming ``path`` otherwise."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                config_json = (f.metadata() or {}).get(_CONFIG_KEY)
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        if config_json is None:
            raise ValueError(f"{path}: has no '{_CONFIG_KEY}' metadata; it was not written by pce_dist.export")
        try:
            return state, json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: its '{_CONFIG_KEY}' metadata is not JSON ({exc})") from None
    blob = load_plain(path.read_bytes(), path)
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), dict) and isinstance(blob.get("model"), dict)):
        raise ValueError(f"{path}: not a pce_dist export (expected a dict with 'config' and 'model')")
    return blob["model"], blob["config"]


def load_exported(path: str | Path) -> tuple[PCENet, dict]:
    """The exported model in eval mode, and its run config dict.

    Raises:
        ValueError: naming ``path`` -- unreadable, not an export, or it holds pickled
            objects other than tensors (refused, never run).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    state, config = _read_exported(path)
    model = build_model(config_from_dict(config).model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: its tensors do not fit its config ({str(exc).splitlines()[0]})") from None
    return model.eval(), config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out", help="OUT.safetensors or OUT.pt")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
