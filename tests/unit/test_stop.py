"""``pce_dist.stop``: one owner of the stop signals; a second SIGTERM ends the process at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from pce_dist import stop

REPO = Path(__file__).resolve().parents[2]


def test_first_signal_is_recorded_and_later_ones_do_not_overwrite_it():
    previous = {s: signal.getsignal(s) for s in stop.STOP_SIGNALS}
    request = stop.StopRequest().install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.requested and request.name == "SIGUSR2"
        request.clear()
        assert not request.requested and request.name == ""
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_second_sigterm_exits_at_once_without_running_cleanup():
    code = textwrap.dedent("""
        import os, signal, sys, time
        from pce_dist import stop
        request = stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.name == "SIGTERM"
        print("first recorded", flush=True)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            print("cleanup ran", flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "first recorded" in res.stdout and "cleanup ran" not in res.stdout
