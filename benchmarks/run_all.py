"""The benchmark suite: every ratio pce_dist tracks, measured in one run.

    python benchmarks/run_all.py [--small] [--json] [--out DIR]

Runs, in order (each a script of its own in this folder, callable alone):
  dispatch    PCE layer fwd+bwd: sparse vs dense equal-FLOPs block, E in {4, 8, 16}
  train_step  whole training step, PCE vs dense baseline at equal active FLOPs
  kmeans      FAISS vs scikit-learn k-means on 100k x 168 embeddings, k = 16
  data        loader throughput vs a plain read and vs what a training step consumes
  scaling     1 vs 2 ranks on the same global batch; all-to-all bytes vs routed bytes
  memory      every rank's RSS over many short digits epochs: growth per epoch after warm-up
  capacity    host syncs per training step (dropless vs capacity dispatch, instrumented), and the
              first PCE layer: capacity vs dropless, torch.compile(fullgraph=True) vs eager (gpu.py's
              functions, on the CPU)
  rehearsal   8 gloo ranks, ep_size 2/4/8: measured all-to-all bytes vs the scaling model's prediction
  pipeline    whole runs, PCE vs dense alternating (img/s ratio) and expert work per rank
              (dispatch/rank_imbalance), Fashion-MNIST, 2 ranks, ep_size 2
and writes ``results.json`` and ``results.md`` (one table: figure, measured median
[min, max], target) into ``--out``. ``--small`` shrinks every size so the suite runs in
about a minute -- CI runs it that way so the scripts cannot rot; the figures worth
reporting come from the full size.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"pce_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"


SECTIONS = ("dispatch", "train_step", "kmeans", "data", "scaling", "memory", "rehearsal", "capacity", "pipeline")


def run(small: bool, data_root: Path, only: list[str] | None = None) -> tuple[dict, list[tuple[str, str, str]]]:
    results, rows = {}, []
    want = set(only or SECTIONS)
    if small:  # the digits shards the small sections train on (the data section would make them first)
        _script("data").ensure_shards(data_root, "digits")
    if "dispatch" in want:
        dispatch = _quiet(_script("dispatch").main,
                          ["--json", "--experts", "4", "8", "16"] + (["--small"] if small else []))
        results["dispatch"] = dispatch
        for r in dispatch["results"]:
            target = {4: "<= 1.3", 16: "<= 1.5"}.get(r["num_experts"], "-")
            rows.append((f"PCE layer sparse / dense equal-FLOPs block, E={r['num_experts']}",
                         _fmt(r["sparse_over_dense"]), target))
    if "train_step" in want:
        import torch

        threads = torch.get_num_threads()
        results["train_step"] = {}
        for n, target in ((1, "<= 1.10"), (min(2, threads), "<= 1.20")):
            torch.set_num_threads(n)  # 1: what each rank of a multi-rank run on this box uses
            try:
                step = _quiet(_script("train_step").main,
                              ["--json"] + (["--batch", "16", "--repeats", "2"] if small else []))
            finally:
                torch.set_num_threads(threads)
            results["train_step"][f"threads_{n}"] = step
            rows.append((f"training step PCE / dense, {n} thread{'s' if n > 1 else ''} (active FLOP ratio "
                         f"{step['pce_over_dense_flops']:.3f})", _fmt(step["pce_over_dense_time"]), target))
    if "kmeans" in want:
        km_args = ["--json"] + (["--n", "5000", "--repeats", "1"] if small else [])
        km = _quiet(_script("kmeans").main, km_args)
        results["kmeans"] = km
        for name, c in km["comparisons"].items():
            target = "-" if name == "faiss_all_rows" else ">= 20"
            rows.append((f"k-means time {name} / FAISS key init ({km['n']} x {km['d']}, k={km['k']})",
                         _fmt(c["time_ratio"]), target))
            rows.append((f"k-means objective FAISS key init / {name}", _fmt(c["objective_ratio"]), "~ 1"))
    if "data" in want:
        data_mod = _script("data")
        data = data_mod.run(data_root, "digits" if small else "fashion-mnist", [0, 1] if small else [0, 1, 2],
                            1 if small else 3, 64 if small else 256)
        results["data"] = data
        for workers, ratio in data["loader_headroom"].items():
            rows.append((f"loader {workers} / training step consumption (img/s)", f"{ratio:.1f}", ">= 5"))
    if "scaling" in want:
        scaling = _quiet(_script("scaling").main, ["--json", "--steps", "12" if small else "60"])
        results["scaling"] = scaling
        rows.append(("all-to-all bytes sent / bytes of routed patches",
                     f"{scaling['two_ranks']['dispatch_over_routed']:.4f}", "<= 1.1"))
        rows.append(("throughput 2 ranks / 1 rank, same global batch", f"{scaling['throughput_2_over_1']:.2f}", "-"))
    if "memory" in want:
        memory = _quiet(_script("memory").main, ["--json"] + (["--small", f"data.root={data_root}"] if small else []))
        results["memory"] = memory
        worst = max(r["growth_mb_per_epoch"] for r in memory["ranks"].values())
        rows.append((f"RSS growth per epoch after warm-up, worst of {memory['nproc']} ranks "
                     f"({memory['epochs_measured']} digits epochs)", f"{worst:+.2f} MB", "~ 0"))
    if "rehearsal" in want:
        rehearsal = _quiet(_script("rehearsal").main, ["--json"] + (["--small"] if small else []))
        results["rehearsal"] = {k: v for k, v in rehearsal.items() if k != "settings"}
        results["rehearsal"]["settings"] = [{k: v for k, v in st.items() if k != "mismatches"}
                                            for st in rehearsal["settings"]]
        for st in rehearsal["settings"]:
            rows.append((f"all-to-all bytes measured / predicted from routing, {rehearsal['world']} ranks, "
                         f"ep_size {st['ep_size']} (docs/scaling.md)", f"{st['ratio']:.6f}", "= 1"))
    if "capacity" in want:
        gpu = _script("gpu")
        cfg_path = REPO / ("configs/digits.yaml" if small else "configs/fashion_mnist.yaml")
        cpu = gpu.torch.device("cpu")
        syncs = _quiet(gpu.count_syncs, cfg_path, 8 if small else 128, cpu, 1.25)
        layer = _quiet(gpu.bench_layer, cfg_path, 8 if small else 128, cpu, 1 if small else 7, 1 if small else 3,
                       "aot_eager" if small else "inductor", 1.25)
        results["capacity"] = {"syncs": syncs, "layer": layer}
        for mode in ("dropless", "capacity"):
            expected = f"{syncs[mode]['pce_layers']} (one per layer)" if mode == "dropless" else "0"
            rows.append((f"host syncs per training step, {mode} dispatch (instrumented)",
                         str(syncs[mode]["instrumented_fwd_bwd"]), expected))
        rows.append(("PCE layer capacity / dropless dispatch (fwd+bwd time)", _fmt(layer["capacity_over_dropless"]),
                     "-"))
        rows.append(("PCE layer capacity: eager time / torch.compile time", _fmt(layer["compiled_over_eager"]),
                     ">= 1.0"))
    if "pipeline" in want:
        pipe_args = ["--json"] + (["--config", "configs/digits.yaml", f"data.root={data_root}", "--steps", "10",
                                   "--rounds", "1", "--variants", "dense", "pce_capacity"] if small else [])
        pipeline = _quiet(_script("pipeline").main, pipe_args)
        results["pipeline"] = pipeline
        for name, e in pipeline["variants"].items():
            if name == "dense":
                continue
            rows.append((f"pipeline img/s {name} / dense ({pipeline['nproc']} ranks, ep_size {pipeline['ep_size']})",
                         _fmt(e["over_dense"]), ">= 0.8"))
            if "rank_imbalance" in e:
                rows.append((f"expert patches per rank, max / mean, {name}", _fmt(e["rank_imbalance"]), "<= 1.25"))
    return results, rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "digits" if args.small else REPO / "data" / "fashion-mnist"
        results, rows = run(args.small, data_root, args.only)
    table = ["| figure | measured: median [min, max] | target |", "|---|---|---|"]
    table += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    markdown = "\n".join(table) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown)
    print(json.dumps(results, indent=2) if args.json else markdown)
    return results


if __name__ == "__main__":
    main()
