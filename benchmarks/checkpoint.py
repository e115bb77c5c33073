"""Checkpoint size and save / load time for a run config, on one process.

    python benchmarks/checkpoint.py [--config configs/digits.yaml] [--repeats 5] [--json]

Builds the model and DeepSpeed engine of the config (world size 1, fp32), takes one
optimizer step so the optimizer state exists, then times ``Checkpointer.save`` and
``Checkpointer.load`` (median and range over repeats) and reports the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pce_dist.checkpoint import Checkpointer  # noqa: E402
from pce_dist.config import load_config  # noqa: E402
from pce_dist.distributed import DistEnv  # noqa: E402
from pce_dist.engine import build_engine  # noqa: E402
from pce_dist.model import pce_loss  # noqa: E402
from pce_dist.train import build_model_for  # noqa: E402
from pce_dist.state import TrainState  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / args.config, [f"output_dir={tmp}", "checkpoint.keep_last=2"])
        env = DistEnv.from_environ(cfg.dist).init()
        model = build_model_for(cfg, env)
        engine, _ = build_engine(model, cfg, env, total_steps=10)
        m = cfg.model
        x = torch.randn(cfg.data.batch_size, m.in_channels, m.image_size, m.image_size)
        y = torch.randint(0, m.num_classes, (cfg.data.batch_size,))
        engine.backward(pce_loss(engine(x), y, m).total)
        engine.step()
        state = TrainState()
        ckpt = Checkpointer(cfg, env, Path(tmp))
        saves, loads = [], []
        for i in range(args.repeats):
            state.global_step = i + 1
            start = time.perf_counter()
            path = ckpt.save(model, engine, state)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.load(path, model, engine)
            loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
    params = sum(p.numel() for p in model.parameters())
    result = {"config": args.config, "parameters": params, "checkpoint_bytes": size,
              "save_s": {"median": statistics.median(saves), "min": min(saves), "max": max(saves)},
              "load_s": {"median": statistics.median(loads), "min": min(loads), "max": max(loads)}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.config}: {params:,} parameters, checkpoint {size / 1e6:.2f} MB, "
              f"save {1e3 * result['save_s']['median']:.0f} ms [{1e3 * min(saves):.0f}..{1e3 * max(saves):.0f}], "
              f"load {1e3 * result['load_s']['median']:.0f} ms [{1e3 * min(loads):.0f}..{1e3 * max(loads):.0f}]")
    return result


if __name__ == "__main__":
    main()
