"""The N rank processes of ``launch/local.py``: start them, relay rank 0, watch, stop.

``pce_dist.launch.local`` decides *what* runs (the entry, its argv, the config's output dir
and heartbeat timeout); this module owns the processes. Why each piece is the way it is:

* one session (process group) per rank, so a terminal Ctrl-C reaches a rank once, via the
  launcher, and SIGKILL after the grace time takes the rank's loader workers with it;
* ``PR_SET_PDEATHSIG``: a rank dies with the launcher instead of training on unwatched;
* rank 0's output is relayed in chunks, not lines (a progress bar redraws with ``\r``), and
  the relay never stops draining the pipe, even when its log file fails;
* a stop request goes to each rank's *main* process only -- loader workers would die of it;
  the ranks agree, checkpoint and exit 3 (``pce_dist.stop``).

Standard library only, so the launcher starts instantly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 10.0  # after another rank failed: time a rank gets to exit (flush logs) before SIGKILL
STOP_GRACE_S = 300.0  # after a stop request: the next log interval + one checkpoint must fit in it
_TAIL_LINES = 20

# What each child runs: own the stop signals first (pce_dist's own entries; before the
# heavy imports, so no signal meets Python's default action), then resolve
# "module:function" and call it with the forwarded argv.
_BOOTSTRAP = (
    "import importlib, sys\n"
    "mod, _, fn = sys.argv[1].partition(':')\n"
    "if mod.startswith('pce_dist.'):\n"
    "    import pce_dist.stop; pce_dist.stop.install()\n"
    "rc = getattr(importlib.import_module(mod), fn)(sys.argv[2:])\n"
    "sys.exit(rc if isinstance(rc, int) else 0)\n"
)


@dataclass(frozen=True)
class RunPlan:
    """What the launcher needs from the config: where the run writes, how long a rank may
    stay silent. ``None`` fields: a custom ``--entry`` whose argv is not a pce_dist config."""

    output_dir: Path
    heartbeat_dir: Path | None = None
    stale_after_s: float | None = None  # dist.timeout_s: silent this long = the job fails
    heartbeat_s: float = 5.0  # dist.heartbeat_s


def open_log(path: Path) -> IO[bytes]:
    """Append, with a header, so a resumed run keeps the logs of its earlier attempts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("ab", buffering=0)
    f.write(f"===== launch/local.py {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
    return f


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL this rank if the launcher dies (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pump(src: IO[bytes], *sinks: IO[bytes]) -> None:
    # Chunks, not lines: a progress bar redraws itself with "\r" and no newline, so a
    # line-by-line relay would show nothing until the end of each epoch. A sink that fails
    # (ENOSPC on the log) is dropped with one line on stderr: the relay must go on
    # draining the pipe, or rank 0 blocks on its next print and the job dies later of a
    # misleading collective timeout.
    fd = src.fileno()
    live = list(sinks)
    for chunk in iter(lambda: os.read(fd, 65536), b""):
        for sink in list(live):
            try:
                sink.write(chunk)
                sink.flush()
            except (OSError, ValueError) as exc:
                live.remove(sink)
                name = getattr(sink, "name", "?")
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"[launch] cannot write rank 0's output to {name}: {exc}; "
                                     "relaying to the terminal only\n")
                    sys.stderr.flush()
    src.close()


class RankGroup:
    """The N rank processes: start, watch, stop. One process group (session) per rank."""

    def __init__(self, entry: str, argv: list[str], nproc: int, plan: RunPlan, grace_s: float,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self.nproc, self.plan, self.grace_s, self.stop_grace_s = nproc, plan, grace_s, stop_grace_s
        self.log_dir = plan.output_dir / "logs"
        self.procs: list[subprocess.Popen] = []
        self.logs = [open_log(self.log_dir / f"rank{r}.log") for r in range(nproc)]
        self.pumps: list[threading.Thread] = []
        self.stop_deadline: float | None = None
        self.started_at = time.time()
        self._next_watch = 0.0
        self._start(entry, argv)

    def _env(self, rank: int, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.nproc),
                   LOCAL_WORLD_SIZE=str(self.nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONUNBUFFERED="1")  # rank output reaches the logs as it happens
        env.pop("NODE_RANK", None)  # one node: a value left in the user's shell names no node here
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _start(self, entry: str, argv: list[str]) -> None:
        from pce_dist.distributed.rendezvous import free_port

        port = free_port()
        cmd = [sys.executable, "-c", _BOOTSTRAP, entry, *argv]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        for rank in range(self.nproc):
            out = subprocess.PIPE if rank == 0 else self.logs[rank]
            err = subprocess.PIPE if rank == 0 else subprocess.STDOUT
            self.procs.append(subprocess.Popen(cmd, env=self._env(rank, port), stdout=out, stderr=err,
                                               start_new_session=True, preexec_fn=preexec))
        # Threads only after every fork: preexec_fn and threads do not mix.
        rank0 = self.procs[0]
        for src, term in ((rank0.stdout, sys.stdout.buffer), (rank0.stderr, sys.stderr.buffer)):
            t = threading.Thread(target=_pump, args=(src, term, self.logs[0]), daemon=True)
            t.start()
            self.pumps.append(t)

    def signal_all(self, sig: int) -> None:
        """``sig`` to every rank's main process; SIGKILL goes to each whole process group."""
        for p in self.procs:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(p.pid, sig)  # the rank and everything it started
                elif p.poll() is None:
                    os.kill(p.pid, sig)  # loader workers would die of it: the rank stops them itself
            except (ProcessLookupError, PermissionError):
                pass

    def request_stop(self, sig: int = signal.SIGTERM, grace_s: float | None = None) -> None:
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + (self.grace_s if grace_s is None else grace_s)
            self.signal_all(sig)
        else:  # asked twice: no more patience
            self.signal_all(signal.SIGKILL)

    def _silent_ranks(self, stale_after_s: float) -> dict[int, str]:
        """Running ranks whose heartbeat went silent for ``stale_after_s``, with the reason."""
        if self.plan.heartbeat_dir is None:
            return {}
        from pce_dist.distributed.heartbeat import diagnose, read_heartbeats, stale_ranks

        beats = read_heartbeats(self.plan.heartbeat_dir, self.nproc, since=self.started_at)
        silent = {r for r, age in stale_ranks(beats, self.nproc, stale_after_s).items()
                  if age is not None and self.procs[r].poll() is None}
        if not silent:
            return {}
        why = diagnose(self.plan.heartbeat_dir, self.nproc, stale_after_s, since=self.started_at) or ""
        return {rank: why for rank in sorted(silent)}

    def _watch_heartbeats(self) -> tuple[int, int] | None:
        """Once a second: a rank silent for ``dist.timeout_s`` fails the job, named."""
        now = time.monotonic()
        if self.plan.stale_after_s is None or self.stop_deadline is not None or now < self._next_watch:
            return None
        self._next_watch = now + 1.0
        silent = self._silent_ranks(self.plan.stale_after_s)
        if not silent:
            return None
        rank, why = next(iter(silent.items()))
        print(f"[launch] {why}; failing the job (dist.timeout_s={self.plan.stale_after_s:g})",
              file=sys.stderr, flush=True)
        self.request_stop()
        return rank, 1

    def wait(self) -> tuple[int, int] | None:
        """Block until every rank exited; return (rank, code) of the first failure, if any."""
        first_failure = None
        reported: set[int] = set()
        self.codes: dict[int, int] = {}
        while len(reported) < self.nproc:
            for rank, p in enumerate(self.procs):
                code = p.poll()
                if code is None or rank in reported:
                    continue
                reported.add(rank)
                self.codes[rank] = code
                if code != 0 and first_failure is None and self.stop_deadline is None:
                    first_failure = (rank, code)
                    self._report_failure(rank, code)
                    self.request_stop()
            if first_failure is None:
                first_failure = self._watch_heartbeats()
            if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                self.signal_all(signal.SIGKILL)
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)  # leftovers a rank started and did not reap
        for t in self.pumps:
            t.join(5)
        for f in self.logs:
            f.close()
        return first_failure

    def _report_failure(self, rank: int, code: int) -> None:
        log_path = self.log_dir / f"rank{rank}.log"
        msg = f"[launch] rank {rank} {_describe(code)}; stopping the other ranks (log: {log_path})"
        # A rank that fails first may be the victim: it timed out waiting for a silent peer.
        if self.plan.stale_after_s is not None:
            silent = self._silent_ranks(3 * self.plan.heartbeat_s)
            if silent:
                msg = (f"[launch] {next(iter(silent.values()))}; rank {rank} {_describe(code)} waiting for it; "
                       f"stopping the job (log: {log_path})")
        if rank != 0:  # its output did not go to the terminal: show the end of it
            self.logs[rank].flush()
            tail = log_path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
            msg += "\n" + "\n".join(f"[rank {rank}] {line}" for line in tail)
        print(msg, file=sys.stderr, flush=True)


# What a signal to the launcher becomes for the ranks: a stop request (pce_dist.stop).
_FORWARD = {signal.SIGINT: signal.SIGTERM, signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
            signal.SIGUSR2: signal.SIGUSR2}
EXIT_STOPPED = 3  # pce_dist.stop.EXIT_STOPPED; not imported so the launcher starts instantly


def run_ranks(entry: str, argv: list[str], nproc: int, plan: RunPlan, grace_s: float,
              stop_grace_s: float = STOP_GRACE_S) -> int:
    """Run ``nproc`` ranks to the end; the launcher's exit code (3: every rank stopped after a
    checkpoint; 128 + N: stopped by signal N; else the first failing rank's code)."""
    group = RankGroup(entry, argv, nproc, plan, grace_s, stop_grace_s)
    interrupted: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not interrupted:
            print(f"[launch] got {signal.Signals(signum).name}; asking {nproc} ranks to checkpoint and stop "
                  f"(a second signal kills them)", file=sys.stderr, flush=True)
        interrupted.append(signum)
        group.request_stop(_FORWARD[signum], grace_s=stop_grace_s)

    previous = {s: signal.signal(s, forward) for s in _FORWARD}
    try:
        failure = group.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = set(group.codes.values())
    if codes == {EXIT_STOPPED}:  # every rank checkpointed and stopped
        return EXIT_STOPPED
    if failure is not None and not interrupted:
        return _exit_status(failure[1])
    if interrupted:
        return 128 + interrupted[0]
    bad = [c for c in group.codes.values() if c != 0]
    return _exit_status(bad[0]) if bad else 0
