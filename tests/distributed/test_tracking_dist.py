"""Tracker over two real ranks: one MLflow run whose id every rank shares; failures reach every rank.

Only rank 0 sends, from one background writer thread that ``finish`` ends.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from multiproc import spawn

from pce_dist.config import DistConfig, RunConfig, apply_overrides
from pce_dist.distributed import DistEnv, free_port
from pce_dist.tracking import Tracker

_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def _writers() -> int:
    return sum(t.name == "pce-tracking-writer" for t in threading.enumerate())


def _tracking_worker(rank: int, world_size: int, run_dir: str, uri: str) -> str:
    env = DistEnv.from_environ(DistConfig(timeout_s=60.0)).init()
    cfg = apply_overrides(RunConfig(), [f"tracking.tracking_uri={uri}", "tracking.experiment=two-ranks"])
    try:
        tracker = Tracker.start(cfg, env, Path(run_dir))
    except RuntimeError as exc:
        return f"error: {exc}"
    writers = _writers()
    for step in range(3):  # every rank calls; only rank 0 may write
        tracker.log_metrics({"train/loss": float(step), "rank": float(rank)}, step=step)
    tracker.finish()
    env.destroy()
    assert writers == (1 if rank == 0 else 0) and _writers() == 0, (rank, writers, _writers())
    return tracker.run_id


def test_two_ranks_share_one_run_in_the_default_sqlite_store(tmp_path):
    run_dir = tmp_path / "run"
    ids = spawn(_tracking_worker, 2, args=(str(run_dir), ""), env=_ENV, timeout_s=90)
    assert ids[0] == ids[1] and not ids[0].startswith("error")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("two-ranks").experiment_id])
    assert run.info.run_id == ids[0]
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["hostnames"] == socket.gethostname()  # both ranks on this host: listed once
    assert [(m.step, m.value) for m in client.get_metric_history(ids[0], "rank")] == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert (run_dir / "mlartifacts").is_dir()


def test_unreachable_store_raises_on_every_rank(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    results = spawn(_tracking_worker, 2, args=(str(tmp_path / "run"), uri), env=_ENV, timeout_s=60)
    for got in results:  # rank 1 learns of rank 0's failure instead of waiting in a collective
        assert got.startswith("error: ") and uri in got
