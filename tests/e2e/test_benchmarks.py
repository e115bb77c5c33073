"""The benchmark scripts run at a small size, so they cannot rot between full measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dispatch_benchmark_small():
    out = subprocess.run([sys.executable, "benchmarks/dispatch.py", "--small", "--json", "--experts", "2", "4"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    assert [r["num_experts"] for r in result["results"]] == [2, 4]
    for r in result["results"]:
        assert r["experts_per_patch"] >= 1.0
        assert r["sparse_over_dense"]["median"] > 0 and r["reference_over_sparse"]["median"] > 0
        assert r["times"]["sparse"]["median_s"] > 0
