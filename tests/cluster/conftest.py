"""Fixtures for tests against the real local SLURM cluster of ``slurm_cluster.sh``.

``slurm_cluster`` (session scope) makes sure the cluster is up by running
``slurm_cluster.sh start`` (idempotent; the first run may install Debian packages) and yields a
:class:`SlurmCluster`. While the session runs, ``SLURM_CONF`` (and ``PCE_SLURM_DIR``) are set in
``os.environ`` so that anything spawning ``sbatch``/``srun`` -- submitit included -- talks to
this cluster.

* A cluster that was already up before the session is left running (a CI script may start it
  once and stop it at the end); one that this fixture started is stopped at the end.
* If the cluster cannot be started, the tests using it fail with the script's output and log
  tail. ``PCE_SKIP_CLUSTER=1`` skips them instead.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("slurm_cluster.sh")
# the first start may run apt-get install (about a minute); later ones take seconds
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 180
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}  # fmt: skip


def _script(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            env[key.strip()] = value.strip()
    return env


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """Handle on the running test cluster."""

    env: dict[str, str]  # the variables a client needs (SLURM_CONF, PCE_SLURM_DIR)
    state_dir: Path
    accounting: bool  # slurmdbd is running, so sacct (and submitit's job states) work
    started_here: bool
    nodes: tuple[str, ...] = field(default=("node1", "node2", "node3", "node4"))
    RELEASE_AFTER_S: ClassVar[float] = 2.0  # a requeued job is held at least this long (release_requeued)
    _held_since: dict[str, float] = field(default_factory=dict, repr=False)  # job id -> first seen held

    def client_env(self) -> dict[str, str]:
        """os.environ plus this cluster's variables, without an enclosing job's id."""
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_JOBID")}
        env.update(self.env)
        return env

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a slurm client command (sbatch, squeue, ...) against this cluster."""
        proc = subprocess.run(
            list(args),
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.client_env(),
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def job_state(self, job_id: str) -> tuple[str, str]:
        """(state, reason) of a job from the controller (squeue also lists finished jobs for
        MinJobAge=300 s), then from accounting; ("UNKNOWN", "") when neither knows it."""
        proc = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T|%r", check=False, timeout=20)
        line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
        if line:
            state, _, reason = line.partition("|")
            return state, reason
        if self.accounting:
            proc = self.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State", check=False, timeout=20)
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.split()[0], ""
        return "UNKNOWN", ""

    def wait_for_state(
        self, job_id: str, states: set[str] | str, timeout: float, poll_s: float = 0.1
    ) -> tuple[str, float]:
        """Polls until the job is in one of ``states``; returns (state, seconds waited).
        Fails when the job ends in another final state or ``timeout`` passes."""
        wanted = {states} if isinstance(states, str) else set(states)
        t0 = time.monotonic()
        state, reason = "UNKNOWN", ""
        while time.monotonic() - t0 < timeout:
            state, reason = self.job_state(job_id)
            if state in wanted:
                return state, time.monotonic() - t0
            if state in FINAL_STATES:
                break
            time.sleep(poll_s)
        show = self.run("scontrol", "show", "job", str(job_id), check=False, timeout=20)
        raise AssertionError(
            f"job {job_id}: wanted {sorted(wanted)}, got {state} ({reason}) after "
            f"{time.monotonic() - t0:.1f} s\n{show.stdout}{show.stderr}"
        )

    def release_requeued(self, job_id: str) -> bool:
        """Lets a requeued batch job start now, once it has been held long enough.

        After a requeue (``scontrol requeue``, or submitit requeueing itself on timeout or
        preemption) slurmctld holds the job ~2 min in PENDING with reason BeginTime. Releasing
        it within the same second as the requeue makes slurmd refuse the new launch ("Killing
        non-startable batch job: Job credential revoked") and the job ends FAILED; SLURM's hold
        exists to keep clear of exactly this. So the job is released only after it has been
        seen held for ``RELEASE_AFTER_S``. Call it while polling; returns True on release."""
        state, reason = self.job_state(job_id)
        if (state, reason) != ("PENDING", "BeginTime"):
            self._held_since.pop(job_id, None)
            return False
        held_since = self._held_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - held_since < self.RELEASE_AFTER_S:
            return False
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", timeout=20)
        self._held_since.pop(job_id, None)
        return True

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted((self.state_dir / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {path} -----\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("PCE_SKIP_CLUSTER") == "1":
        pytest.skip("PCE_SKIP_CLUSTER=1: cluster tests skipped")

    was_up = _script("status", timeout=60).returncode == 0
    t0 = time.monotonic()
    try:
        proc = _script("start", timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        if not was_up:
            _script("stop", timeout=STOP_TIMEOUT_S)
        pytest.fail(
            f"{SCRIPT} start did not finish in {START_TIMEOUT_S} s\n{_tail(out)}\n{_tail(err)}",
            pytrace=False,
        )
    if proc.returncode != 0:
        if not was_up:
            # leave nothing half-started behind (the logs stay in the state dir)
            _script("stop", timeout=STOP_TIMEOUT_S)
        pytest.fail(
            f"{SCRIPT} start failed (exit {proc.returncode}); set PCE_SKIP_CLUSTER=1 to skip the "
            f"cluster tests instead\n--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}",
            pytrace=False,
        )
    exports = _parse_exports(proc.stdout)
    if "SLURM_CONF" not in exports:
        pytest.fail(f"{SCRIPT} start printed no 'export SLURM_CONF=' line:\n{proc.stdout}", pytrace=False)
    state_dir = Path(exports.get("PCE_SLURM_DIR", Path(exports["SLURM_CONF"]).parent))
    conf = Path(exports["SLURM_CONF"]).read_text()
    cluster = SlurmCluster(
        env=exports,
        state_dir=state_dir,
        accounting="accounting_storage/slurmdbd" in conf,
        started_here=not was_up,
    )
    print(f"\nslurm cluster {'started' if not was_up else 'already up'} in {time.monotonic() - t0:.1f} s")

    with pytest.MonkeyPatch.context() as mp:
        for key, value in exports.items():
            mp.setenv(key, value)
        mp.delenv("SLURM_JOB_ID", raising=False)
        mp.delenv("SLURM_JOBID", raising=False)
        yield cluster

    if not was_up:
        stop = _script("stop", timeout=STOP_TIMEOUT_S)
        if stop.returncode != 0:
            # teardown problems are reported, not hidden
            raise RuntimeError(f"{SCRIPT} stop failed:\n{stop.stdout}\n{stop.stderr}")
