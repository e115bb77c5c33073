"""Run N training ranks on this machine; they start together and stop together.

    python launch/local.py --nproc 2 [--config configs/X.yaml] [--output-dir DIR] [key=value ...]

Each rank is a subprocess with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT) running the entry point
``pce_dist.train:main(argv)``, where ``argv`` is this command line minus ``--nproc``:
the trainer parses ``--config/--output-dir/key=value`` itself, so a command that works
here works under SLURM too. ``--nproc 1`` calls the entry in this process instead.

Why not torchrun: it is the right tool on a GPU box, but here we want the two things a
test or a laptop run needs and nothing else -- rank 0 on the terminal, every rank's
output in ``<output_dir>/logs/rank{r}.log``, and a clear line saying which rank failed
and how. Behaviour:

* Any rank exiting non-zero (or killed by a signal) stops the others: SIGTERM to each
  rank's process group (a rank and its loader workers), SIGKILL after a grace period.
  The launcher exits with that rank's code (128 + N for signal N).
* SIGINT/SIGTERM to the launcher are forwarded to every rank's group; a second one
  kills at once. Each rank also gets SIGKILL if the launcher itself dies (Linux).
* Ranks run in their own sessions, so a terminal Ctrl-C reaches them once, via us.

The hidden ``--entry module:function`` option swaps the entry point (tests use a tiny
one). This file imports only the standard library at the top, so it starts instantly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENTRY = "pce_dist.train:main"
GRACE_S = 10.0  # time a stopped rank gets to exit cleanly (flush logs) before SIGKILL
_TAIL_LINES = 20

# What each child runs: resolve "module:function", call it with the forwarded argv.
_BOOTSTRAP = (
    "import importlib, sys\n"
    "mod, _, fn = sys.argv[1].partition(':')\n"
    "rc = getattr(importlib.import_module(mod), fn)(sys.argv[2:])\n"
    "sys.exit(rc if isinstance(rc, int) else 0)\n"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/local.py", allow_abbrev=False,
                                description="Run N training ranks on this machine.")
    p.add_argument("--nproc", type=int, default=1, help="number of ranks (processes) to start")
    p.add_argument("--config", help="YAML file with config overrides")
    p.add_argument("--output-dir", help="run directory; default: output_dir from the config")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help=argparse.SUPPRESS)
    p.add_argument("--grace-s", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if ":" not in args.entry:
        p.error(f"--entry must look like module:function, got {args.entry!r}")
    return args


def forwarded_argv(args: argparse.Namespace) -> list[str]:
    """The trainer's own command line: everything except the launcher's options."""
    out = []
    if args.config:
        out += ["--config", args.config]
    if args.output_dir:
        out += ["--output-dir", args.output_dir]
    return out + list(args.overrides)


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """``--output-dir``, else the config's ``output_dir`` (also validates the config early)."""
    if args.output_dir:
        return Path(args.output_dir)
    from pce_dist.config import load_config

    return Path(load_config(args.config, args.overrides).output_dir)


def load_entry(spec: str) -> Callable[[list[str]], int | None]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_log(path: Path) -> IO[bytes]:
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


# ----------------------------------------------------------------------------- --nproc 1


class _Tee:
    """File-like that writes to the terminal stream and the rank-0 log."""

    def __init__(self, stream: IO[str], log: IO[bytes]) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._log.write(text.encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ...
        return getattr(self._stream, name)


def run_in_process(entry: str, argv: list[str], log_dir: Path) -> int:
    log = _open_log(log_dir / "rank0.log")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        rc = load_entry(entry)(argv)
    except SystemExit as exc:
        rc = exc.code
    except KeyboardInterrupt:
        rc = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 -- report like a crashed rank would
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = saved
        log.close()
    if rc is None:
        return 0
    if isinstance(rc, int):
        return rc
    print(rc, file=sys.stderr)  # SystemExit("message")
    return 1


# ----------------------------------------------------------------------------- --nproc N


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL this rank if the launcher dies (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pump(src: IO[bytes], *sinks: IO[bytes]) -> None:
    # Chunks, not lines: a progress bar redraws itself with "\r" and no newline, so a
    # line-by-line relay would show nothing until the end of each epoch.
    fd = src.fileno()
    for chunk in iter(lambda: os.read(fd, 65536), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()
    src.close()


class RankGroup:
    """The N rank processes: start, watch, stop. One process group (session) per rank."""

    def __init__(self, entry: str, argv: list[str], nproc: int, log_dir: Path, grace_s: float) -> None:
        self.nproc, self.log_dir, self.grace_s = nproc, log_dir, grace_s
        self.procs: list[subprocess.Popen] = []
        self.logs = [_open_log(log_dir / f"rank{r}.log") for r in range(nproc)]
        self.pumps: list[threading.Thread] = []
        self.stop_deadline: float | None = None
        self._start(entry, argv)

    def _env(self, rank: int, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.nproc),
                   LOCAL_WORLD_SIZE=str(self.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONUNBUFFERED="1")  # rank output reaches the logs as it happens
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _start(self, entry: str, argv: list[str]) -> None:
        port = _free_port()
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
        for p in self.procs:
            try:
                os.killpg(p.pid, sig)  # the rank and everything it started
            except (ProcessLookupError, PermissionError):
                pass

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.grace_s
            self.signal_all(sig)
        else:  # asked twice: no more patience
            self.signal_all(signal.SIGKILL)

    def wait(self) -> tuple[int, int] | None:
        """Block until every rank exited; return (rank, code) of the first failure, if any."""
        first_failure = None
        reported: set[int] = set()
        while len(reported) < self.nproc:
            for rank, p in enumerate(self.procs):
                code = p.poll()
                if code is None or rank in reported:
                    continue
                reported.add(rank)
                if code != 0 and first_failure is None and self.stop_deadline is None:
                    first_failure = (rank, code)
                    self._report_failure(rank, code)
                    self.request_stop()
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
        if rank != 0:  # its output did not go to the terminal: show the end of it
            self.logs[rank].flush()
            tail = log_path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
            msg += "\n" + "\n".join(f"[rank {rank}] {line}" for line in tail)
        print(msg, file=sys.stderr, flush=True)


def run_ranks(entry: str, argv: list[str], nproc: int, log_dir: Path, grace_s: float) -> int:
    group = RankGroup(entry, argv, nproc, log_dir, grace_s)
    interrupted: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not interrupted:
            print(f"[launch] got {signal.Signals(signum).name}; stopping {nproc} ranks", file=sys.stderr, flush=True)
        interrupted.append(signum)
        group.request_stop(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failure = group.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        return 128 + interrupted[0]
    if failure is not None:
        return _exit_status(failure[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if str(REPO_ROOT) not in sys.path:  # `python launch/local.py` puts launch/, not the repo, on the path
        sys.path.insert(1, str(REPO_ROOT))
    try:
        output_dir = resolve_output_dir(args)
    except ValueError as exc:
        print(f"launch/local.py: {exc}", file=sys.stderr)
        return 2
    log_dir = output_dir / "logs"
    if args.nproc == 1:
        return run_in_process(args.entry, forwarded_argv(args), log_dir)
    return run_ranks(args.entry, forwarded_argv(args), args.nproc, log_dir, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
