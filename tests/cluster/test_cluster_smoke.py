"""Smoke tests of the local 4-node SLURM cluster (tests/cluster/slurm_cluster.sh).

Every wait is bounded twice: by the test's own deadline and by pytest-timeout
(``func_only=True`` so that the first test's cluster start-up, which may install packages, is
not counted against it).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import submitit

pytestmark = pytest.mark.cluster

# What the jobs below run are standard-library functions (``os.getenv``, ``time.sleep``):
# submitit pickles them by reference, and the job's Python imports them like any module.
# A function of this test module would not do -- tests/ is not on the job's sys.path.

def _wait_done(job: submitit.Job, timeout: float, force_check: bool = False) -> float:
    """Bounded wait for a submitit job (job.wait()/results() alone may wait forever)."""
    t0 = time.monotonic()
    while not job.done(force_check=force_check):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"submitit job {job.job_id} not done after {timeout} s (state {job.state})")
        time.sleep(0.5)
    return time.monotonic() - t0


@pytest.mark.timeout(90, func_only=True)
def test_four_nodes_run_one_task_each(slurm_cluster):
    proc = slurm_cluster.run("srun", "-N", "4", "--ntasks-per-node", "1", "printenv", "SLURMD_NODENAME", timeout=60)
    assert sorted(proc.stdout.split()) == list(slurm_cluster.nodes)
    # job code (e.g. torch.distributed's MASTER_ADDR) resolves the node names to loopback
    for node in slurm_cluster.nodes:
        assert socket.gethostbyname(node) == "127.0.0.1"


@pytest.mark.timeout(60, func_only=True)
def test_sbatch_test_only_accepts_a_trivial_script(slurm_cluster, tmp_path):
    script = tmp_path / "trivial.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --time=1\nsrun hostname\n")
    proc = slurm_cluster.run("sbatch", "--test-only", str(script), timeout=30)
    assert "to start at" in proc.stderr, proc.stderr


@pytest.mark.timeout(180, func_only=True)
def test_submitit_job_on_two_nodes_returns_task_ranks(slurm_cluster, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        mem_gb=1,
        timeout_min=5,
        slurm_partition="debug",
        slurm_additional_parameters={"requeue": True},
    )
    job = executor.submit(os.getenv, "SLURM_PROCID")
    try:
        submission = job.paths.submission_file.read_text()
        assert sys.executable in submission  # the job runs this venv's python
        assert "#SBATCH --nodes=2" in submission and "#SBATCH --requeue" in submission
        waited = _wait_done(job, timeout=120)
        assert job.results() == ["0", "1"], (job.stdout(), job.stderr())
        print(f"submitit 2-node job done in {waited:.1f} s")
    finally:
        slurm_cluster.run("scancel", job.job_id, check=False)


def _wait_for_text(path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, path.read_text() if path.exists() else f"no output file {path}"
        time.sleep(0.1)


@pytest.mark.timeout(300, func_only=True)
def test_requeued_job_runs_again_once_released(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.out"
    submitted = time.monotonic()
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "--requeue", "--open-mode=append", f"--output={out}",
        "--wrap", 'echo "run restart=${SLURM_RESTART_COUNT:-0}"; sleep 300',
    ).stdout.strip().split(";")[0]  # fmt: skip
    try:
        slurm_cluster.wait_for_state(job_id, "RUNNING", timeout=120)
        print(f"submit -> RUNNING: {time.monotonic() - submitted:.2f} s")
        _wait_for_text(out, "restart=0", timeout=60)  # the batch script really runs: a preemption, not a launch race

        slurm_cluster.run("scontrol", "requeue", job_id)
        t_requeue = time.monotonic()
        # a requeued batch job is held back ~2 min (PENDING, reason BeginTime) unless released
        slurm_cluster.wait_for_state(job_id, "PENDING", timeout=120)
        released = False
        deadline = time.monotonic() + 120
        while (state := slurm_cluster.job_state(job_id))[0] != "RUNNING":
            assert state[0] in ("PENDING", "COMPLETING", "REQUEUED") and time.monotonic() < deadline, state
            released = slurm_cluster.release_requeued(job_id) or released
            time.sleep(0.1)
        print(f"requeue -> RUNNING again: {time.monotonic() - t_requeue:.2f} s (released: {released})")

        show = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
        assert "Restarts=1" in show, show
        _wait_for_text(out, "restart=1", timeout=60)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    slurm_cluster.wait_for_state(job_id, "CANCELLED", timeout=60)


@pytest.mark.timeout(180, func_only=True)
def test_submitit_notices_a_cancelled_job(slurm_cluster, tmp_path):
    if not slurm_cluster.accounting:
        pytest.skip("cluster runs without slurmdbd: submitit reads states only from sacct")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=1, cpus_per_task=1, mem_gb=1, timeout_min=5)
    job = executor.submit(time.sleep, 300)
    try:
        slurm_cluster.wait_for_state(job.job_id, "RUNNING", timeout=120)
        job.cancel()
        # force_check: submitit's own sacct polling backs off to once a minute (and later less)
        noticed = _wait_done(job, timeout=60, force_check=True)
        assert job.state.startswith("CANCELLED"), job.state
        print(f"submitit saw the cancellation after {noticed:.1f} s")
    finally:
        slurm_cluster.run("scancel", job.job_id, check=False)
