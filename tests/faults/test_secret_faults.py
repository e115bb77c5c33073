"""A password in the tracking URI reaches no file, param, log line or console of a real run."""

from __future__ import annotations

from mlflow_server import MlflowServer
from runs import digits_args, finish, launch

SECRET = "hunter2-Zq81"


def test_tracking_password_is_redacted_everywhere(tmp_path, digits_root):
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        _run_and_check(tmp_path / "run", digits_root, server)
    finally:
        server.stop()


def _run_and_check(out, digits_root, server):
    uri = server.url.replace("http://", f"http://alice:{SECRET}@")
    proc = launch(digits_args(out, digits_root, "train.max_steps=6", "train.log_every_steps=3",
                              "checkpoint.every_steps=3", f"tracking.tracking_uri={uri}"))
    stdout = finish(proc)
    assert proc.returncode == 0, stdout[-3000:]
    assert SECRET not in stdout and "alice:***@" in stdout  # "MLflow run: ... (http://alice:***@...)"

    leaked = [str(p) for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the password is written in {leaked}"
    assert (out / "config.yaml").read_text().count("alice:***@") == 1
    assert any("alice:***@" in p.read_text() for p in out.glob("checkpoints/step_*/meta.json"))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["tracking.tracking_uri"] == uri.replace(SECRET, "***")
    assert not any(SECRET in v for v in list(run.data.params.values()) + list(run.data.tags.values()))
    leaked_artifacts = [str(p) for p in server.root.rglob("*") if p.is_file() and p.suffix != ".db"
                        and SECRET.encode() in p.read_bytes()]
    assert not leaked_artifacts, leaked_artifacts
