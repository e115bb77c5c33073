"""Faults a user meets with the tracking server, against a real ``mlflow server``.

* a hung server (SIGSTOP): logging costs no step time, and every metric arrives later;
* a process that ends while the server is down: ``python -m pce_dist.tracking replay``
  sends what it left, once;
* a password in the tracking URI: it reaches no param, tag, artifact, file or log line --
  the logged model (and the message of a failed upload) included; a model logged while
  the store is down is a warning naming ``export --mlflow``, not a wait.

The hung-server tests set ``MLFLOW_HTTP_REQUEST_TIMEOUT=1`` (a user setting, which the
tracker keeps) so that the writer gives up on the stopped server in ~2 s, not ~10 s.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mlflow_server import MlflowServer, file_records, history, wait_for  # noqa: E402 -- shared server helper

from pce_dist.config import RunConfig, apply_overrides  # noqa: E402
from pce_dist.distributed import DistEnv, free_port  # noqa: E402
from pce_dist.tracking import FALLBACK_FILE, FallbackFile, Tracker, log_exported_model  # noqa: E402
from pce_dist.tracking.client import process_tracking_uri  # noqa: E402

_ENV_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "MLFLOW_TRACKING_URI",
             "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    yield srv
    srv.resume()  # a failed test may leave it stopped; SIGTERM does not reach a stopped process
    srv.stop()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)  # DistEnv.init() exports RANK/MASTER_PORT/...
    yield
    os.environ.clear()
    os.environ.update(saved)


def _cfg(uri: str, experiment: str) -> RunConfig:
    return apply_overrides(RunConfig(), [f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}"])


def _tiny_export(path: Path) -> Path:
    import torch

    from pce_dist.config import to_dict
    from pce_dist.export import save_export
    from pce_dist.model import build_model

    cfg = apply_overrides(RunConfig(), ["model.image_size=8", "model.patch_sizes=[4,2]", "model.channels=[8,8]",
                                        "model.stem_channels=8"])
    torch.manual_seed(0)
    return save_export(build_model(cfg.model), to_dict(cfg), path, [str(k) for k in range(10)])


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.parametrize("queue_size", [4096, 8], ids=["queue", "full-queue"])
def test_hung_server_costs_no_step_time_and_loses_nothing(server, tmp_path, monkeypatch, queue_size):
    """200 steps against a stopped server; with a queue of 8 most records take the full-queue path."""
    run_dir = tmp_path / "run"
    tracker = Tracker.start(_cfg(server.url, "hung"), DistEnv().init(), run_dir, retry_interval_s=0.5,
                            queue_size=queue_size)
    tracker.log_metrics({"train/loss": 0.0}, step=0)
    wait_for(lambda: history(server.url, tracker.run_id) == [(0, 0.0)], what="step 0 in MLflow")

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    server.pause()
    try:
        costs = []
        for step in range(1, 201):
            start = time.perf_counter()
            tracker.log_metrics({"train/loss": float(step), "router/entropy": 0.5}, step=step)
            costs.append(time.perf_counter() - start)
        print(f"\nlog_metrics against a stopped server (queue {queue_size}): total {sum(costs) * 1e3:.2f} ms, "
              f"mean {sum(costs) / len(costs) * 1e6:.1f} us, max {max(costs) * 1e3:.2f} ms")
        assert sum(costs) < 0.5, f"200 log_metrics calls took {sum(costs):.2f} s against a hung server"
        if queue_size == 8:  # all but the queue and the batch in flight went to the file, synchronously
            assert tracker.num_overflowed >= 200 - 2 * queue_size
            assert len(file_records(run_dir)) >= tracker.num_overflowed
        wait_for(lambda: len(file_records(run_dir)) >= 200, timeout_s=20,
                 what="the writer to give up on the hung server and spill")
    finally:
        resumed_ms = time.time() * 1000
        server.resume()
    start = time.monotonic()
    tracker.finish()
    finish_s = time.monotonic() - start

    got = _client(server.url).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in got] == [(s, float(s)) for s in range(201)]
    assert all(m.timestamp <= resumed_ms for m in got), "timestamps are those of the log calls, not of the replay"
    assert len(_client(server.url).get_metric_history(tracker.run_id, "router/entropy")) == 200
    assert _client(server.url).get_run(tracker.run_id).info.status == "FINISHED"
    assert FallbackFile(run_dir / FALLBACK_FILE).read().pending == []
    assert finish_s < 15, f"finish took {finish_s:.1f} s"


_DYING_TRAINER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pce_dist.config import RunConfig, apply_overrides
    from pce_dist.distributed import DistEnv
    from pce_dist.tracking import Tracker

    uri, run_dir = sys.argv[1], Path(sys.argv[2])
    cfg = apply_overrides(RunConfig(), [f"tracking.tracking_uri={uri}", "tracking.experiment=dead-process"])
    tracker = Tracker.start(cfg, DistEnv().init(), run_dir, retry_interval_s=0.2)
    tracker.log_metrics({"train/loss": 0.0}, step=0)
    print(tracker.run_id, flush=True)
    sys.stdin.readline()  # the test stops the server meanwhile
    for step in range(1, 21):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    (run_dir / "plot.txt").write_text("drawn while the server was down")
    tracker.log_artifact(run_dir / "plot.txt")
    tracker.finish("FINISHED")
""")


