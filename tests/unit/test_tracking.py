"""Tracker against a real ``mlflow server`` process: what lands in MLflow, outages, the fallback file.

One server per module (starting one costs ~5 s); the outage test stops it and starts it
again on the same port and database, so later tests still find it. ``MlflowServer`` lives in
tests/mlflow_server.py (shared with the fault suite).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import yaml

from pce_dist.config import RunConfig, apply_overrides, flatten, to_dict
from pce_dist.distributed import DistEnv, free_port
from mlflow_server import MlflowServer, file_records, history, wait_for

from pce_dist.tracking import FALLBACK_FILE, FallbackFile, Tracker, bounded_http, resolve_tracking_uri

_LAUNCH_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Single process, no ambient MLflow settings, cwd outside any git repository."""
    for name in _LAUNCH_VARS + ["MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)  # DistEnv.init() exports RANK/MASTER_PORT/... for DeepSpeed
    yield
    os.environ.clear()
    os.environ.update(saved)


def _cfg(uri: str, experiment: str, *overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), [f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}",
                                         "tracking.run_name=unit", *overrides])


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_default_uri_is_sqlite_in_run_dir_and_env_wins(tmp_path, monkeypatch):
    cfg = RunConfig()
    assert resolve_tracking_uri(cfg, "runs/x") == f"sqlite:///{tmp_path / 'runs' / 'x' / 'mlflow.db'}"
    cfg.tracking.tracking_uri = "http://cfg:5000"
    assert resolve_tracking_uri(cfg, "runs/x") == "http://cfg:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(cfg, "runs/x") == "http://env:5000"


def test_run_params_tags_metrics_and_config_artifact(server, tmp_path):
    cfg = _cfg(server.url, "full", "model.channels=[16,32]", "train.max_steps=5")
    env = DistEnv().init()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with Tracker.start(cfg, env, tmp_path / "run") as tracker:
        for step in range(5):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1), "router/usage/layer0/expert3": step}, step=step)
        tracker.log_artifact(notes)

    (run,) = _runs(server.url, "full")
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    assert run.data.params["model.channels"] == "[16, 32]"
    tags = run.data.tags
    assert (tags["world_size"], tags["ep_size"], tags["restart_count"]) == ("1", "1", "0")
    assert tags["hostnames"] == socket.gethostname() and tags["slurm_job_id"] == "4242"
    assert tags["git_commit"] == "unknown"  # cwd is not a repository
    client = _client(server.url)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"config.yaml", "notes.txt"}
    local = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == to_dict(cfg)


