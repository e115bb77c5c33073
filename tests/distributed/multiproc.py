"""``spawn(fn, world_size)``: run ``fn(rank, world_size, *args)`` on N real local processes.

The harness behind every multi-process test. Children get torchrun-style variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so ``fn`` can
build ``DistEnv.from_environ(...)`` exactly as the trainer does, with gloo on CPU.

What makes it safe to use in CI:
* A failing rank fails the test at once, with its traceback, and the other ranks are
  killed -- they are usually blocked in a collective waiting for the dead one.
* A global deadline: past ``timeout_s`` every child is killed and ``RankTimeout`` names
  the ranks that had not finished; shortly before that, each child dumps its Python
  stacks to stderr (pytest shows them), so a hang is diagnosable.
* The rendezvous port is picked free; if another process grabs it first, the whole
  group is retried once on a new port.

``fn`` and its arguments cross a process boundary, so they must be picklable: define
``fn`` at module level. Its return value comes back in the list, indexed by rank.
The default "forkserver" start method imports torch once in the fork server and forks
children from it -- a clean, thread-free parent like "spawn", without paying the torch
import per rank (seconds each on a small CI machine).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

from pce_dist.distributed import free_port

_GRACE_S = 3.0  # SIGTERM -> SIGKILL


class RankFailed(Exception):
    """A child raised, or exited without reporting. ``str()`` carries the child's traceback."""

    def __init__(self, rank: int, message: str, tb: str = "", exitcode: int | None = None) -> None:
        self.rank, self.message, self.tb, self.exitcode = rank, message, tb, exitcode
        super().__init__(f"rank {rank} failed: {message}\n{tb}".rstrip())


class RankTimeout(TimeoutError):
    """Some ranks were still running at the deadline."""


def _child(fn: Callable, rank: int, world_size: int, args: tuple, port: int, env: dict,
           conn: Any, dump_after_s: float) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share a few cores; intra-op threads would oversubscribe
    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    exitcode = 0
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle, not Connection.send: torch registers multiprocessing reducers that
        # ship tensors as shared-memory handles, which die with this process.
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 -- everything must reach the parent
        exitcode = 1
        try:
            conn.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())))
        except Exception:  # the pipe itself failed; the exit code still tells the parent
            pass
    finally:
        faulthandler.cancel_dump_traceback_later()
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(exitcode)  # skip atexit hooks that may block on a half-dead process group


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code} before reporting a result"


def _collect(procs: list, conns: list, timeout_s: float) -> list[Any]:
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs):
        pending = [r for r in range(len(procs)) if r not in results]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RankTimeout(f"ranks {pending} did not finish within {timeout_s:.0f} s "
                              "(their stacks were dumped to stderr)")
        ready = set(wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending], remaining))
        for r in pending:
            if conns[r] not in ready and procs[r].sentinel not in ready:
                continue
            msg = None
            if conns[r].poll():  # True for data and for EOF
                try:
                    msg = pickle.loads(conns[r].recv_bytes())
                except EOFError:
                    pass
            if msg is not None and msg[0] == "ok":
                results[r] = msg[1]
            elif msg is not None:
                raise RankFailed(r, msg[1], msg[2])
            else:  # died without a word: os._exit, a signal, a segfault
                procs[r].join(1.0)
                raise RankFailed(r, f"process {_describe_exit(procs[r].exitcode)}", exitcode=procs[r].exitcode)
    for p in procs:
        p.join(_GRACE_S)
    return [results[r] for r in range(len(procs))]


def spawn(fn: Callable, world_size: int, *, args: tuple = (), timeout_s: float = 60.0,
          env: dict[str, str] | None = None, start_method: str = "forkserver") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return results by rank.

    Raises:
        RankFailed: the first rank that raised or died (the others are killed).
        RankTimeout: not every rank finished within ``timeout_s`` (all are killed).
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
    dump_after_s = max(1.0, timeout_s - 2.0)
    for attempt in range(2):
        port = free_port()
        procs, conns = [], []
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"rank{rank}",
                            args=(fn, rank, world_size, tuple(args), port, dict(env or {}), child_conn,
                                  dump_after_s))
            p.start()
            child_conn.close()  # only the child writes; EOF then means the child is gone
            procs.append(p)
            conns.append(parent_conn)
        try:
            return _collect(procs, conns, timeout_s)
        except RankFailed as exc:
            port_taken = "EADDRINUSE" in exc.tb or "address already in use" in exc.tb.lower()
            if not (attempt == 0 and port_taken):
                raise
        finally:
            _stop(procs)
            for c in conns:
                c.close()
    raise AssertionError("unreachable")
