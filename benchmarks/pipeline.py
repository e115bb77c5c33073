"""The whole pipeline, PCE against the dense baseline, side by side in one run.

    python benchmarks/pipeline.py [--config configs/fashion_mnist.yaml] [--nproc 2] [--ep-size 2]
                                  [--steps 150] [--rounds 2] [--variants pce dense pce_capacity] [--json]

Each round launches ``launch/local.py`` once per variant, in turn, for the same number of
optimizer steps (same data, loader, DeepSpeed engine, MLflow logging: everything a
training run does), so a change in machine load hits every variant alike. From each run's
MLflow history it reads the training throughput (``perf/img_per_s``, evaluation and
checkpoints excluded) and the expert work per rank (``dispatch/rank_imbalance``: the sum
over layers of the busiest rank's expert patches over the sum of the mean), skipping the
first log interval (warm-up, key initialisation). Prints img/s per variant and the ratio of
every variant to ``dense`` per round, median [min, max].

Variants: ``pce`` (the config as it is), ``dense`` (``model.kind=dense``), ``pce_capacity``
(``model.dispatch=capacity``, ``--capacity-factor``); extra ``key=value`` overrides apply to all.
On this 2-core box the ranks share two cores with their loader workers: the figures compare
variants, they do not show a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pce_dist import metrics as names  # noqa: E402

VARIANTS = {"pce": [], "dense": ["model.kind=dense"], "pce_capacity": ["model.dispatch=capacity"]}


def run_variant(name: str, args, out: Path) -> dict:
    overrides = VARIANTS[name] + (
        [f"model.capacity_factor={args.capacity_factor}"] if name == "pce_capacity" else [])
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--nproc", str(args.nproc), "--config", args.config,
           "--output-dir", str(out), f"dist.ep_size={args.ep_size}", f"train.max_steps={args.steps}",
           f"train.log_every_steps={max(1, args.steps // 5)}", "checkpoint.every_steps=0",
           *args.overrides, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    if proc.returncode != 0:
        raise SystemExit(f"{name}: launch/local.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def history(key):
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        return values[1:] if len(values) > 1 else values

    result = {"img_per_s": statistics.median(history(names.PERF_IMG_PER_S))}
    imbalance = history(names.DISPATCH_RANK_IMBALANCE)
    if imbalance and name != "dense":
        result["rank_imbalance"] = statistics.median(imbalance)
        layers = sum(1 for key in run.data.metrics
                     if key.startswith("dispatch/layer") and key.endswith("/rank_imbalance"))
        result["layer_rank_imbalance"] = [statistics.median(history(names.dispatch_layer(layer, "rank_imbalance")))
                                          for layer in range(layers)]
        result["dropped_fraction"] = [statistics.median(history(names.dispatch_layer(layer, "dropped_fraction")))
                                      for layer in range(layers)]
    return result


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ep-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["pce", "dense", "pce_capacity"], choices=sorted(VARIANTS))
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value for every variant")
    args = ap.parse_args(argv)
    if "dense" not in args.variants:
        ap.error("--variants must include dense (the ratios are to it)")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rounds.append({name: run_variant(name, args, Path(tmp) / f"{name}_{r}") for name in args.variants})
    result = {"config": args.config, "nproc": args.nproc, "ep_size": args.ep_size, "steps": args.steps,
              "capacity_factor": args.capacity_factor, "rounds": rounds, "variants": {}}
    for name in args.variants:
        per_round = [rnd[name] for rnd in rounds]
        entry = {"img_per_s": _stats([p["img_per_s"] for p in per_round])}
        if name != "dense":
            entry["over_dense"] = _stats([p["img_per_s"] / rnd["dense"]["img_per_s"]
                                          for p, rnd in zip(per_round, rounds)])
            if "rank_imbalance" in per_round[0]:
                entry["rank_imbalance"] = _stats([p["rank_imbalance"] for p in per_round])
                entry["layer_rank_imbalance"] = per_round[-1]["layer_rank_imbalance"]
                entry["dropped_fraction"] = per_round[-1]["dropped_fraction"]
        result["variants"][name] = entry
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.config}, {args.nproc} ranks, ep_size {args.ep_size}, {args.steps} steps x {args.rounds} "
              "rounds, alternating")
        print("| variant | img/s | / dense | rank imbalance | per layer | dropped per layer |")
        print("|---|---|---|---|---|---|")
        def fmt(r):
            return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else "-"

        for name, e in result["variants"].items():
            print(f"| {name} | {e['img_per_s']['median']:.0f} | {fmt(e.get('over_dense'))} | "
                  f"{fmt(e.get('rank_imbalance'))} | "
                  f"{', '.join(f'{v:.2f}' for v in e.get('layer_rank_imbalance', [])) or '-'} | "
                  f"{', '.join(f'{v:.3f}' for v in e.get('dropped_fraction', [])) or '-'} |")
    return result


if __name__ == "__main__":
    main()
