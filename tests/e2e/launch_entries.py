"""Tiny entry points for ``launch/local.py --entry launch_entries:<name>`` in the e2e tests.

They stand in for ``pce_dist.train:main(argv)``. Ranks that must be checked for
leftovers write their pid (and any helper's pid) to ``$E2E_PID_DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def _pid_dir() -> Path:
    path = Path(os.environ["E2E_PID_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record(name: str, pid: int) -> None:
    tmp = _pid_dir() / f".{name}.tmp"
    tmp.write_text(str(pid))
    tmp.rename(_pid_dir() / name)  # atomic: a reader never sees a half-written pid


def allreduce_ok(argv: list[str]) -> int:
    """Real gloo collective over the launcher's torchrun variables, then a clean exit."""
    import torch
    import torch.distributed as dist

    from pce_dist.config import DistConfig
    from pce_dist.distributed import DistEnv

    env = DistEnv.from_environ(DistConfig(timeout_s=30.0)).init()
    t = torch.tensor([env.rank + 1.0])
    dist.all_reduce(t)
    print(f"rank {env.rank} of {env.world_size}: sum={t.item():.0f} argv={argv}", flush=True)
    print(f"rank {env.rank} stderr line", file=sys.stderr, flush=True)
    env.destroy()
    return 0


def rank1_raises(argv: list[str]) -> int:
    """Rank 0 (and a helper process it started) would run for a minute; rank 1 crashes."""
    rank = int(os.environ["RANK"])
    _record(f"rank{rank}", os.getpid())
    if rank == 0:
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        _record("helper", helper.pid)
        time.sleep(60)
        return 0
    deadline = time.monotonic() + 20
    while not (_pid_dir() / "helper").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("rank 1 fails on purpose")


def sleeper(argv: list[str]) -> int:
    """Every rank waits to be stopped by a signal forwarded from the launcher."""
    _record(f"rank{os.environ['RANK']}", os.getpid())
    time.sleep(60)
    return 0


def single(argv: list[str]) -> int:
    """``--nproc 1`` runs this inside the launcher process."""
    print(f"in-process pid={os.getpid()} rank_var={os.environ.get('RANK')} argv={argv}")
    return 3