def _replay(run_dir: Path, *args: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-m", "pce_dist.tracking", "replay", str(run_dir), *args],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r"^sent (\d+) records$", out.stdout, re.MULTILINE)
    assert found, f"rc {out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr}"
    return out.returncode, int(found.group(1))


def test_replay_sends_what_a_dead_process_left_exactly_once(server, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _DYING_TRAINER, server.url, str(run_dir)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()
        wait_for(lambda: history(server.url, run_id) == [(0, 0.0)], what="step 0 in MLflow")
        server.stop()
        _, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "pce_dist.tracking replay" in err, "the user is told how to send what is left"
    left = file_records(run_dir)
    assert [r["step"] for r in left if "metrics" in r] == list(range(1, 21))
    assert [r.get("artifact") or r.get("status") for r in left if "metrics" not in r] == \
        [str(run_dir / "plot.txt"), "FINISHED"]

    server.start()  # same port and database
    assert _client(server.url).get_run(run_id).info.status == "RUNNING"
    assert _replay(run_dir) == (0, 22)  # 20 metric records, the artifact, the final status
    assert history(server.url, run_id) == [(s, float(s)) for s in range(21)]
    run = _client(server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time == next(r["timestamp_ms"] for r in left if "status" in r)
    assert "plot.txt" in {a.path for a in _client(server.url).list_artifacts(run_id)}

    writes = server.num_writes()
    assert _replay(run_dir) == (0, 0)
    assert server.num_writes() == writes, "a second replay sent requests"
    assert history(server.url, run_id) == [(s, float(s)) for s in range(21)]


def test_password_in_the_tracking_uri_is_nowhere(server, tmp_path, monkeypatch, caplog, capfd):
    """MLflow's server ignores basic auth unless configured, so ``user:secret@`` reaches it and works."""
    caplog.set_level(logging.DEBUG)  # every logger, every level
    secret_uri = server.url.replace("http://", "http://user:secret@")
    shown = server.url.replace("http://", "http://user:***@")
    run_dir = tmp_path / "run"
    exported = _tiny_export(tmp_path / "model.safetensors")
    tracker = Tracker.start(_cfg(secret_uri, "redaction"), DistEnv().init(), run_dir, retry_interval_s=0.5)
    assert tracker.tracking_uri == shown
    tracker.log_metrics({"train/loss": 0.0}, step=0)
    wait_for(lambda: history(server.url, tracker.run_id) == [(0, 0.0)], what="step 0 in MLflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    server.pause()  # an outage: MLflow's errors quote the request URL, and the tracker logs them
    try:
        for step in (1, 2, 3):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        wait_for(lambda: len(file_records(run_dir)) == 3, timeout_s=20, what="the outage")
        assert tracker.log_model(exported, step=3) is None  # the store is down: a warning, not a wait
    finally:
        server.resume()
    wait_for(lambda: history(server.url, tracker.run_id) == [(s, float(s)) for s in range(4)], timeout_s=20,
             what="the records of the outage")
    model_uri = tracker.log_model(exported, step=3)  # back: the model goes up, through the live URI
    assert model_uri and model_uri.startswith("models:/")
    tracker.finish()
    assert history(server.url, tracker.run_id) == [(s, float(s)) for s in range(4)]
    with pytest.raises(RuntimeError) as failed:  # the message of a failed start, too
        Tracker.start(_cfg(f"http://user:secret@127.0.0.1:{free_port()}", "redaction"), DistEnv().init(), run_dir)
    with pytest.raises(RuntimeError) as refused:  # ... and of a model upload to a store that is not there
        log_exported_model(exported, tracker.run_id, f"http://user:secret@127.0.0.1:{free_port()}")
    import mlflow

    (tmp_path / "logged").mkdir()
    with process_tracking_uri(server.url):  # MLflow looks models:/<id> up in the process's store
        mlmodel = (Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "logged")))
                   / "MLmodel").read_text()
    logged_model = _client(server.url).get_logged_model(model_uri.removeprefix("models:/"))

    run = _client(server.url).get_run(tracker.run_id)
    assert run.data.params["tracking.tracking_uri"] == shown
    config = Path(_client(server.url).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config.read_text())["tracking"]["tracking_uri"] == shown
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("stopped answering" in m for m in logged) and any("user:***@" in m for m in logged)
    out, err = capfd.readouterr()
    places = {
        "params": repr(run.data.params), "tags": repr(run.data.tags), "config.yaml": config.read_text(),
        "fallback file": (run_dir / FALLBACK_FILE).read_text(), "start error": str(failed.value),
        "log records": "\n".join(logged), "stdout/stderr": out + err, "MLmodel": mlmodel,
        "model params/tags": repr(logged_model.params) + repr(logged_model.tags), "model error": str(refused.value),
    }
    assert "user:***@" in str(refused.value)
    assert any(f"python -m pce_dist.export --mlflow {run_dir}" in m for m in logged)  # how to log it later
    leaks = {name: text for name, text in places.items() if "secret" in text}
    assert not leaks, leaks  # the text says where the secret went
