"""``python launch/local.py`` as a user runs it: exit codes, logs, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "local.py"
HERE = Path(__file__).resolve().parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(HERE)  # launch_entries; the launcher adds the repo itself
    env["E2E_PID_DIR"] = str(tmp_path / "pids")
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), *args]


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for a (container) init to reap it counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _assert_all_gone(pid_dir: Path, names: list[str], within_s: float = 5.0) -> None:
    pids = {name: int((pid_dir / name).read_text()) for name in names}
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
    for pid in survivors.values():
        os.kill(pid, signal.SIGKILL)  # do not leak them into the rest of the session
    assert not survivors, f"processes left behind: {survivors}"


def _wait_for(paths: list[Path], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)


def test_two_ranks_allreduce_and_exit_zero(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(_cmd("--nproc", "2", "--output-dir", str(out), "--entry", "launch_entries:allreduce_ok",
                              "model.num_experts=4"),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # rank 0 on the terminal, with the trainer's argv passed through
    assert "rank 0 of 2: sum=3 argv=['--output-dir', '" + str(out) + "', 'model.num_experts=4']" in res.stdout
    assert "rank 0 stderr line" in res.stderr
    assert "rank 1 of 2" not in res.stdout + res.stderr
    rank0 = (out / "logs" / "rank0.log").read_text()
    rank1 = (out / "logs" / "rank1.log").read_text()
    assert "rank 0 of 2: sum=3" in rank0 and "rank 0 stderr line" in rank0
    assert "rank 1 of 2: sum=3" in rank1 and "rank 1 stderr line" in rank1


def test_failing_rank_stops_the_others_quickly(tmp_path):
    start = time.monotonic()
    res = subprocess.run(_cmd("--nproc", "2", "--output-dir", str(tmp_path / "run"),
                              "--entry", "launch_entries:rank1_raises"),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 1
    assert elapsed < 20, f"launcher took {elapsed:.1f} s to give up"
    assert "[launch] rank 1 exited with code 1" in res.stderr
    assert "RuntimeError: rank 1 fails on purpose" in res.stderr  # the tail of rank 1's log
    _assert_all_gone(tmp_path / "pids", ["rank0", "rank1", "helper"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_are_forwarded_to_every_rank(tmp_path, sig):
    proc = subprocess.Popen(_cmd("--nproc", "2", "--output-dir", str(tmp_path / "run"),
                                 "--entry", "launch_entries:sleeper"),
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pid_dir = tmp_path / "pids"
    try:
        _wait_for([pid_dir / "rank0", pid_dir / "rank1"])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig
    assert f"got {signal.Signals(sig).name}" in err
    _assert_all_gone(pid_dir, ["rank0", "rank1"])


def test_single_rank_runs_in_process(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(_cmd("--output-dir", str(out), "--entry", "launch_entries:single", "a=1"),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 3  # the entry's return value is the exit code
    assert "rank_var=None argv=['--output-dir'" in res.stdout  # no torchrun variables: single process
    assert "'a=1']" in (out / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("output_dir", [True, False], ids=["output-dir", "config-output-dir"])
def test_bad_config_is_reported_before_any_rank_starts(tmp_path, output_dir):
    """The launcher checks the config itself, with or without ``--output-dir``: the message is
    the launcher's (a rank would say ``pce_dist.train: error``), and no rank wrote a log."""
    out = tmp_path / "run"
    args = ["--output-dir", str(out)] if output_dir else []
    res = subprocess.run(_cmd("--nproc", "2", *args, "model.no_such_key=1"),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "launch/local.py: error:" in res.stderr and "'model.no_such_key'" in res.stderr, res.stderr
    assert "pce_dist.train" not in res.stdout + res.stderr and "[launch] rank" not in res.stderr
    written = out if output_dir else tmp_path / "runs"  # config default: output_dir=runs/default
    assert not written.exists(), sorted(str(p) for p in written.rglob("*"))
