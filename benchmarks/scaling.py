"""Training throughput on 1 vs 2 ranks at the same global batch, and all-to-all traffic.

Runs ``launch/local.py`` twice on the digits shards with the same global batch (64 by
default: 1 rank x 64, then 2 ranks x 32 with ``ep_size=2``), reads the run's MLflow
metrics and prints: step time, images/s, the 2-rank/1-rank throughput ratio, the bytes the
dispatch all-to-all sends per step against the bytes of the routed patches, and the
k-means key-initialisation time. "Sent" is measured where the dispatcher calls
``all_to_all_single`` (the bytes of the tensors it hands over for the other rank, counts
exchange included); "routed" is computed from the routing counts.

    python benchmarks/scaling.py [--steps 60] [--global-batch 64] [--json]

On this 2-core machine, two ranks share two cores with their loader workers, so the
ratio measures the pipeline's overhead (all-to-all, synchronisation), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(nproc: int, steps: int, global_batch: int, data_root: Path, out: Path) -> dict:
    args = [sys.executable, str(REPO / "launch" / "local.py"), "--nproc", str(nproc), "--config",
            "configs/digits.yaml", "--output-dir", str(out), f"data.root={data_root}",
            f"data.batch_size={global_batch // nproc}", f"dist.ep_size={nproc}", f"train.max_steps={steps}",
            f"train.log_every_steps={max(1, steps // 6)}", "checkpoint.every_steps=0", "data.num_workers=1"]
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True,
                   env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    wall = time.perf_counter() - start
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def history(key):  # skip the first interval (warm-up, key init) when there are others
        values = [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
        return values[1:] if len(values) > 1 else values

    out_metrics = {"nproc": nproc, "wall_s": wall, "img_per_s": statistics.median(history("perf/img_per_s")),
                   "step_time_s": statistics.median(history("perf/step_time_s")),
                   "keyinit_s": r.data.metrics.get("keyinit/seconds_total")}
    if nproc > 1:
        routed = statistics.median(history("comm/routed_bytes_per_step"))
        sent = statistics.median(history("comm/dispatch_bytes_per_step"))
        out_metrics.update(routed_bytes_per_step=routed, dispatch_bytes_per_step=sent, dispatch_over_routed=sent / routed,
                           return_bytes_per_step=statistics.median(history("comm/return_bytes_per_step")))
    return out_metrics


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--data-root", default=None, help="digits shards (prepared in a temp dir if absent)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp) / "digits"
        if not (root / "manifest.json").exists():
            from data_prep import prepare

            prepare("digits", root, shard_size=128, progress=False)
        one = run(1, args.steps, args.global_batch, root, Path(tmp) / "r1")
        two = run(2, args.steps, args.global_batch, root, Path(tmp) / "r2")
    result = {"one_rank": one, "two_ranks": two, "throughput_2_over_1": two["img_per_s"] / one["img_per_s"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"digits, global batch {args.global_batch}, {args.steps} steps")
        print("| ranks | step time ms | img/s | key init s |")
        print("|---|---|---|---|")
        for r in (one, two):
            print(f"| {r['nproc']} | {1e3 * r['step_time_s']:.1f} | {r['img_per_s']:.0f} | {r['keyinit_s']:.2f} |")
        print(f"2-rank / 1-rank throughput: {result['throughput_2_over_1']:.2f}")
        print(f"all-to-all: {two['dispatch_bytes_per_step'] / 1e3:.1f} kB sent per step for "
              f"{two['routed_bytes_per_step'] / 1e3:.1f} kB of routed patches "
              f"(ratio {two['dispatch_over_routed']:.4f}); results back: {two['return_bytes_per_step'] / 1e3:.1f} kB")
    return result


if __name__ == "__main__":
    main()
