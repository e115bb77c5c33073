"""The benchmark suite runs at a small size, so its scripts cannot rot between full measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_run_all_small(tmp_path):
    subprocess.run([sys.executable, "benchmarks/run_all.py", "--small", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"dispatch", "train_step", "kmeans", "data", "scaling", "memory", "rehearsal", "capacity",
                            "pipeline"}
    assert [r["num_experts"] for r in results["dispatch"]["results"]] == [4, 8, 16]
    assert all(r["experts_per_patch"] >= 1.0 for r in results["dispatch"]["results"])
    assert set(results["train_step"]) == {"threads_1", "threads_2"}
    pce = results["train_step"]["threads_1"]["models"]["pce"]
    assert pce["active_params"] < pce["total_params"]
    assert 0.9 < results["kmeans"]["comparisons"]["sklearn_same_iters"]["objective_ratio"]["median"] < 1.1
    # sent: measured at the all_to_all_single call, counts included; routed: from the routing counts
    assert 1.0 < results["scaling"]["two_ranks"]["dispatch_over_routed"] <= 1.1  # a measured target, not just a run
    assert {r["rss_end_mb"] > 0 for r in results["memory"]["ranks"].values()} == {True}
    assert len(results["memory"]["ranks"]) == 2 and results["memory"]["epochs_measured"] >= 2
    assert results["rehearsal"]["all_exact"] and len(results["rehearsal"]["settings"]) == 3
    syncs = results["capacity"]["syncs"]  # instrumented: one count copy per layer, none with capacity
    assert syncs["dropless"]["instrumented_fwd_bwd"] == syncs["dropless"]["pce_layers"] == 2
    assert syncs["capacity"]["instrumented_fwd_bwd"] == 0
    capacity = results["pipeline"]["variants"]["pce_capacity"]  # a real 2-rank run logged the expert work
    assert capacity["over_dense"]["median"] > 0 and capacity["rank_imbalance"]["median"] >= 1.0
    assert len(capacity["dropped_fraction"]) == 2
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n|") >= 10 and "all-to-all bytes" in table and "host syncs" in table


@pytest.mark.slow
def test_gpu_check_dry_run():
    """benchmarks/gpu.py is the GPU check nobody can run here: its dry run keeps every path working."""
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--json", "--config", "configs/digits.yaml"],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out)
    assert result["dry_run"] and result["syncs"]["capacity"]["instrumented_fwd_bwd"] == 0
    assert result["syncs"]["dropless"]["instrumented_fwd_bwd"] == result["syncs"]["dropless"]["pce_layers"]
    assert set(result["step"]["step_ms"]) == {"pce_dropless", "pce_capacity", "pce_capacity_compiled", "dense",
                                              "dense_compiled"}
    assert 0.9 < result["kmeans"]["faiss_over_sklearn_objective"]["median"] < 1.1


def test_train_step_profile_names_the_ops(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--profile", "--batch", "8", "--repeats", "1"],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("| aten::")]
    assert len(rows) >= 5 and any("convolution" in r for r in rows), out[-2000:]


def test_checkpoint_benchmark_small():
    out = subprocess.run([sys.executable, "benchmarks/checkpoint.py", "--steps", "10", "--every", "5", "--loops", "1", "--repeats", "1",
                          "--json"], cwd=REPO, check=True, capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out[out.index("\n{\n") + 1:])  # DeepSpeed prints its start-up lines to stdout first
    assert [lay["zero_stage"] for lay in result["layouts"]] == [0, 1, 2]
    # one layout at every ZeRO stage: the same files, no DeepSpeed-partitioned zero_r*.pt
    assert all(lay["files"] == ["experts_r0.pt", "meta.json", "rank0.pt", "shared.pt"] for lay in result["layouts"])
    loops = result["loops"]
    assert loops["sync"]["saves"] == loops["async"]["saves"] == 2
    # the async call returns after the host copy, the sync one after the write and its fsyncs
    assert loops["async"]["save_call_s"] < loops["sync"]["save_call_s"]
