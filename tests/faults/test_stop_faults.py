"""Stops and hangs as a user meets them, on real 2-rank digits runs through ``launch/local.py``.

Each test asserts what the user sees: the exit code, the line naming the culprit, the
MLflow status, ``latest`` intact and loadable, and -- for every stop -- a resumed run whose
logged losses equal the uninterrupted run's at every step.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from runs import digits_args, finish, heartbeat, history, launch, mlflow_run, wait_for_step

OVERRIDES = ("dist.ep_size=2", "train.max_steps=40", "train.log_every_steps=5", "checkpoint.keep_last=5")
COMPARED = ("train/loss", "train/ce", "train/accuracy", "train/lr")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_root):
    """The uninterrupted run every stopped-and-resumed run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    stdout = finish(launch(digits_args(out, digits_root, *OVERRIDES)))
    assert "test accuracy:" in stdout, stdout[-3000:]
    return out


def _resumed_equals_reference(out: Path, reference: Path) -> None:
    stdout = finish(launch(digits_args(out, digits_root_of(reference), *OVERRIDES)))
    assert "test accuracy:" in stdout, stdout[-3000:]
    assert "resumed from" in (out / "logs" / "rank0.log").read_text()
    for key in COMPARED:
        a, b = history(reference, key), history(out, key)
        assert sorted(a) == sorted(b) == list(range(5, 41, 5)), (key, sorted(a), sorted(b))
        assert a == b, f"{key} differs after the stop and resume: {a} vs {b}"
    for key in ("eval/accuracy", "eval/loss"):
        assert history(reference, key) == history(out, key), key
    _, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["restart_count"] == "1"


def digits_root_of(run_dir: Path) -> str:
    for line in (run_dir / "config.yaml").read_text().splitlines():
        if line.strip().startswith("root:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no data.root in config.yaml")


def _listening_addresses(pids: list[int]) -> list[str]:
    addrs = []
    for pid in pids:
        try:
            procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            addrs += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    return addrs


def _assert_stopped_cleanly(proc_stdout: str, code: int, out: Path, culprit: str) -> None:
    assert code == 3, proc_stdout[-3000:]
    assert "test accuracy" not in proc_stdout, "a stopped run must not report a final accuracy"
    assert f"stopped by {culprit}" in proc_stdout, proc_stdout[-2000:]
    _, run = mlflow_run(out)
    assert run.info.status == "KILLED"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "meta.json").is_file()


@pytest.mark.slow
def test_sigusr1_to_rank1_stops_every_rank_and_resumes_exactly(tmp_path, digits_root, reference):
    out = tmp_path / "run"
    proc = launch(digits_args(out, digits_root, *OVERRIDES))
    wait_for_step(out, 12, proc)
    pids = [heartbeat(out, r)["pid"] for r in (0, 1)]
    listening = _listening_addresses(pids)
    assert listening and all(ipaddress.ip_address(a).is_loopback for a in listening), listening
    os.kill(pids[1], signal.SIGUSR1)
    stdout = finish(proc)
    _assert_stopped_cleanly(stdout, proc.returncode, out, "SIGUSR1 on rank 1")
    assert "got SIG" not in stdout  # the launcher was not involved
    _resumed_equals_reference(out, reference)


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_resumes_exactly(tmp_path, digits_root, reference):
    out = tmp_path / "run"
    proc = launch(digits_args(out, digits_root, *OVERRIDES))
    wait_for_step(out, 12, proc)
    proc.send_signal(signal.SIGTERM)
    stdout = finish(proc)
    _assert_stopped_cleanly(stdout, proc.returncode, out, "SIGTERM on rank 0, SIGTERM on rank 1")
    _resumed_equals_reference(out, reference)


def test_second_sigterm_ends_the_job_at_once_and_keeps_latest(tmp_path, digits_root):
    out = tmp_path / "run"
    proc = launch(digits_args(out, digits_root, *OVERRIDES, "checkpoint.every_steps=5", "train.log_every_steps=1000"))
    wait_for_step(out, 7, proc)  # after the checkpoint of step 5; the next stop agreement is far away
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout = finish(proc, timeout_s=30)
    assert time.monotonic() - started < 10, "the second SIGTERM did not end the job at once"
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    from pce_dist.checkpoint import full_model_state, resolve

    state, _ = full_model_state(resolve(out / "checkpoints" / latest))  # complete and loadable
    assert state


def test_hung_rank_fails_the_job_in_time_and_is_named(tmp_path, digits_root):
    out = tmp_path / "run"
    timeout_s = 20
    proc = launch(digits_args(out, digits_root, *OVERRIDES, f"dist.timeout_s={timeout_s}", "dist.heartbeat_s=1"))
    wait_for_step(out, 6, proc)
    pid1 = heartbeat(out, 1)["pid"]
    os.kill(pid1, signal.SIGSTOP)
    started = time.monotonic()
    try:
        stdout = finish(proc, timeout_s=timeout_s + 60)
    finally:
        try:
            os.kill(pid1, signal.SIGCONT)
            os.kill(pid1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - started
    assert proc.returncode not in (0, 3), stdout[-3000:]
    assert elapsed < timeout_s + 15, f"took {elapsed:.0f} s to fail (dist.timeout_s={timeout_s})"
    assert f"rank 1 (pid {pid1}" in stdout and "stopped responding" in stdout, stdout[-3000:]
    assert "[launch] rank 0 exited" not in stdout, "the launcher blamed the rank that was waiting"