def test_resume_reuses_the_run_and_counts_restarts(server, tmp_path):
    cfg = _cfg(server.url, "resume")
    env = DistEnv().init()
    first = Tracker.start(cfg, env, tmp_path / "run")
    first.log_metrics({"train/loss": 2.0}, step=0)
    first.finish("KILLED")  # e.g. preempted
    second = Tracker.start(cfg, env, tmp_path / "run", resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert _client(server.url).get_run(first.run_id).info.status == "RUNNING"
    second.log_metrics({"train/loss": 1.0}, step=1)
    second.finish()
    (run,) = _runs(server.url, "resume")
    assert run.data.tags["restart_count"] == "1" and run.info.status == "FINISHED"
    assert [m.step for m in _client(server.url).get_metric_history(run.info.run_id, "train/loss")] == [0, 1]


def test_environment_uri_overrides_config(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    cfg = _cfg(f"http://127.0.0.1:{free_port()}", "env-wins")  # nothing listens there
    tracker = Tracker.start(cfg, DistEnv().init(), tmp_path / "run")
    tracker.finish()
    assert len(_runs(server.url, "env-wins")) == 1


def test_server_down_at_start_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=uri.replace(".", r"\.")):
        Tracker.start(_cfg(uri, "down"), DistEnv().init(), tmp_path / "run")
    assert time.monotonic() - start < 30


def test_server_lost_mid_run_falls_back_and_replays(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pce_dist.tracking")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker.start(_cfg(server.url, "outage"), DistEnv().init(), run_dir, retry_interval_s=1.0)
    tracker.log_metrics({"train/loss": 0.0}, step=0)
    wait_for(lambda: history(server.url, tracker.run_id) == [(0, 0.0)], what="step 0 in MLflow")

    server.stop()
    start = time.monotonic()
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    (run_dir / "plot.txt").write_text("made during the outage")
    tracker.log_artifact(run_dir / "plot.txt")
    assert time.monotonic() - start < 0.1, "logging waited on the dead server"
    wait_for(lambda: len(file_records(run_dir)) == 4, what="steps 1-3 and the artifact in the fallback file")
    records = file_records(run_dir)
    assert [(r["step"], r["metrics"]) for r in records[:3]] == [(s, {"train/loss": float(s)}) for s in (1, 2, 3)]
    assert records[3]["artifact"] == str(run_dir / "plot.txt") and {r["run_id"] for r in records} == {tracker.run_id}
    lost = [r for r in caplog.records if "stopped answering" in r.getMessage()]
    assert len(lost) == 1, "the outage is reported once, not once per step"

    server.start()  # same port, same database; the writer retries by itself, no new log call needed
    wait_for(lambda: len(history(server.url, tracker.run_id)) == 4, what="the replay")
    tracker.log_metrics({"train/loss": 4.0}, step=4)
    tracker.finish()
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert history(server.url, tracker.run_id) == [(s, float(s)) for s in range(5)]
    client = _client(server.url)
    assert "plot.txt" in {a.path for a in client.list_artifacts(tracker.run_id)}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert FallbackFile(run_dir / FALLBACK_FILE).read().pending == [], "replayed records are marked delivered"


def test_bad_values_are_dropped_without_raising_or_going_offline(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pce_dist.tracking")
    tracker = Tracker.start(_cfg(server.url, "bad-values"), DistEnv().init(), tmp_path / "run")
    tracker.log_metrics({"train/loss": "not a number"}, step=0)  # type error: skipped locally
    tracker.log_metrics({"x" * 300: 1.0}, step=1)  # MLflow rejects the key: dropped, store still up
    tracker.log_metrics({"train/loss": 0.5}, step=2)
    tracker.finish()
    tracker.finish()  # idempotent
    assert not any("stopped answering" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()
    history = _client(server.url).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]


# ----------------------------------------------------------------------------- the fallback file, no server


def _line(path: Path, obj: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj) + "\n")


def test_fallback_file_tracks_delivery_by_byte_offset(tmp_path):
    path = tmp_path / FALLBACK_FILE
    fallback = FallbackFile(path)
    records = [{"run_id": "r", "sid": "a", "seq": i, "step": i, "timestamp_ms": 0, "metrics": {"m": i}}
               for i in range(5)]
    fallback.append([{"session": "a", "run_id": "r"}, *records[:3]])
    fallback.append(records[3:])
    pending = fallback.read().pending
    assert [p.entry["step"] for p in pending] == [0, 1, 2, 3, 4]
    assert path.read_bytes()[pending[1].offset:pending[1].end] == (json.dumps(records[1]) + "\n").encode()

    fallback.mark_delivered([pending[0], pending[1], pending[3]])
    marker = json.loads(path.read_text().splitlines()[-1])
    assert marker == {"delivered": [[pending[0].offset, pending[1].end], [pending[3].offset, pending[3].end]]}
    assert [p.entry["step"] for p in FallbackFile(path).read().pending] == [2, 4]  # a fresh reader agrees


def test_fallback_file_survives_a_half_written_line(tmp_path, caplog):
    path = tmp_path / FALLBACK_FILE
    _line(path, {"run_id": "r", "sid": "a", "seq": 0, "step": 0, "timestamp_ms": 0, "metrics": {"m": 0}})
    with path.open("a") as f:
        f.write('{"run_id": "r", "sid": "a", "seq": 1, "st')  # the process was killed mid-write
    assert [p.entry["step"] for p in FallbackFile(path).read().pending] == [0]  # an unfinished line is not read
    FallbackFile(path).append([{"run_id": "r", "sid": "b", "seq": 0, "step": 7, "timestamp_ms": 0,
                                "metrics": {"m": 7}}])
    caplog.set_level(logging.WARNING, logger="pce_dist.tracking")
    assert [p.entry["step"] for p in FallbackFile(path).read().pending] == [0, 7]  # our line stayed whole
    assert any("unreadable line" in r.getMessage() for r in caplog.records)


def test_pending_records_come_back_in_logging_order(tmp_path):
    """A full queue writes later records before the writer spills earlier ones: seq restores the order."""
    path = tmp_path / FALLBACK_FILE
    for obj in ({"session": "old", "run_id": "r"}, {"run_id": "r", "sid": "old", "seq": 0, "step": 0},
                {"session": "new", "run_id": "r"}, {"run_id": "r", "sid": "new", "seq": 2, "step": 3},
                {"run_id": "r", "sid": "new", "seq": 0, "step": 1}, {"run_id": "r", "sid": "new", "seq": 1, "step": 2}):
        _line(path, obj)
    pending = sorted(FallbackFile(path).read().pending, key=lambda p: p.order)
    assert [p.entry["step"] for p in pending] == [0, 1, 2, 3]


def test_http_caps_stay_while_any_caller_is_inside(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with bounded_http((1, 1, 5)):
        with bounded_http((2, 1, 9)):  # e.g. the writer thread inside while the main thread probes
            pass
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5", "the inner caller removed the caps of the outer"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # the user's own setting wins and is kept
    with bounded_http((1, 1, 5)):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
