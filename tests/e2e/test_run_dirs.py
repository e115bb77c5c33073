"""Run directories as a user moves them around: a stopped run copied elsewhere (the original
deleted) resumes from the copy, continues the same MLflow run and writes only inside the
copy; and a warm start (``checkpoint.init_from``) branches a new run off another run's
checkpoint, with its own MLflow run, from step 0.

One source run serves both tests (module fixture): stopped by SIGUSR1 to the launcher at
the log interval after its first checkpoint, as a preemption would stop it.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from e2e_runs import launch, metric_histories, mlflow_run

OVERRIDES = ["dist.ep_size=2", "train.max_steps=20", "checkpoint.every_steps=5", "train.log_every_steps=5",
             "checkpoint.keep_last=10"]


def _args(out: Path, root: Path, *extra: str) -> list[str]:
    return ["--nproc", "2", "--config", "configs/digits.yaml", "--output-dir", str(out), *OVERRIDES,
            f"data.root={root}", *extra]


def _finish(proc, want_rc: int = 0, timeout: float = 400) -> str:
    stdout, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == want_rc, stdout[-3000:]
    return stdout


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits_root):
    """A run stopped after a checkpoint (exit 3): ``(run dir, MLflow run id, checkpoint step)``."""
    out = tmp_path_factory.mktemp("runs") / "source"
    proc = launch(_args(out, digits_root))
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # the launcher forwards it: all ranks checkpoint and stop
    _finish(proc, want_rc=3)
    _, run = mlflow_run(out)
    step = int(latest.read_text().removeprefix("step_"))
    assert step < 20 and run.info.status == "KILLED"
    return out, run.info.run_id, step


def _files(root: Path, skip: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file() and skip not in p.parents}


@pytest.mark.slow
def test_warm_start_branches_a_new_run(tmp_path, digits_root, stopped_run):
    source, source_run_id, source_step = stopped_run
    before = _files(source, skip=tmp_path)
    new = tmp_path / "branch"
    _finish(launch(_args(new, digits_root, f"checkpoint.init_from={source}", "train.max_steps=10")))
    assert _files(source, skip=tmp_path) == before, "the warm start wrote into its source"
    client, run = mlflow_run(new)
    assert run.info.run_id != source_run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["init_from"] == str(source / "checkpoints" / f"step_{source_step:08d}")
    assert (tags["init_from_run_id"], tags["init_from_step"], tags["init_optimizer"]) == (
        source_run_id, str(source_step), "false")
    assert tags["restart_count"] == "0"
    history = metric_histories(new)
    assert sorted(history["train/loss"]) == [5, 10]  # the position starts at 0: this run's own steps
    assert not any(name.startswith("keyinit/") for name in history), "k-means overwrote the loaded keys"
    assert sorted(p.name for p in (new / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]
    # the loaded weights are trained ones: the first interval's loss is below the source's first
    source_loss = metric_histories(source)["train/loss"]
    assert history["train/loss"][5][-1] < source_loss[5][-1]


@pytest.mark.slow
def test_copied_run_dir_resumes_inside_itself(tmp_path, digits_root, stopped_run):
    source, run_id, step = stopped_run
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(source, copy)
    shutil.rmtree(source)  # the original is gone: nothing may recreate it
    outside = _files(tmp_path.parent, skip=copy)
    _finish(launch(_args(copy, digits_root)))
    assert not source.exists(), "the resumed run wrote into the original directory"
    assert _files(tmp_path.parent, skip=copy) == outside, "the resumed run wrote outside its directory"
    assert f"resumed from {copy / 'checkpoints' / f'step_{step:08d}'}" in (copy / "logs" / "rank0.log").read_text()
    client, run = mlflow_run(copy)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["restart_count"] == "1"
    assert run.info.artifact_uri == (copy / "mlartifacts" / run_id / "artifacts").as_uri()
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")}
    assert "config.yaml" in artifacts and any(p.startswith("plots/step") for p in artifacts)
    assert (copy / "mlartifacts" / run_id / "artifacts" / "config.yaml").is_file()
    assert sorted(metric_histories(copy)["train/loss"]) == [5, 10, 15, 20]  # the run continued to the end
