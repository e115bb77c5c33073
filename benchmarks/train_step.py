"""Whole training step, PCE vs the dense baseline at (about) equal active FLOPs.

    python benchmarks/train_step.py [--config configs/fashion_mnist.yaml] [--batch 128] [--json] [key=value ...]
    python benchmarks/train_step.py --profile   # where the time goes: top ops of each model

Both models come from the same config (``model.kind=pce`` and ``model.kind=dense``: every
PCE layer replaced by one expert block over the whole map). Each step is forward + loss +
backward + AdamW step on one process; the two are timed interleaved and the table shows
the PCE/dense time ratio (median [min, max]) next to each model's total and active
parameters and forward FLOPs per image (``pce_dist.flops``), so the ratio can be read per
active FLOP as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pce_dist.config import load_config  # noqa: E402
from pce_dist.flops import measure  # noqa: E402
from pce_dist.model import build_model, pce_loss  # noqa: E402


def _profile(step, kinds: list[str], repeats: int) -> dict:
    """Self CPU time per op (ms per step), PCE next to dense, the biggest differences first."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for kind in kinds:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                step(kind)
        per_op[kind] = {e.key: e.self_cpu_time_total / 1e3 / repeats for e in prof.key_averages()}
    total = {k: sum(v.values()) for k, v in per_op.items()}
    names = sorted(set(per_op["pce"]) | set(per_op["dense"]),
                   key=lambda n: -(per_op["pce"].get(n, 0.0) - per_op["dense"].get(n, 0.0)))
    print(f"self CPU ms per step: pce {total['pce']:.1f}, dense {total['dense']:.1f} "
          f"(the profiler's own overhead included)")
    print("| op | pce ms | dense ms | pce - dense |")
    print("|---|---|---|---|")
    for n in names[:20]:
        p, d = per_op["pce"].get(n, 0.0), per_op["dense"].get(n, 0.0)
        print(f"| {n} | {p:.2f} | {d:.2f} | {p - d:+.2f} |")
    return {"self_cpu_ms": per_op, "total_ms": total}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over --repeats steps of each model: ops by self CPU time")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    setups = {}
    for kind in ("pce", "dense"):
        cfg = load_config(repo / args.config, args.overrides + [f"model.kind={kind}"])
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        m = cfg.model
        x = torch.randn(args.batch, m.in_channels, m.image_size, m.image_size)
        y = torch.randint(0, m.num_classes, (args.batch,))
        setups[kind] = (cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-3), x, y, measure(model, x))

    def step(kind):
        cfg, model, opt, x, y, _ = setups[kind]
        loss = pce_loss(model(x), y, cfg.model).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {k: [] for k in setups}
    for kind in setups:  # warm-up
        step(kind)
    if args.profile:
        return _profile(step, list(setups), args.repeats)
    for _ in range(args.repeats):
        for kind in setups:
            start = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - start)
    ratios = [p / d for p, d in zip(times["pce"], times["dense"])]
    flop_ratio = setups["pce"][5].forward_flops_per_image / setups["dense"][5].forward_flops_per_image
    result = {"config": args.config, "batch": args.batch, "threads": torch.get_num_threads(),
              "models": {k: {"step_s": statistics.median(v), "img_per_s": args.batch / statistics.median(v),
                             **setups[k][5].as_dict()} for k, v in times.items()},
              "pce_over_dense_time": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
              "pce_over_dense_flops": flop_ratio,
              "pce_over_dense_time_per_flop": statistics.median(ratios) / flop_ratio}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.config}, batch {args.batch}, {result['threads']} threads, {args.repeats} interleaved repeats")
        print("| model | step ms | img/s | total params | active params | fwd MFLOP/img | experts/patch |")
        print("|---|---|---|---|---|---|---|")
        for k, r in result["models"].items():
            print(f"| {k} | {1e3 * r['step_s']:.0f} | {r['img_per_s']:.0f} | {r['total_params']:,} | "
                  f"{r['active_params']:,.0f} | {r['forward_flops_per_image'] / 1e6:.1f} | "
                  f"{', '.join(f'{e:.2f}' for e in r['experts_per_patch']) or '-'} |")
        t = result["pce_over_dense_time"]
        print(f"PCE/dense step time {t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}] at a FLOP ratio of "
              f"{flop_ratio:.3f} ({result['pce_over_dense_time_per_flop']:.2f} per active FLOP)")
    return result


if __name__ == "__main__":
    main()
