"""Export a sharded checkpoint to one plain PyTorch file that ``PCENet`` loads anywhere.

    python -m pce_dist.export CHECKPOINT_DIR OUT.pt

``CHECKPOINT_DIR`` is a ``step_*`` directory, or a run's ``checkpoints`` directory / its
``latest`` file (the newest complete checkpoint is used). The output holds
``{"config": <resolved run config dict>, "model": <state dict with every expert>}``;
load it with ``pce_dist.export.load_exported(path)`` -- one process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .checkpoint import full_model_state, resolve
from .config import config_from_dict
from .model import PCENet, build_model


def export(ckpt: str | Path, out: str | Path) -> Path:
    state, config = full_model_state(resolve(ckpt))
    model = build_model(config_from_dict(config).model)
    model.load_state_dict(state)  # strict: proves the file is complete before writing it
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    torch.save({"config": config, "model": model.state_dict()}, tmp)
    os.replace(tmp, out)
    return out


def load_exported(path: str | Path) -> tuple[PCENet, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = config_from_dict(blob["config"])
    model = build_model(cfg.model)
    model.load_state_dict(blob["model"])
    return model.eval(), blob["config"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
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
