"""The GPU check: everything of the CUDA path that the CPU box cannot measure, in one script.

    python benchmarks/gpu.py [--json] [--config configs/fashion_mnist.yaml]   # on one GPU, < 5 minutes
    python benchmarks/gpu.py --dry-run                                       # CPU, tiny, every code path

Measured, interleaved where two things are compared (noise hits both alike):
  step      whole training step (forward + loss + backward + AdamW), bf16 autocast: PCE dropless,
            PCE capacity, PCE capacity compiled (``torch.compile(fullgraph=True)``), dense eager and
            compiled; ratios PCE / dense at (about) equal active FLOPs;
  layer     the first PCE layer fwd+bwd: dropless, capacity eager, capacity compiled; compiled /
            eager (target >= 1.3 on a GPU);
  syncs     device->host syncs per training step, dropless vs capacity: ``pce_dist.host_syncs``
            (instrumentation, forward + backward) and, on CUDA, CUDA's own detector
            (``torch.cuda.set_sync_debug_mode``) over the whole step including the optimizer;
  kmeans    FAISS k-means (on the GPU when FAISS has one) vs scikit-learn Lloyd with the same
            iterations, on 100k x 168 unit rows, k = 16: time ratio (target >= 20) at the
            objective ratio it reaches (~1 = equal objective).

``--dry-run`` runs all of it on the CPU at toy sizes, with ``backend="aot_eager"`` for the
compiled variants (no kernel generation), in well under a minute: the test suite runs it, so
the script cannot rot while no GPU is lent. Its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pce_dist.config import load_config  # noqa: E402
from pce_dist.host_syncs import HostSyncCounter  # noqa: E402
from pce_dist.model import build_model, pce_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU (dry run): fp32, as the CPU path trains


def _ratio(a: list[float], b: list[float]) -> dict:
    rs = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def _timed(fns: dict, device: torch.device, repeats: int, iters: int) -> dict[str, list[float]]:
    """Per repeat, each function ``iters`` times in turn; seconds per call."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: compilation, cuDNN autotuning, allocator
        fn(), fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / iters)
    return times


class _Model:
    """A model, its optimizer and a batch; ``step()`` is one training step."""

    def __init__(self, cfg_path: Path, overrides: list[str], batch: int, device: torch.device,
                 compile_backend: str | None) -> None:
        self.cfg = load_config(cfg_path, overrides)
        m = self.cfg.model
        torch.manual_seed(0)
        self.net = build_model(m).to(device).train()
        self.forward = torch.compile(self.net, fullgraph=True, backend=compile_backend) if compile_backend \
            else self.net
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, generator=g).to(device)
        self.y = torch.randint(0, m.num_classes, (batch,), generator=g).to(device)
        self.device = device

    def loss(self) -> torch.Tensor:
        with _autocast(self.device):
            return pce_loss(self.forward(self.x), self.y, self.cfg.model).total

    def step(self) -> None:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def bench_step(cfg_path: Path, batch: int, device: torch.device, repeats: int, iters: int, backend: str,
               capacity_factor: float) -> dict:
    cap = ["model.dispatch=capacity", f"model.capacity_factor={capacity_factor}"]
    models = {
        "pce_dropless": _Model(cfg_path, [], batch, device, None),
        "pce_capacity": _Model(cfg_path, cap, batch, device, None),
        "pce_capacity_compiled": _Model(cfg_path, cap, batch, device, backend),
        "dense": _Model(cfg_path, ["model.kind=dense"], batch, device, None),
        "dense_compiled": _Model(cfg_path, ["model.kind=dense"], batch, device, backend),
    }
    times = _timed({k: m.step for k, m in models.items()}, device, repeats, iters)
    return {"batch": batch, "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "pce_dropless_over_dense": _ratio(times["pce_dropless"], times["dense"]),
            "pce_capacity_over_dense": _ratio(times["pce_capacity"], times["dense"]),
            "pce_capacity_compiled_over_dense_compiled": _ratio(times["pce_capacity_compiled"],
                                                                times["dense_compiled"]),
            "capacity_compiled_over_eager": _ratio(times["pce_capacity_compiled"], times["pce_capacity"])}


def bench_layer(cfg_path: Path, batch: int, device: torch.device, repeats: int, iters: int, backend: str,
                capacity_factor: float) -> dict:
    """The first PCE layer on the feature map it sees in the network (stem and pooling applied)."""
    nets = {mode: _Model(cfg_path, [f"model.dispatch={mode}", f"model.capacity_factor={capacity_factor}"],
                         batch, device, None) for mode in ("dropless", "capacity")}
    dense = _Model(cfg_path, ["model.kind=dense"], batch, device, None)
    net = nets["dropless"].net
    with torch.no_grad(), _autocast(device):
        x = net.downsample[0](net.stem(torch.nn.functional.pad(
            nets["dropless"].x, (net.cfg.input_pad,) * 4, mode="replicate")))
    x = x.detach().float()
    layers = {"dropless": nets["dropless"].net.layers[0], "capacity": nets["capacity"].net.layers[0],
              "dense": dense.net.layers[0]}
    layers["capacity_compiled"] = torch.compile(layers["capacity"], fullgraph=True, backend=backend)

    def fwd_bwd(layer):
        def run():
            with _autocast(device):
                y, routes = layer(x)
                loss = y.float().square().mean() + (routes.weights_NE.sum() if routes is not None else 0.0)
            loss.backward()
        return run

    times = _timed({k: fwd_bwd(v) for k, v in layers.items()}, device, repeats, iters)
    return {"input": list(x.shape), "fwd_bwd_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "dropless_over_dense": _ratio(times["dropless"], times["dense"]),
            "capacity_over_dropless": _ratio(times["capacity"], times["dropless"]),
            "compiled_over_eager": _ratio(times["capacity"], times["capacity_compiled"])}  # > 1: compiled faster


