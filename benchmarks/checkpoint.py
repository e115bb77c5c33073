"""Checkpoint cost for a run config, on one process: the training stall per save
(synchronous vs asynchronous), and save / load time and size by layout.

    python benchmarks/checkpoint.py [--config configs/digits.yaml] [--steps 60] [--every 5]
                                    [--loops 5] [--repeats 5] [--json]

Stall: the same training loop (forward, backward, optimizer step on a fixed batch) runs
``--steps`` steps without saving, then saving every ``--every`` steps with
``checkpoint.async_save=false`` and ``=true``, ``--loops`` times each, the three modes
interleaved. The stall per save is the median loop's extra wall time over the median loop
without saves, divided by the number of saves (the async loop ends with ``wait``, so a
write still in flight at the end is counted; on a machine with few cores the writer thread
competes with training for them, and that counts too). Also printed: how long the ``save``
call itself blocks the step (median).

Layouts: ZeRO 0 / 1 / 2 in fp32 (bf16 has no DeepSpeed CPU path); for each, one optimizer
step, then ``save`` + ``wait`` and ``load`` timed over ``--repeats`` (median, range), and
the checkpoint's size.
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
from pce_dist.state import TrainState  # noqa: E402
from pce_dist.train import build_model_for  # noqa: E402


def _build(config: str, tmp: str, overrides: list[str]):
    cfg = load_config(REPO / config, [f"output_dir={tmp}", "checkpoint.keep_last=2"] + overrides)
    env = DistEnv.from_environ(cfg.dist, environ={}).init()
    env.ensure_process_group()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=1000)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.data.batch_size, m.in_channels, m.image_size, m.image_size, generator=g)
    y = torch.randint(0, m.num_classes, (cfg.data.batch_size,), generator=g)

    def step() -> None:
        engine.backward(pce_loss(engine(x), y, m).total)
        engine.step()

    return cfg, env, model, engine, step


def _loop(config: str, steps: int, every: int, mode: str) -> dict:
    """Wall time of ``steps`` training steps; ``mode``: "none", "sync" or "async" saves."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, env, model, engine, step = _build(config, tmp, [f"checkpoint.async_save={str(mode == 'async').lower()}"])
        ckpt = Checkpointer(cfg, env, Path(tmp))
        state = TrainState()
        for _ in range(3):  # warm-up: allocator, first-call costs
            step()
        blocked = []
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if mode != "none" and i % every == 0:
                state.global_step = i
                t0 = time.perf_counter()
                ckpt.save(model, engine, state)
                blocked.append(time.perf_counter() - t0)
        ckpt.wait()
        total = time.perf_counter() - start
    return {"total_s": total, "saves": len(blocked), "save_call_s": statistics.median(blocked) if blocked else 0.0}


def _layout(config: str, zero_stage: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, env, model, engine, step = _build(config, tmp, [f"dist.zero_stage={zero_stage}", "dist.precision=fp32",
                                                             "checkpoint.async_save=false"])
        step()
        ckpt = Checkpointer(cfg, env, Path(tmp))
        state = TrainState()
        saves, loads = [], []
        for i in range(repeats):
            state.global_step = i + 1
            start = time.perf_counter()
            path = ckpt.save(model, engine, state)
            ckpt.wait()
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.load(path, model, engine)
            loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
        files = sorted(f.name for f in path.iterdir())
    return {"zero_stage": zero_stage, "bytes": size, "files": files,
            "save_s": {"median": statistics.median(saves), "min": min(saves), "max": max(saves)},
            "load_s": {"median": statistics.median(loads), "min": min(loads), "max": max(loads)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    runs = {mode: [] for mode in ("none", "sync", "async")}
    for _ in range(args.loops):
        for mode in runs:
            runs[mode].append(_loop(args.config, args.steps, args.every, mode))
    loops = {mode: {"total_s": statistics.median(r["total_s"] for r in rs), "saves": rs[0]["saves"],
                    "save_call_s": statistics.median(r["save_call_s"] for r in rs),
                    "total_s_range": [min(r["total_s"] for r in rs), max(r["total_s"] for r in rs)]}
             for mode, rs in runs.items()}
    base = loops["none"]["total_s"]
    stall = {mode: (loops[mode]["total_s"] - base) / loops[mode]["saves"] for mode in ("sync", "async")}
    layouts = [_layout(args.config, z, args.repeats) for z in (0, 1, 2)]
    result = {"config": args.config, "steps": args.steps, "every": args.every, "loops": loops,
              "stall_per_save_s": stall, "layouts": layouts,
              "async_over_sync_stall": stall["async"] / stall["sync"] if stall["sync"] > 0 else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    lo, hi = loops["none"]["total_s_range"]
    print(f"{args.config}: {args.steps} steps, a save every {args.every}, median of {args.loops} loops: "
          f"without saves {base:.2f} s [{lo:.2f}..{hi:.2f}]")
    for mode in ("sync", "async"):
        lp = loops[mode]
        lo, hi = lp["total_s_range"]
        print(f"  {mode:5s}: loop {lp['total_s']:.2f} s [{lo:.2f}..{hi:.2f}], stall per save {1e3 * stall[mode]:.0f} ms, "
              f"save() blocks the step {1e3 * lp['save_call_s']:.1f} ms (median)")
    if result["async_over_sync_stall"] is not None:
        print(f"  async / sync stall per save: {result['async_over_sync_stall']:.2f}")
    for lay in layouts:
        print(f"  ZeRO {lay['zero_stage']}: {lay['bytes'] / 1e6:.2f} MB in {len(lay['files'])} files, save "
              f"{1e3 * lay['save_s']['median']:.0f} ms [{1e3 * lay['save_s']['min']:.0f}.."
              f"{1e3 * lay['save_s']['max']:.0f}], load {1e3 * lay['load_s']['median']:.0f} ms "
              f"[{1e3 * lay['load_s']['min']:.0f}..{1e3 * lay['load_s']['max']:.0f}]")
    return result


if __name__ == "__main__":
    main()
