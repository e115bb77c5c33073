"""What keeps a run directory relocatable and its checkpoint options honest, below the e2e
tests: the sqlite store's artifact locations follow the directory, a resume of a run that
is not in this store says what to use instead, and the warm-start keys are validated."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from pce_dist.config import load_config
from pce_dist.tracking.opening import open_run
from pce_dist.tracking.relocation import follow_run_dir


def _store(run_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("x", artifact_location=(run_dir / "mlartifacts").as_uri())
    return uri, client.create_run(experiment).info.run_id


def _locations(db):
    with sqlite3.connect(db) as con:
        found = (con.execute("SELECT artifact_location FROM experiments WHERE name = 'x'").fetchall(),
                 con.execute("SELECT artifact_uri FROM runs").fetchall())
    con.close()
    return found


def test_moved_store_points_its_artifacts_at_the_new_directory(tmp_path):
    old, new = tmp_path / "old", tmp_path / "elsewhere" / "new"
    old.mkdir()
    _, run_id = _store(old)
    shutil.copytree(old, new)
    shutil.rmtree(old)
    uri = f"sqlite:///{new / 'mlflow.db'}"
    assert follow_run_dir(uri, new) == [(old / "mlartifacts").as_uri()]
    experiments, runs = _locations(new / "mlflow.db")
    assert experiments == [((new / "mlartifacts").as_uri(),)]
    assert runs == [((new / "mlartifacts" / run_id / "artifacts").as_uri(),)]
    assert follow_run_dir(uri, new) == []  # in place now: nothing to do
    assert not old.exists()


def test_a_store_outside_the_run_dir_is_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    uri, _ = _store(shared)
    before = _locations(shared / "mlflow.db")
    assert follow_run_dir(uri, tmp_path / "run") == []
    assert _locations(shared / "mlflow.db") == before


def test_resume_of_a_run_not_in_this_store_points_to_init_from(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match=r"cannot resume MLflow run 'feedc0de'.*checkpoint\.init_from=PATH"):
        open_run(cfg, None, tmp_path, uri, "feedc0de", ["host"])


@pytest.mark.parametrize("overrides,key", [
    (["checkpoint.resume=runs/a", "checkpoint.init_from=runs/b"], "checkpoint.init_from"),
    (["checkpoint.init_optimizer=true"], "checkpoint.init_optimizer"),
])
def test_warm_start_keys_are_validated(overrides, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config(None, overrides)


def test_warm_start_keys_are_typed():
    cfg = load_config(None, ["checkpoint.init_from=runs/a", "checkpoint.init_optimizer=true"])
    assert (cfg.checkpoint.init_from, cfg.checkpoint.init_optimizer) == ("runs/a", True)
    with pytest.raises(ValueError, match="checkpoint.init_optimizer"):
        load_config(None, ["checkpoint.init_from=runs/a", "checkpoint.init_optimizer=maybe"])