def count_syncs(cfg_path: Path, batch: int, device: torch.device, capacity_factor: float) -> dict:
    out = {}
    for mode in ("dropless", "capacity"):
        model = _Model(cfg_path, [f"model.dispatch={mode}", f"model.capacity_factor={capacity_factor}"], batch,
                       device, None)
        model.step()  # warm-up outside the counters
        with HostSyncCounter() as syncs:
            model.loss().backward()
        entry = {"instrumented_fwd_bwd": syncs.total, "by_kind": dict(syncs.by_kind),
                 "pce_layers": len(model.net.pce_layers())}
        if device.type == "cuda":  # CUDA's own detector, over the whole step (optimizer included)
            _sync(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            entry["cuda_detector_step"] = sum("synchroniz" in str(w.message) for w in caught)
        out[mode] = entry
    return out


def bench_kmeans(n: int, d: int, k: int, iters: int, repeats: int) -> dict:
    import numpy as np
    from sklearn.cluster import KMeans

    from pce_dist.keyinit import kmeans

    sys.path.insert(0, str(REPO / "benchmarks"))
    from kmeans import embeddings, objective  # the k-means benchmark's data and objective

    x = embeddings(n, d, k)
    faiss_t, sk_t, faiss_obj, sk_obj, gpu = [], [], [], [], False
    for seed in range(repeats):
        res = kmeans(x, k, niter=iters, seed=seed, max_points_per_centroid=0)  # every row, like sklearn
        faiss_t.append(res.seconds)
        faiss_obj.append(objective(x, res.centroids_KD))
        gpu = res.gpu
        start = time.perf_counter()
        km = KMeans(k, random_state=seed, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
        sk_t.append(time.perf_counter() - start)
        sk_obj.append(objective(x, km.cluster_centers_.astype(np.float32)))
    return {"n": n, "d": d, "k": k, "iters": iters, "faiss_gpu": gpu,
            "sklearn_over_faiss_time": _ratio(sk_t, faiss_t),
            "faiss_over_sklearn_objective": _ratio(faiss_obj, sk_obj)}


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"


def table(result: dict) -> str:
    s, layer, km, syncs = result["step"], result["layer"], result["kmeans"], result["syncs"]
    rows = [
        ("training step PCE dropless / dense (bf16)", _fmt(s["pce_dropless_over_dense"]), "<= 1.20"),
        ("training step PCE capacity / dense", _fmt(s["pce_capacity_over_dense"]), "-"),
        ("training step compiled: PCE capacity / dense", _fmt(s["pce_capacity_compiled_over_dense_compiled"]), "-"),
        ("training step PCE capacity: compiled / eager", _fmt(s["capacity_compiled_over_eager"]), "< 1"),
        ("PCE layer dropless / dense layer", _fmt(layer["dropless_over_dense"]), "-"),
        ("PCE layer capacity / dropless", _fmt(layer["capacity_over_dropless"]), "-"),
        ("PCE layer capacity: eager time / compiled time", _fmt(layer["compiled_over_eager"]), ">= 1.3"),
    ]
    for mode in ("dropless", "capacity"):
        e = syncs[mode]
        want = f"{e['pce_layers']} (one per layer)" if mode == "dropless" else "0"
        rows.append((f"host syncs per step, {mode} (instrumented fwd+bwd)", str(e["instrumented_fwd_bwd"]), want))
        if "cuda_detector_step" in e:
            rows.append((f"host syncs per step, {mode} (CUDA detector, whole step)", str(e["cuda_detector_step"]), want))
    rows.append((f"k-means time sklearn / FAISS{' GPU' if km['faiss_gpu'] else ' CPU'} "
                 f"({km['n']} x {km['d']}, k={km['k']})", _fmt(km["sklearn_over_faiss_time"]), ">= 20"))
    rows.append(("k-means objective FAISS / sklearn", _fmt(km["faiss_over_sklearn_objective"]), "~ 1"))
    lines = [f"device: {result['device']}, torch {result['torch']}, {result['seconds']:.0f} s",
             "| figure | measured: median [min, max] | target |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, aot_eager compile: checks the code runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        device, backend = torch.device("cpu"), "aot_eager"
        args.batch, args.repeats, args.iters = 4, 1, 1
        km_sizes = dict(n=2000, d=168, k=16, iters=5, repeats=1)
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU, or pass --dry-run to check the script on the CPU")
        device, backend = torch.device("cuda"), "inductor"
        km_sizes = dict(n=100_000, d=168, k=16, iters=25, repeats=3)
    cfg_path = REPO / args.config
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dry_run": args.dry_run, "capacity_factor": args.capacity_factor}
    result["syncs"] = count_syncs(cfg_path, args.batch, device, args.capacity_factor)
    result["layer"] = bench_layer(cfg_path, args.batch, device, args.repeats, args.iters, backend,
                                  args.capacity_factor)
    result["step"] = bench_step(cfg_path, args.batch, device, args.repeats, args.iters, backend,
                                args.capacity_factor)
    result["kmeans"] = bench_kmeans(**km_sizes)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2) if args.json else table(result))
    return result


if __name__ == "__main__":
    main()
