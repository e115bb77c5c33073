"""An 8-rank expert-parallel rehearsal on this box: measured all-to-all bytes vs the model's.

    python benchmarks/rehearsal.py [--small] [--world 8] [--ep 2 4 8] [--steps 4] [--json]

For each ``dist.ep_size`` (world 8 each time: 4, 2 and 1 EP groups), 8 gloo processes on
loopback (``tests/distributed/multiproc.spawn``: a failing rank fails the run, a global
deadline kills a hang; every collective runs under ``dist.timeout_s``) train a tiny PCE
model -- 2 layers, 8 experts each, placed by ``parallelize_experts`` exactly as the trainer
places them -- for a few SGD steps (forward, backward, gradient all-reduce over the data-
and expert-data-parallel groups, as DeepSpeed does it). After every step each rank reads what
its dispatcher handed to ``all_to_all_single`` for other ranks
(``pce_dist.distributed.expert_parallel.traffic_stats``) and its routing (``selected_NE``
per layer).

The prediction uses the routing alone -- pairs whose expert lives on another rank of the EP
group, received pairs from the group's other ranks, times the bytes of a row derived from
the *config* (``scaling_model.layer_geometry``: ``C_in + 4`` channels out, ``C_out`` back,
``n x n`` fp32 pixels) plus the E-counts exchange (``scaling_model.rank_a2a_bytes``) -- and
is compared with the measurement per rank and step (``exact``) and in total (``ratio``).

On 2 CPU cores 8 ranks time-share: the step times are printed for completeness and say
nothing about speed on real links. What this measures is bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # scaling_model, however this file was loaded (run_all loads by path)
    sys.path.append(str(HERE))
FIELDS = ("dispatch_bytes", "return_bytes", "backward_bytes", "routed_bytes")
DTYPE_BYTES = 4  # fp32 on CPU / gloo


def model_overrides(num_experts: int, ep_size: int) -> list[str]:
    """The tiny model: 8x8 inputs, 2 PCE layers (8 ch on four 4x4 patches, then 12 ch on four
    2x2 patches of the downsampled map), centred router embeddings at a low temperature (see
    ``_routed_model``). GroupNorm: no norm depends on how many rows an expert received."""
    return [f"model.num_experts={num_experts}", "model.image_size=8", "model.stem_channels=6",
            "model.channels=[8,12]", "model.patch_sizes=[4,2]", "model.downsample=[false,true]",
            "model.num_classes=4", "model.temperature=0.02", "model.router_center=true",
            "model.expert_norm=group", "model.stem_norm=group", "model.expert_dropout=0.0",
            f"dist.ep_size={ep_size}", "dist.timeout_s=30"]


def _routed_model(cfg, seed: int):
    """The model with routing state as key initialisation would leave it, identical on every rank.

    At random initialisation every SPP embedding shares one large component and every patch
    takes one expert, the same few for all. So, as key init does: each router's centre is the
    mean embedding of a calibration batch (layer by layer: a layer's input depends on the routing
    before it); and key ``e + E/2`` is a perturbed copy of key ``e``, so that some patches pick
    two experts -- on different EP ranks for every ``ep_size`` -- and pairs cross ranks both ways.
    """
    import torch
    import torch.nn.functional as F

    from pce_dist.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model).train()
    g = torch.Generator().manual_seed(seed + 1)
    x_BCHW = torch.randn(64, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=g)
    with torch.no_grad():
        h_BCHW = model.stem(x_BCHW)
        for down, layer in zip(model.downsample, model.layers):
            h_BCHW = down(h_BCHW)
            router = layer.router
            E = router.num_experts
            router.keys[E // 2:] = F.normalize(router.keys[:E // 2] + 0.3 * torch.randn(E // 2, router.embed_dim,
                                                                                       generator=g), dim=1)
            patches_BPCnn = layer.extractor(h_BCHW)
            patches_NCnn = patches_BPCnn.flatten(0, 1)[:, :layer.router_channels]
            router.set_center(router.raw_embed(patches_NCnn).mean(0))
            h_BCHW, _ = layer(h_BCHW)
    return model


def _worker(rank: int, world_size: int, num_experts: int, ep_sizes: list[int], steps: int, batch: int,
            seed: int) -> dict:
    """One rank: for each ``ep_size``, ``steps`` training steps; per step its traffic, routing and
    wall time. One process group for every setting: each ``DistEnv`` builds its own EP/EDP groups."""
    import torch
    import torch.nn.functional as F

    from pce_dist.config import load_config
    from pce_dist.distributed import DistEnv
    from pce_dist.distributed.expert_parallel import parallelize_experts, traffic_stats
    from pce_dist.model.net import is_expert_name

    out = {}
    for ep_size in ep_sizes:
        cfg = load_config(None, model_overrides(num_experts, ep_size))
        env = DistEnv.from_environ(cfg.dist).init()
        model = parallelize_experts(_routed_model(cfg, seed), env)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        groups = {"dp": [p for n, p in model.named_parameters() if not is_expert_name(n)],
                  "edp": [p for n, p in model.named_parameters() if is_expert_name(n)]}
        g = torch.Generator().manual_seed(seed * 1000 + rank)  # each rank its own data
        records = []
        for _ in range(steps):
            x = torch.randn(batch, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=g)
            y = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
            env.barrier()  # start together: a step's time, not the wait for the last rank to arrive
            start = time.perf_counter()
            routes_out = model(x)
            opt.zero_grad()
            F.cross_entropy(routes_out.logits_BK, y).backward()
            for group, params in groups.items():  # DeepSpeed's reduction: one flat all-reduce per group
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in params])
                env.all_reduce(flat, group).div_(world_size)
                for p, g_flat in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = g_flat.view_as(p).clone()
            opt.step()
            records.append({"step_s": time.perf_counter() - start, "traffic": traffic_stats(model),
                            "selected": [r.selected_NE.clone() for r in routes_out.routes]})
        out[ep_size] = {"experts": [sorted(int(k) for k in layer.experts.keys()) for layer in model.pce_layers()],
                        "steps": records}
    return out


def predict(selected, layers, num_experts: int, ep_size: int, dtype_bytes: int = DTYPE_BYTES) -> list[dict]:
    """Per rank, the bytes its all-to-alls must hand to other ranks in one step, from the routing.

    Args:
        selected: ``selected[rank][layer]``: the ``[N, E]`` routing selection of that rank.
        layers: ``scaling_model.layer_geometry`` of the model.
    """
    import scaling_model

    world, per = len(selected), num_experts // ep_size
    out = []
    for rank in range(world):
        first = rank - rank % ep_size  # EP groups are consecutive blocks of ep_size ranks
        hosted = slice((rank % ep_size) * per, (rank % ep_size + 1) * per)
        total = dict.fromkeys(FIELDS, 0)
        for layer_idx, layer in enumerate(layers):
            sel_NE = selected[rank][layer_idx]
            sent = int(sel_NE.sum()) - int(sel_NE[:, hosted].sum())
            received = sum(int(selected[s][layer_idx][:, hosted].sum())
                           for s in range(first, first + ep_size) if s != rank)
            for key, value in scaling_model.rank_a2a_bytes(sent, received, layer, dtype_bytes,
                                                           num_experts, ep_size).items():
                total[key] += value
        out.append(total)
    return out


# Imported once in the fork server instead of once per rank: DeepSpeed alone (pulled in by
# the MoE marker parallelize_experts attaches) takes ~6 CPU-seconds to import, 8 ranks on 2
# cores would spend half a minute on it.
_PRELOAD = ["torch", "torch.distributed", "deepspeed.moe.layer", "pce_dist.distributed.expert_parallel",
            "pce_dist.model", "multiproc", "rehearsal", "scaling_model"]


def _spawn_fn():
    """``multiproc.spawn`` and ``_worker`` as the ranks can unpickle it: from the importable
    module ``rehearsal`` (not ``__main__`` or a module loaded from its path, which the fork
    server cannot import). Starts the fork server with ``_PRELOAD`` unless one is running
    already (then the ranks import what they need themselves: slower, same result)."""
    import multiprocessing
    from multiprocessing import forkserver

    for path in (HERE, REPO / "tests" / "distributed"):
        if str(path) not in sys.path:  # last: benchmarks/data.py & co. must shadow nothing
            sys.path.append(str(path))
    import rehearsal
    from multiproc import spawn

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    forkserver.ensure_running()
    return spawn, rehearsal._worker


def rehearse(world: int, ep_sizes: list[int], num_experts: int = 8, steps: int = 3, batch: int = 8, seed: int = 0,
             timeout_s: float = 150.0) -> list[dict]:
    """Run every ``ep_size`` on ``world`` local ranks (one spawn); per setting, measured vs
    predicted bytes and step times."""
    spawn, worker = _spawn_fn()
    import scaling_model
    from pce_dist.config import load_config

    start = time.perf_counter()
    results = spawn(worker, world, args=(num_experts, list(ep_sizes), steps, batch, seed), timeout_s=timeout_s)
    wall_s = time.perf_counter() - start
    settings = []
    for ep in ep_sizes:
        layers = scaling_model.layer_geometry(load_config(None, model_overrides(num_experts, ep)).model)
        compared = _compare([r[ep] for r in results], layers, world, ep, num_experts, steps, batch)
        settings.append({**compared, "spawn_wall_s": wall_s})
    return settings


def _compare(results: list[dict], layers, world: int, ep_size: int, num_experts: int, steps: int, batch: int) -> dict:
    import scaling_model

    measured, predicted, mismatches = dict.fromkeys(FIELDS, 0), dict.fromkeys(FIELDS, 0), []
    for step in range(steps):
        expected = predict([r["steps"][step]["selected"] for r in results], layers, num_experts, ep_size)
        for rank, (res, exp) in enumerate(zip(results, expected)):
            got = res["steps"][step]["traffic"]
            if got != exp:
                mismatches.append({"step": step, "rank": rank, "measured": got, "predicted": exp})
            for key in FIELDS:
                measured[key] += got[key]
                predicted[key] += exp[key]
    wire = ("dispatch_bytes", "return_bytes", "backward_bytes")
    meas_total, pred_total = sum(measured[k] for k in wire), sum(predicted[k] for k in wire)
    payload = pred_total - steps * world * len(layers) * scaling_model.counts_exchange_bytes(num_experts, ep_size)
    # timing: per step the slowest rank, the first step (warm-up) left out when there are more
    slowest = [max(r["steps"][s]["step_s"] for r in results) for s in range(steps)]
    sel = [r["steps"][s]["selected"][li] for r in results for s in range(steps) for li in range(len(layers))]
    # what scaling_model.pce_layer_loads assumes at scale: destinations uniform over the EP group
    uniform = sum(int(r["steps"][s]["selected"][li].sum()) * (ep_size - 1) / ep_size * 2
                  * (layer.dispatch_row_bytes(DTYPE_BYTES) + layer.return_row_bytes(DTYPE_BYTES))
                  for r in results for s in range(steps) for li, layer in enumerate(layers))
    uniform += (pred_total - payload)
    return {"world": world, "ep_size": ep_size, "num_experts": num_experts, "steps": steps, "batch_per_rank": batch,
            "experts_hosted": [r["experts"][0] for r in results],
            "experts_per_patch": sum(int(t.sum()) for t in sel) / sum(t.shape[0] for t in sel),
            "measured": measured, "predicted": predicted,
            "measured_wire_bytes": meas_total, "predicted_wire_bytes": pred_total,
            "ratio": meas_total / pred_total if pred_total else float("nan"),
            "ratio_to_payload_only": meas_total / payload if payload else float("nan"),
            "uniform_destinations_wire_bytes": uniform, "ratio_to_uniform_destinations": meas_total / uniform,
            "exact": not mismatches, "mismatches": mismatches[:3],
            "step_ms_median": 1e3 * statistics.median(slowest[1:] if steps > 1 else slowest)}


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 -> 2 while the ranks run (they and the fork server inherit it): what
    they print -- DeepSpeed's import-time accelerator warning -- must not mix into ``--json``."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CI size: 2 steps of 4 images per rank")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (a multiple of every --ep)")
    ap.add_argument("--steps", type=int, default=None, help="default 4 (--small: 2)")
    ap.add_argument("--batch", type=int, default=None, help="images per rank and step (default 16, --small: 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.small else 4)
    batch = args.batch or (4 if args.small else 16)
    start = time.perf_counter()
    with _stdout_to_stderr() if args.json else contextlib.nullcontext():
        settings = rehearse(args.world, args.ep, args.experts, steps, batch)
    result = {"world": args.world, "settings": settings, "all_exact": all(s["exact"] for s in settings),
              "wall_s": time.perf_counter() - start}
    if args.json:
        print(json.dumps({**result, "settings": [{k: v for k, v in s.items() if k != "mismatches" or v}
                                                for s in settings]}, indent=2))
    else:
        print(f"{args.world} gloo ranks, {args.experts} experts per layer, 2 PCE layers, {steps} steps of "
              f"{batch} images per rank, fp32; bytes handed to all_to_all_single for other ranks, all ranks and steps")
        print("| ep_size | EP groups | experts/patch | dispatch B | return B | backward B | measured total B "
              "| predicted total B | measured / predicted | measured / payload only | exact per rank and step "
              "| measured / uniform-destination estimate | step ms (2 cores) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in settings:
            m = s["measured"]
            print(f"| {s['ep_size']} | {s['world'] // s['ep_size']} | {s['experts_per_patch']:.2f} "
                  f"| {m['dispatch_bytes']:,} | {m['return_bytes']:,} | {m['backward_bytes']:,} "
                  f"| {s['measured_wire_bytes']:,} | {s['predicted_wire_bytes']:,} | {s['ratio']:.6f} "
                  f"| {s['ratio_to_payload_only']:.6f} | {'yes' if s['exact'] else 'NO'} "
                  f"| {s['ratio_to_uniform_destinations']:.3f} | {s['step_ms_median']:.1f} |")
        print(f"wall {result['wall_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
