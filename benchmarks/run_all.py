"""The benchmark suite: every ratio pce_dist tracks, measured in one run.

    python benchmarks/run_all.py [--small] [--json] [--out DIR]

Runs, in order (each a script of its own in this folder, callable alone):
  dispatch    PCE layer fwd+bwd: sparse vs dense equal-FLOPs block, E in {4, 8, 16}
  train_step  whole training step, PCE vs dense baseline at equal active FLOPs
  kmeans      FAISS vs scikit-learn k-means on 100k x 168 embeddings, k = 16
  data        loader throughput vs a plain read and vs what a training step consumes
  scaling     1 vs 2 ranks on the same global batch; all-to-all bytes vs routed bytes
  memory      every rank's RSS over many short digits epochs: growth per epoch after warm-up
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


def run(small: bool, data_root: Path) -> tuple[dict, list[tuple[str, str, str]]]:
    results, rows = {}, []
    dispatch = _quiet(_script("dispatch").main, ["--json", "--experts", "4", "8", "16"] + (["--small"] if small else []))
    results["dispatch"] = dispatch
    for r in dispatch["results"]:
        target = {4: "<= 1.3", 16: "<= 1.5"}.get(r["num_experts"], "-")
        rows.append((f"PCE layer sparse / dense equal-FLOPs block, E={r['num_experts']}", _fmt(r["sparse_over_dense"]),
                     target))
    step = _quiet(_script("train_step").main, ["--json"] + (["--batch", "16", "--repeats", "2"] if small else []))
    results["train_step"] = step
    rows.append(("training step PCE / dense (active FLOP ratio "
                 f"{step['pce_over_dense_flops']:.3f})", _fmt(step["pce_over_dense_time"]), "<= 1.3"))
    km_args = ["--json"] + (["--n", "5000", "--repeats", "1"] if small else [])
    km = _quiet(_script("kmeans").main, km_args)
    results["kmeans"] = km
    for name, c in km["comparisons"].items():
        target = "-" if name == "faiss_all_rows" else ">= 20"
        rows.append((f"k-means time {name} / FAISS key init ({km['n']} x {km['d']}, k={km['k']})",
                     _fmt(c["time_ratio"]), target))
        rows.append((f"k-means objective FAISS key init / {name}", _fmt(c["objective_ratio"]), "~ 1"))
    data_mod = _script("data")
    data = data_mod.run(data_root, "digits" if small else "fashion-mnist", [0, 1] if small else [0, 1, 2],
                        1 if small else 3, 64 if small else 256)
    results["data"] = data
    for workers, ratio in data["loader_headroom"].items():
        rows.append((f"loader {workers} / training step consumption (img/s)", f"{ratio:.1f}", ">= 5"))
    scaling = _quiet(_script("scaling").main, ["--json", "--steps", "12" if small else "60"])
    results["scaling"] = scaling
    rows.append(("all-to-all bytes sent / bytes of routed patches", f"{scaling['two_ranks']['dispatch_over_routed']:.4f}",
                 "<= 1.1"))
    rows.append(("throughput 2 ranks / 1 rank, same global batch", f"{scaling['throughput_2_over_1']:.2f}", "-"))
    memory = _quiet(_script("memory").main, ["--json"] + (["--small", f"data.root={data_root}"] if small else []))
    results["memory"] = memory
    worst = max(r["growth_mb_per_epoch"] for r in memory["ranks"].values())
    rows.append((f"RSS growth per epoch after warm-up, worst of {memory['nproc']} ranks "
                 f"({memory['epochs_measured']} digits epochs)", f"{worst:+.2f} MB", "~ 0"))
    return results, rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "digits" if args.small else REPO / "data" / "fashion-mnist"
        results, rows = run(args.small, data_root)
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
