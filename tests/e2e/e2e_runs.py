"""Helpers of the e2e tests (a plain module, not a test module): run ``launch/local.py`` as a
user does and read the run's MLflow records back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow_server import mlflow_run  # noqa: F401 -- re-exported: one reader of a run dir's MLflow run

REPO = Path(__file__).resolve().parents[2]


def launch(args: list[str], **kwargs) -> subprocess.Popen:
    """``python launch/local.py ARGS`` from the repo root, stdout and stderr merged, text mode."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.Popen([sys.executable, str(REPO / "launch" / "local.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run_to_end(args: list[str], timeout: float) -> str:
    """``launch(args)`` waited for; its combined output, after asserting it exited 0."""
    proc = launch(args)
    stdout, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-3000:]
    return stdout


def metric_histories(run_dir: Path, skip_prefixes: tuple[str, ...] = ()) -> dict[str, dict[int, list[float]]]:
    """Every value of every metric of the run under ``run_dir``: ``{name: {step: [values, in logging order]}}``.

    A step logged twice (before a kill and again after the resume) keeps both values.
    """
    client, run = mlflow_run(run_dir)
    out: dict[str, dict[int, list[float]]] = {}
    for name in sorted(run.data.metrics):
        if name.startswith(skip_prefixes):
            continue
        for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp)):
            out.setdefault(name, {}).setdefault(m.step, []).append(m.value)
    return out
