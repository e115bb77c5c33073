"""Heartbeats: which rank stopped, so a failed collective names the culprit, not the victim.

When one rank hangs (SIGSTOP, a stuck NFS read, a dead node), the others notice only
when a collective times out after ``dist.timeout_s`` -- and gloo/NCCL then report *their
own* failure ("Timed out waiting ... for recv"), so the launcher used to name a healthy
rank. Each rank therefore runs a small daemon thread that rewrites
``<output_dir>/logs/heartbeat/rank{r}.json`` every ``dist.heartbeat_s`` seconds::

    {"rank": 1, "pid": 4711, "host": "node3", "written_at": 1733090000.1,
     "step": 220, "phase": "train", "progress_at": 1733089990.0}

``written_at`` says the *process* is alive (a SIGSTOPped or dead process stops writing);
``step``/``phase`` say how far its training loop got (set by ``beat`` from the main
thread: an attribute store, no I/O). A reader -- a rank whose collective failed, or the
local launcher watching its ranks -- calls ``diagnose`` to turn the files into a sentence:
the ranks whose file went stale, else the ranks that are furthest behind.

The directory lives in the run directory, so it works on one node and, with a shared file
system, across SLURM nodes. Files from an earlier attempt are ignored by ``since``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_DIR = "heartbeat"


def heartbeat_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "logs" / HEARTBEAT_DIR


class Heartbeat:
    """This rank's heartbeat writer. ``start()`` launches the thread; ``beat`` records progress."""

    def __init__(self, directory: str | Path, rank: int, interval_s: float) -> None:
        self.path = Path(directory) / f"rank{rank}.json"
        self.rank, self.interval_s = rank, interval_s
        self.step, self.phase, self.progress_at = 0, "start", time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int, phase: str) -> None:
        """Main thread: the loop reached ``step`` in ``phase`` (cheap: no I/O)."""
        self.step, self.phase, self.progress_at = step, phase, time.time()

    def write(self) -> None:
        record = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "written_at": time.time(),
                  "step": self.step, "phase": self.phase, "progress_at": self.progress_at}
        tmp = self.path.with_name(self.path.name + ".part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full or read-only disk must not kill training; the diagnosis just knows less

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def start(self) -> Heartbeat:
        self.write()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def close(self, phase: str = "exited") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
        self.phase = phase
        self.write()


@dataclass(frozen=True)
class RankBeat:
    rank: int
    pid: int
    host: str
    written_at: float
    step: int
    phase: str


def read_heartbeats(directory: str | Path, world_size: int, since: float = 0.0) -> dict[int, RankBeat]:
    """The readable heartbeat of each rank written after ``since`` (missing ranks absent)."""
    out = {}
    for rank in range(world_size):
        try:
            raw = json.loads((Path(directory) / f"rank{rank}.json").read_text())
            beat = RankBeat(rank, int(raw["pid"]), str(raw["host"]), float(raw["written_at"]), int(raw["step"]),
                            str(raw["phase"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if beat.written_at >= since:
            out[rank] = beat
    return out


def stale_ranks(beats: dict[int, RankBeat], world_size: int, stale_after_s: float,
                now: float | None = None) -> dict[int, float | None]:
    """``{rank: seconds since its last heartbeat}`` for ranks silent > ``stale_after_s``
    (``None``: no heartbeat at all). Ranks that exited cleanly are never stale."""
    now = time.time() if now is None else now
    out: dict[int, float | None] = {}
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            out[rank] = None
        elif beat.phase != "exited" and now - beat.written_at > stale_after_s:
            out[rank] = now - beat.written_at
    return out


def diagnose(directory: str | Path, world_size: int, stale_after_s: float, *, since: float = 0.0,
             exclude: int | None = None) -> str | None:
    """One sentence naming the rank(s) that stopped, or ``None`` when nothing points at one.

    A rank whose heartbeat went silent beats a rank that is merely behind: a frozen
    process cannot be waiting for anyone. ``exclude`` is the caller's own rank.
    """
    beats = read_heartbeats(directory, world_size, since)
    silent = {r: age for r, age in stale_ranks(beats, world_size, stale_after_s).items() if r != exclude}
    if beats and silent:
        parts = []
        for rank, age in sorted(silent.items()):
            beat = beats.get(rank)
            if beat is None:
                parts.append(f"rank {rank} never wrote a heartbeat")
            else:
                parts.append(f"rank {rank} (pid {beat.pid} on {beat.host}) stopped responding: no heartbeat for "
                             f"{age:.0f} s, last seen at step {beat.step} ({beat.phase})")
        return "; ".join(parts)
    alive = {r: b for r, b in beats.items() if b.phase != "exited"}
    if len(alive) > 1:
        lowest = min(b.step for b in alive.values())
        behind = [r for r, b in sorted(alive.items()) if b.step == lowest]
        if len(behind) < len(alive):
            return (f"rank(s) {', '.join(map(str, behind))} are behind at step {lowest} "
                    f"(others reached step {max(b.step for b in alive.values())})")
    return None
