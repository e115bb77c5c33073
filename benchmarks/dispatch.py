"""One PCE layer forward+backward: sparse dispatch vs the dense reference vs a dense block.

Variants, measured interleaved in one process (so machine noise hits all alike):
  * sparse     -- PCELayer with the LocalDispatcher (only selected experts compute);
  * reference  -- the same layer with DenseReferenceDispatcher (every expert on every patch);
  * dense      -- equal active FLOPs: the same router/projection forward, plus ONE expert
                  block over the whole feature map and the same conv1x1.

The sparse layer computes ``k`` expert applications per patch on average (k >= 1: the
top-1 always, more when the adaptive threshold admits them), so its active FLOPs are k
times the dense block's; the table prints k and the ratio per active FLOP as well.

    python benchmarks/dispatch.py                 # realistic size (64 ch, 32x32, batch 64)
    python benchmarks/dispatch.py --small --json  # CI size, one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pce_dist.keyinit import kmeans  # noqa: E402
from pce_dist.model import ConvExpert, DenseReferenceDispatcher, ExpertSpec, PCELayer  # noqa: E402


class DenseBlock(nn.Module):
    """Router forward (its cost, not its result) + one expert over the whole map + conv1x1."""

    def __init__(self, layer: PCELayer, channels: int, out_channels: int) -> None:
        super().__init__()
        self.layer = layer  # shares extractor and router with the sparse variant
        self.block = ConvExpert(channels + 4, out_channels, norm="batch")
        self.out_proj = nn.Conv2d(out_channels, out_channels, 1)
        from pce_dist.model import PatchExtractor
        self.full = PatchExtractor(layer.extractor.height, layer.extractor.height)

    def forward(self, x_BCHW):
        patches = self.layer.extractor(x_BCHW)
        B, P, C, n, _ = patches.shape
        routes = self.layer.router(patches.reshape(B * P, C, n, n))
        y = self.out_proj(self.block(self.full(x_BCHW)[:, 0]))
        return y, routes


def fwd_bwd(module, x):
    y, routes = module(x)
    loss = y.float().square().mean() + routes.weights_NE.sum()
    loss.backward()
    module.zero_grad(set_to_none=True)


def bench(num_experts: int, *, batch: int, channels: int, size: int, patch: int, repeats: int,
          iters: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    layer = PCELayer(channels, channels, patch_size=patch, map_size=size, num_experts=num_experts,
                     expert=ExpertSpec(norm="batch"))
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():  # balanced, realistic routing: k-means keys on this input
        emb = layer.router.embed(layer.extractor(x).flatten(0, 1))
        layer.router.set_keys(torch.from_numpy(kmeans(emb.numpy(), num_experts, seed=seed).centroids_KD))
        k_avg = layer(x)[1].selected_NE.sum(1).float().mean().item()
    reference = PCELayer(channels, channels, patch_size=patch, map_size=size, num_experts=num_experts,
                         expert=ExpertSpec(norm="batch"))
    reference.load_state_dict(layer.state_dict())
    reference.dispatcher = DenseReferenceDispatcher()
    dense = DenseBlock(layer, channels, channels)
    variants = {"sparse": layer, "reference": reference, "dense": dense}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for module in variants.values():  # warm-up (allocator, oneDNN primitive caches)
        fwd_bwd(module, x)
    for _ in range(repeats):
        for name, module in variants.items():
            n = 1 if name == "reference" else iters
            start = time.perf_counter()
            for _ in range(n):
                fwd_bwd(module, x)
            times[name].append((time.perf_counter() - start) / n)

    def summary(values):
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return {"median_s": statistics.median(values), "p25_s": q[0], "p75_s": q[2]}

    def ratio(a, b):
        rs = [x / y for x, y in zip(times[a], times[b])]
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}

    return {
        "num_experts": num_experts, "batch": batch, "channels": channels, "size": size, "patch": patch,
        "experts_per_patch": k_avg,
        "times": {name: summary(v) for name, v in times.items()},
        "sparse_over_dense": ratio("sparse", "dense"),
        "sparse_over_dense_per_active_flop": statistics.median(
            [s / d / k_avg for s, d in zip(times["sparse"], times["dense"])]),
        "reference_over_sparse": ratio("reference", "sparse"),
        "expected_reference_over_sparse": num_experts / k_avg,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny sizes for CI (seconds)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.channels, args.size, args.patch, args.repeats, args.iters = 8, 16, 16, 4, 3, 1
    results = {"torch_threads": torch.get_num_threads(), "results": [
        bench(e, batch=args.batch, channels=args.channels, size=args.size, patch=args.patch,
              repeats=args.repeats, iters=args.iters) for e in args.experts]}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"PCE layer fwd+bwd, batch {args.batch}, {args.channels} ch, {args.size}x{args.size}, "
              f"patch {args.patch}, {torch.get_num_threads()} threads; ratios: median [min, max] over repeats")
        print("| E | experts/patch | sparse ms | dense ms | reference ms | sparse/dense | per active FLOP "
              "| reference/sparse | E/k |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results["results"]:
            t, sd, rs = r["times"], r["sparse_over_dense"], r["reference_over_sparse"]
            print(f"| {r['num_experts']} | {r['experts_per_patch']:.2f} | {1e3 * t['sparse']['median_s']:.1f} "
                  f"| {1e3 * t['dense']['median_s']:.1f} | {1e3 * t['reference']['median_s']:.1f} "
                  f"| {sd['median']:.2f} [{sd['min']:.2f}, {sd['max']:.2f}] "
                  f"| {r['sparse_over_dense_per_active_flop']:.2f} "
                  f"| {rs['median']:.2f} [{rs['min']:.2f}, {rs['max']:.2f}] "
                  f"| {r['expected_reference_over_sparse']:.2f} |")
    return results


if __name__ == "__main__":
    main()
