"""FAISS k-means (what key initialisation uses) vs scikit-learn KMeans on the same embeddings.

    python benchmarks/kmeans.py [--n 100000] [--d 168] [--k 16] [--repeats 3] [--json]

The embeddings are a mixture of 4k directions with noise, unit-normalised as the key
initialisation does (routing compares by cosine). The objective is what the keys are
for: every result's centroids are unit-normalised (they become keys) and scored on *all*
n rows by the same numpy code as sum(1 - max cosine) -- lower is better.

Contenders, timed interleaved:
  faiss              what ``train.key_init=kmeans`` runs: 25 iterations on FAISS's random
                     subsample of ``train.kmeans_max_points_per_centroid`` (256) rows per
                     centroid, then every row assigned
  faiss_all_rows     the same on every row (``train.kmeans_max_points_per_centroid=0``)
  sklearn_same_iters scikit-learn, one k-means++ start, the same 25 Lloyd iterations
  sklearn_defaults   scikit-learn's defaults (k-means++, up to 300 iterations until tol)
Prints time ratios (other / faiss) and objective ratios (faiss / other), median and range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pce_dist.config import TrainConfig  # noqa: E402
from pce_dist.keyinit import kmeans  # noqa: E402


def embeddings(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4 * k, d))
    x = centers[rng.integers(0, 4 * k, n)] + 0.8 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    keys = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return float((1.0 - (x @ keys.T).max(1)).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=168)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from sklearn.cluster import KMeans

    x = embeddings(args.n, args.d, args.k)
    default_mpc = TrainConfig().kmeans_max_points_per_centroid  # what key initialisation runs

    def run_faiss(mpc):
        def fit(seed):
            res = kmeans(x, args.k, niter=args.iters, seed=seed, max_points_per_centroid=mpc)
            return res.seconds, res.centroids_KD
        return fit

    def run_sklearn(**kwargs):
        def fit(seed):
            start = time.perf_counter()
            km = KMeans(args.k, random_state=seed, **kwargs).fit(x)
            return time.perf_counter() - start, km.cluster_centers_.astype(np.float32)
        return fit

    contenders = {"faiss": run_faiss(default_mpc), "faiss_all_rows": run_faiss(0),
                  "sklearn_same_iters": run_sklearn(n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd"),
                  "sklearn_defaults": run_sklearn()}
    times = {name: [] for name in contenders}
    objs = {name: [] for name in contenders}
    for r in range(args.repeats):  # interleaved, so load changes hit every contender alike
        for name, fit in contenders.items():
            seconds, centroids = fit(r)
            times[name].append(seconds)
            objs[name].append(objective(x, centroids))

    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {"n": args.n, "d": args.d, "k": args.k, "iters": args.iters, "faiss_points_per_centroid": default_mpc,
              "seconds": {k: statistics.median(v) for k, v in times.items()},
              "objective": {k: statistics.median(v) for k, v in objs.items()}, "comparisons": {}}
    for name in contenders:
        if name == "faiss":
            continue
        result["comparisons"][name] = {
            "time_ratio": stats([s / f for s, f in zip(times[name], times["faiss"])]),
            "objective_ratio": stats([f / s for f, s in zip(objs["faiss"], objs[name])])}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"k-means {args.n} x {args.d}, k={args.k}, {args.iters} iterations, {args.repeats} repeats; FAISS "
              f"(key init: {default_mpc} rows per centroid) {result['seconds']['faiss']:.3f} s")
        for name, c in result["comparisons"].items():
            t, o = c["time_ratio"], c["objective_ratio"]
            print(f"  {name}: {result['seconds'][name]:.3f} s -> time {name}/FAISS {t['median']:.1f}x "
                  f"[{t['min']:.1f}, {t['max']:.1f}], objective FAISS/{name} {o['median']:.4f} "
                  f"[{o['min']:.4f}, {o['max']:.4f}]")
    return result


if __name__ == "__main__":
    main()
