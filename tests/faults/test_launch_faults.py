"""The launcher refuses bad input before any rank starts, and survives a full log disk."""

from __future__ import annotations

import os
import threading

import pytest
from runs import finish, launch

from pce_dist.launch.ranks import _pump


@pytest.mark.parametrize("overrides, nproc, culprit", [
    (["model.no_such_key=1"], 2, "model.no_such_key"),
    (["dist.ep_size=2"], 3, "dist.ep_size"),  # divides num_experts=4, not 3 ranks
    (["dist.ep_size=4"], 2, "dist.ep_size"),  # more expert-parallel ranks than ranks
    (["data.max_skipped_fraction=2"], 2, "data.max_skipped_fraction"),
])
def test_bad_config_fails_before_any_rank_starts_with_output_dir(tmp_path, overrides, nproc, culprit):
    out = tmp_path / "run"
    stdout = finish(launch(["--nproc", str(nproc), "--config", "configs/digits.yaml", "--output-dir", str(out),
                            *overrides]), timeout_s=60)
    assert f"launch/local.py: error: config key '{culprit}'" in stdout or f"unknown config key '{culprit}'" in stdout
    assert "Traceback" not in stdout
    assert not out.exists(), "a rank started (or the launcher wrote logs) for a config that cannot run"


def test_bad_config_exit_code_is_2(tmp_path):
    proc = launch(["--nproc", "2", "--output-dir", str(tmp_path / "run"), "dist.ep_size=3"])
    finish(proc, timeout_s=60)
    assert proc.returncode == 2


def test_relay_goes_on_when_the_log_disk_is_full():
    """``/dev/full`` answers every write with ENOSPC, as a full ``logs/`` would."""
    read_fd, write_fd = os.pipe()
    terminal_r, terminal_w = os.pipe()
    with open("/dev/full", "wb", buffering=0) as full, os.fdopen(terminal_w, "wb", buffering=0) as terminal, \
            os.fdopen(read_fd, "rb", buffering=0) as src:
        relay = threading.Thread(target=_pump, args=(src, terminal, full))
        relay.start()
        received = bytearray()

        def drain() -> None:
            while chunk := os.read(terminal_r, 65536):
                received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        payload = b"x" * 300_000  # more than a pipe buffer: a dead relay would block these writes
        os.write(write_fd, payload[:100_000])
        os.write(write_fd, payload[100_000:])
        os.close(write_fd)
        relay.join(10)
    reader.join(10)
    os.close(terminal_r)
    assert bytes(received) == payload and not relay.is_alive()

