"""``launch/slurm.py`` against the real 4-node SLURM cluster of ``slurm_cluster.sh``.

The launcher runs as a user runs it (a subprocess); jobs are watched through squeue/sacct
with bounded waits. One uninterrupted 4-node job (``reference_job``) serves twice: as the
"trains to completion on 4 nodes" check, and as the reference a preempted, requeued and
resumed job must match bit for bit. Timings are printed (run with ``-s`` to see them).
The launcher's pieces that need no cluster are tested in tests/unit/test_slurm_job.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "slurm.py"
MAX_STEPS = 32
# 4 CPU-only ranks, one per node; every step logged (loss history per step) and a checkpoint
# every 4 steps (the preemption test signals once the first one exists).
TRAIN_ARGS = [
    "--nodes", "4", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--partition", "debug",
    "--config", "configs/digits.yaml", "model.num_experts=4", "dist.ep_size=4", f"train.max_steps={MAX_STEPS}",
    "train.log_every_steps=1", "checkpoint.every_steps=4", "checkpoint.keep_last=20", "data.num_workers=0",
    "dist.timeout_s=120", "tracking.system_metrics_interval_s=2",
    "tracking.system_metrics_nodes=all",  # the cluster's nodes share one local disk: one SQLite file is safe
]  # fmt: skip
JOB_TIMEOUT_S = 150  # one 4-rank attempt takes ~30 s on 2 cores
# while a preempted job goes around: running, exiting, held after the requeue, starting again
CYCLE_STATES = {"RUNNING", "COMPLETING", "REQUEUED", "PENDING", "CONFIGURING", "RESV_DEL_HOLD"}


def launch(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(cluster.client_env(), MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def submit(cluster, out: Path, digits_root: Path, *extra: str) -> tuple[str, float]:
    """Submits the training job; returns (job id, wall-clock time of the submission)."""
    submitted = time.time()
    proc = launch(cluster, *TRAIN_ARGS, "--output-dir", str(out), f"data.root={digits_root}", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^job id:\s+(\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    for what in ("output dir:", "logs:", "MLflow:", str(out)):
        assert what in proc.stdout, proc.stdout
    return match.group(1), submitted


def rank_log(out: Path, job_id: str, rank: int, stream: str = "err") -> str:
    path = out / "slurm" / job_id / f"{job_id}_{rank}_log.{stream}"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until_done(cluster, job_id: str, out: Path, timeout: float, release: bool = False) -> str:
    """Final state of the job; releases it from the post-requeue hold when ``release``
    (``SlurmCluster.release_requeued`` waits out the credential-revocation window)."""
    deadline = time.monotonic() + timeout
    while True:
        state, reason = cluster.job_state(job_id)
        if state not in CYCLE_STATES and state != "UNKNOWN":
            return state
        if time.monotonic() > deadline:
            cluster.run("scancel", job_id, check=False)
            raise AssertionError(f"job {job_id} still {state} ({reason}) after {timeout} s\n"
                                 f"{rank_log(out, job_id, 0)[-3000:]}")
        if release:
            cluster.release_requeued(job_id)
        time.sleep(0.2)


def mlflow_run(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run, however many attempts
    return client, runs[0]


def loss_history(out: Path) -> list[tuple[int, float, int]]:
    """Every logged (step, loss, timestamp_ms), in step order -- repeats included."""
    client, run = mlflow_run(out)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    return sorted((m.step, m.value, m.timestamp) for m in history)


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of ``shared.pt`` and every ``experts_r*.pt``."""
    out = {}
    for f in sorted([ckpt / "shared.pt", *ckpt.glob("experts_r*.pt")]):
        blob = torch.load(f, map_location="cpu", weights_only=True)
        out.update({f"{f.name}:model:{k}": v for k, v in blob["model"].items()})
        for name, state in blob["optimizer"].items():
            out.update({f"{f.name}:optim:{name}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def wait_for_checkpoint(out: Path, name: str, timeout: float) -> None:
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.exists() and latest.read_text().strip() >= name):
        assert time.monotonic() < deadline, f"no checkpoint {name} after {timeout} s"
        time.sleep(0.05)


def assert_no_drained_nodes(cluster) -> None:
    states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
    assert not [s for s in states if re.search(r"drain|down|fail", s)], states


@dataclass
class Finished:
    out: Path
    job_id: str
    submitted: float
    state: str


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, digits_root, tmp_path_factory) -> Finished:
    """The training job of ``TRAIN_ARGS``, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    job_id, submitted = submit(slurm_cluster, out, digits_root)
    state = wait_until_done(slurm_cluster, job_id, out, JOB_TIMEOUT_S)
    return Finished(out, job_id, submitted, state)


# ----------------------------------------------------------------------------- real jobs


@pytest.mark.timeout(240, func_only=True)
def test_four_node_job_trains_to_completion(slurm_cluster, reference_job):
    out, job_id = reference_job.out, reference_job.job_id
    assert reference_job.state == "COMPLETED", rank_log(out, job_id, 0)[-3000:]
    for rank in range(4):  # one task on each of the 4 nodes
        assert f"node={rank}(4), global_rank={rank}(4)" in rank_log(out, job_id, rank, "out")
    nodes = slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList").stdout.split()
    assert nodes and nodes[0] == "node[1-4]", nodes

    _, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["world_size"], tags["ep_size"], tags["launcher"]) == ("4", "4", "slurm")
    assert tags["slurm_job_id"] == job_id and tags["restart_count"] == "0"
    assert run.data.params["model.num_experts"] == "4"
    # one system-metrics sampler per node (local rank 0 of each), each its own series
    assert {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")} == {f"node{n}" for n in range(4)}
    assert re.fullmatch(r"node0=[^,]+,node1=[^,]+,node2=[^,]+,node3=[^,]+", tags["nodes"]), tags["nodes"]
    history = loss_history(out)
    assert [s for s, _, _ in history] == list(range(1, MAX_STEPS + 1))
    first_step_s = history[0][2] / 1000 - reference_job.submitted
    print(f"\nsubmit -> first optimizer step: {first_step_s:.1f} s; "
          f"whole job: {history[-1][2] / 1000 - reference_job.submitted:.1f} s")
    assert_no_drained_nodes(slurm_cluster)


@pytest.mark.timeout(420, func_only=True)
def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster, digits_root, reference_job, tmp_path):
    out = tmp_path / "preempted"
    job_id, _ = submit(slurm_cluster, out, digits_root)
    try:
        wait_for_checkpoint(out, "step_00000004", timeout=JOB_TIMEOUT_S)
        t_signal = time.time()
        slurm_cluster.run("scancel", "--signal=USR2", job_id)  # what SLURM sends --signal-delay before the limit
        slurm_cluster.wait_for_state(job_id, "PENDING", timeout=90)
        t_requeued = time.time()
        state = wait_until_done(slurm_cluster, job_id, out, JOB_TIMEOUT_S, release=True)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    assert state == "COMPLETED", rank_log(out, job_id, 0)[-3000:]

    # the first attempt: every rank saved and exited 0, the batch script requeued the job
    stopped = [p for p in (out / "checkpoints").glob("step_*") if json.loads((p / "meta.json").read_text())
               ["reason"] == "signal"]  # fmt: skip
    assert len(stopped) == 1, sorted(p.name for p in (out / "checkpoints").iterdir())
    stop_step = int(stopped[0].name.split("_")[1])
    assert 4 <= stop_step < MAX_STEPS
    steps = slurm_cluster.run("sacct", "-D", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode").stdout
    assert steps.count(f"{job_id}.0|COMPLETED|0:0") == 2, steps  # both attempts' srun steps: all ranks exit 0
    assert "requeueing job" in rank_log(out, job_id, 0, "out")
    assert "resumed from" in rank_log(out, job_id, 0)
    assert "attempt 2 (1 of 3 requeues used)" in rank_log(out, job_id, 0)  # SLURM_RESTART_COUNT reaches the tasks

    # resumed without repeating or losing a step, bit-identical to the uninterrupted job
    history, reference = loss_history(out), loss_history(reference_job.out)
    assert [s for s, _, _ in history] == list(range(1, MAX_STEPS + 1))
    assert [v for _, v, _ in history] == [v for _, v, _ in reference]
    final = f"step_{MAX_STEPS:08d}"
    a = checkpoint_tensors(reference_job.out / "checkpoints" / final)
    b = checkpoint_tensors(out / "checkpoints" / final)
    assert a.keys() == b.keys() and any(".experts." in k for k in a) and any(":optim:" in k for k in a)
    for key in a:
        if key.endswith((".running_mean", ".running_var")):
            # averaged over the ranks at every checkpoint (distributed.norm_stats.average); the
            # stop checkpoint adds one averaging the reference run does not have. The running
            # update is linear, so the final average is the same -- to float rounding.
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key

    _, run = mlflow_run(out)  # one MLflow run, continued
    assert run.data.tags["restart_count"] == "1" and run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "4"
    resumed_ms = next(t for s, _, t in history if s == stop_step + 1)
    print(f"\nsignal -> requeued (PENDING): {t_requeued - t_signal:.1f} s; signal -> first resumed step "
          f"(hold released after {slurm_cluster.RELEASE_AFTER_S:.0f} s): {resumed_ms / 1000 - t_signal:.1f} s; "
          f"stopped at step {stop_step}")
    assert_no_drained_nodes(slurm_cluster)


@pytest.mark.timeout(240, func_only=True)
def test_exhausted_requeue_budget_ends_with_message_and_checkpoint(slurm_cluster, digits_root, reference_job,
                                                                    tmp_path):
    # reference_job first: both jobs at once would share 2 cores and be slow
    out = tmp_path / "exhausted"
    job_id, _ = submit(slurm_cluster, out, digits_root, "--max-requeues", "0")
    try:
        wait_for_checkpoint(out, "step_00000004", timeout=JOB_TIMEOUT_S)
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
        state = wait_until_done(slurm_cluster, job_id, out, JOB_TIMEOUT_S)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    assert state == "FAILED"  # not finished: a clear failure, not a silent COMPLETED
    err = rank_log(out, job_id, 0)
    assert "NotRequeuedError" in err and "--max-requeues 0" in err and "Submit the same command again" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert meta["reason"] == "signal" and meta["world_size"] == 4
    for rank in (1, 2, 3):  # the other ranks returned normally: submitit wrote their results
        assert (out / "slurm" / job_id / f"{job_id}_{rank}_result.pkl").exists()
        assert "Traceback" not in rank_log(out, job_id, rank) and "CANCELLED" not in rank_log(out, job_id, rank)
    assert "requeueing job" not in rank_log(out, job_id, 0, "out")
    assert_no_drained_nodes(slurm_cluster)


# ----------------------------------------------------------------------------- before submission


def _script_of(dry_run_stdout: str) -> str:
    match = re.search(r"==> sbatch script[^\n]*\n(.*?)==> resolved config", dry_run_stdout, re.S)
    assert match, dry_run_stdout
    return match.group(1)


@pytest.mark.timeout(60, func_only=True)
def test_dry_run_script_passes_sbatch_test_only(slurm_cluster, tmp_path):
    out = tmp_path / "dry"
    proc = launch(slurm_cluster, *TRAIN_ARGS, "--output-dir", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = _script_of(proc.stdout)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "#SBATCH --partition=debug", "scontrol requeue", "-m submitit.core._submit"):
        assert line in script, script
    assert "dist:\n  backend: gloo\n  ep_size: 4" in proc.stdout  # the resolved config, CPU mode
    assert not out.exists()  # nothing submitted, nothing written
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    test_only = slurm_cluster.run("sbatch", "--test-only", str(path), timeout=30)
    assert "to start at" in test_only.stderr, test_only.stderr


@pytest.mark.timeout(90, func_only=True)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--partition", "gpu-nope"], "--partition 'gpu-nope' does not exist on this cluster; choose from ['debug']"),
        (["--nodes", "8"], "--nodes 8 > 4 (nodes in partition 'debug')"),
        (["model.no_such_key=1"], "unknown config key 'model.no_such_key'"),
        (["--nodes", "2", "dist.ep_size=4"], "'dist.ep_size' = 4: must divide the world size 2"),
        (["--gpus-per-node", "1"], "sbatch --test-only rejects the job"),  # no GPUs on this cluster
    ],
    ids=["nodes-0", "unknown-partition", "too-many-nodes", "unknown-config-key", "ep-size", "no-gpus"],
)
def test_bad_options_fail_before_submission(slurm_cluster, tmp_path, args, message):
    out = tmp_path / "bad"
    name = f"pce_bad_{os.getpid()}_{time.monotonic_ns()}"
    proc = launch(slurm_cluster, *TRAIN_ARGS, "--output-dir", str(out), "--job-name", name, *args)  # last wins
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "launch/slurm.py: error:" in proc.stderr, proc.stderr
    assert not out.exists()
    assert slurm_cluster.run("squeue", "-h", "-t", "all", "--name", name).stdout.strip() == ""
