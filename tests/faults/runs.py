"""Helpers of the fault suite: launch a real 2-rank run, watch it, read its MLflow run back.

A plain module (not a test module, not a conftest): fault tests import it by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow_server import mlflow_run  # noqa: F401 -- re-exported: one reader of a run dir's MLflow run

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "local.py"


def launch(args: list[str], *, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``python launch/local.py ARGS`` from the repo root, stdout and stderr merged, text mode."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true", **(env or {}))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        if var not in (env or {}):
            full_env.pop(var, None)
    return subprocess.Popen([sys.executable, str(LAUNCHER), *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def digits_args(out: Path, root: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return ["--nproc", str(nproc), "--config", "configs/digits.yaml", "--output-dir", str(out),
            f"data.root={root}", *overrides]


def heartbeat(out: Path, rank: int) -> dict | None:
    try:
        return json.loads((out / "logs" / "heartbeat" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout_s: float = 240, ranks=(0, 1)) -> None:
    """Until every rank's heartbeat says it reached ``step`` (the run's own progress report)."""
    deadline = time.monotonic() + timeout_s
    while True:
        beats = [heartbeat(out, r) for r in ranks]
        if all(b is not None and b["step"] >= step for b in beats):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n"
                                 + (proc.stdout.read() if proc.stdout else "")[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} not reached in {timeout_s} s: {beats}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end in {timeout_s} s:\n{out[-3000:]}")
    return out


def history(run_dir: Path, key: str) -> dict[int, float]:
    """``{step: value}`` of a metric, the latest value logged at each step."""
    client, run = mlflow_run(run_dir)
    rows = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in rows}


def logged_keys(run_dir: Path) -> list[str]:
    _, run = mlflow_run(run_dir)
    return sorted(run.data.metrics)
