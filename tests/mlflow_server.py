"""A real ``mlflow server`` for tests, and readers of what reached it (shared helper module).

Importable from every test folder: pytest puts ``tests/`` (the rootdir conftest's folder)
on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pce_dist.distributed.rendezvous import free_port
from pce_dist.tracking import FALLBACK_FILE


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 60.0) -> None:
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",  # no phoning home from CI
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no background job workers to reap
                   PYTHONUNBUFFERED="1")  # access-log lines reach server.log as requests are served
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health in time")

    def pause(self) -> None:
        """SIGSTOP the group: connections are still accepted by the kernel, nothing answers (a hung server)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def num_writes(self) -> int:
        """POST requests the server has answered so far, from its access log (every MLflow write is a POST)."""
        return sum('"POST /' in line for line in (self.root / "server.log").read_text().splitlines())

    def stop(self) -> None:
        """SIGTERM the whole process group (server + uvicorn worker), SIGKILL if it lingers."""
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:  # nothing of the group is left behind
            self.proc = None
            return
        raise AssertionError(f"processes of mlflow server group {self.proc.pid} survived SIGKILL")


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def file_records(run_dir: Path) -> list[dict]:
    """Every record line of the fallback file (delivered or not), read as plain JSON lines."""
    path = run_dir / FALLBACK_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if "run_id" in r and "session" not in r]


def mlflow_run(run_dir: Path):
    """The client and the one MLflow run recorded under ``run_dir``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]
