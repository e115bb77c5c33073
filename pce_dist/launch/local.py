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

* Before any rank starts, the config is loaded and checked against ``--nproc``
  (``pce_dist.config.validate_world``: the same check every rank makes): a bad key or an
  ``dist.ep_size`` that does not divide the ranks exits 2 with the key named.
* Any rank exiting non-zero (or killed by a signal) stops the others: SIGTERM to each
  rank, SIGKILL to each rank's process group (the rank and its loader workers) after
  ``--grace-s``. The launcher exits with that rank's code (128 + N for signal N).
* A rank that stops responding (its heartbeat file, ``pce_dist.distributed.heartbeat``,
  goes silent for ``dist.timeout_s``: SIGSTOP, a dead node's NFS, ...) fails the job,
  named as the culprit -- not the rank whose collective then timed out waiting for it.
* SIGTERM, SIGINT or SIGUSR1 to the launcher is a *stop request*: it is forwarded to
  every rank's main process (SIGINT as SIGTERM; never to loader workers, which would die
  of it), the ranks agree, checkpoint and exit 3 (``pce_dist.stop``), and so does the
  launcher. A second signal, or ``--stop-grace-s`` without an exit, kills at once.
  Each rank also gets SIGKILL if the launcher itself dies (Linux).
* Ranks run in their own sessions, so a terminal Ctrl-C reaches them once, via us.
* Rank 0's output is relayed to the terminal and its log; a log write that fails (full
  disk) is reported once and the relay goes on to the terminal, so rank 0 never blocks on
  a full pipe.

The hidden ``--entry module:function`` option swaps the entry point (tests use a tiny
one). ``launch/local.py`` is the command line over ``main`` here; the rank processes
themselves are ``pce_dist.launch.ranks``. Standard library only at the top, so the
launcher starts instantly.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from pathlib import Path
from typing import IO, Callable

from pce_dist.launch.ranks import GRACE_S, STOP_GRACE_S, RunPlan, open_log, run_ranks

DEFAULT_ENTRY = "pce_dist.train:main"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/local.py", allow_abbrev=False,
                                description="Run N training ranks on this machine.")
    p.add_argument("--nproc", type=int, default=1, help="number of ranks (processes) to start")
    p.add_argument("--config", help="YAML file with config overrides")
    p.add_argument("--output-dir", help="run directory; default: output_dir from the config")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help=argparse.SUPPRESS)
    p.add_argument("--grace-s", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    p.add_argument("--stop-grace-s", type=float, default=STOP_GRACE_S,
                   help="after a stop request, seconds the ranks get to checkpoint and exit before SIGKILL")
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


def resolve_plan(args: argparse.Namespace) -> RunPlan:
    """Load and check the config of ``pce_dist.train`` before any rank starts.

    Raises ``ValueError`` naming the key for a bad config or an ``ep_size`` that does not fit
    ``--nproc``. Other entries parse their own argv: only ``--output-dir`` is used.
    """
    if args.entry != DEFAULT_ENTRY:
        if not args.output_dir:
            raise ValueError("--output-dir is required with --entry")
        return RunPlan(Path(args.output_dir))
    from pce_dist.config import load_config, validate_world
    from pce_dist.distributed.heartbeat import heartbeat_dir

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config, overrides)
    validate_world(cfg, args.nproc)
    out = Path(cfg.output_dir)
    return RunPlan(out, heartbeat_dir(out), cfg.dist.timeout_s, cfg.dist.heartbeat_s)


def load_entry(spec: str) -> Callable[[list[str]], int | None]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


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
    """``--nproc 1``: the entry in this process, its output on the terminal and in rank0.log."""
    log = open_log(log_dir / "rank0.log")
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


def main(argv: list[str] | None = None) -> int:
    """``launch/local.py ARGV``: check the config, run the ranks; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = resolve_plan(args)
    except ValueError as exc:
        print(f"launch/local.py: error: {exc}", file=sys.stderr)
        return 2
    if args.nproc == 1:
        if args.entry.startswith("pce_dist."):
            from pce_dist import stop

            stop.install()
        return run_in_process(args.entry, forwarded_argv(args), plan.output_dir / "logs")
    return run_ranks(args.entry, forwarded_argv(args), args.nproc, plan, args.grace_s, args.stop_grace_s)
