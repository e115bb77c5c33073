"""Experiment tracking, writing side: the only module in pce_dist that sends to MLflow.

(``pce_dist.runs`` reads runs back for ``compare``.) One MLflow run per training run,
owned by rank 0; other ranks hold the same run id and no-op.

The contract with the training loop is asymmetric on purpose:

* ``Tracker.start`` is strict. A tracking store that cannot be reached at start raises
  ``RuntimeError`` naming the (redacted) URI on *every* rank (rank 0 broadcasts the
  failure, so the others do not sit in a collective until ``dist.timeout_s``), within
  seconds: MLflow's HTTP retries default to minutes, so they are bounded here unless the
  user set the ``MLFLOW_HTTP_REQUEST_*`` variables themselves.
* After start, logging never raises and never waits on the network. ``log_metrics`` and
  ``log_artifact`` put a record on a bounded queue (microseconds); a writer thread sends
  it. When the queue is full (the writer is stuck on a hung server) the record is appended
  to the fallback file instead, on the calling thread, and counted (``num_overflowed``).
  When the store stops answering the writer warns once, appends every record to
  ``<run_dir>/metrics_fallback.jsonl`` and retries at most every ``retry_interval_s``;
  when the store answers again the file's undelivered records of this run are sent, in
  the order they were logged, with their original steps and timestamps.
* ``finish(status)`` queues the final status behind the last metrics and waits for the
  writer. Bounds: every writer call runs under ``_WRITE_LIMITS`` (one retry, 5 s socket
  timeout: <= ~10 s against a hung server, ~0 against a refused connection), and an
  offline writer's retry -- the last one at finish included -- starts with one 2 s probe.
  So finish costs at most the call in flight plus the probe (~12 s against a hung server,
  ~2 s when the outage began earlier) and never waits longer than ``timeout_s`` (30 s);
  if the writer is still stuck then (a slow upload), finish writes what the writer holds
  to the file itself. Whatever was not sent, the final status included, stays in the
  file for ``python -m pce_dist.tracking replay``.

The fallback file is append-only JSON lines, written only by this module:
  ``{"session": sid, "run_id", "tracking_uri", "pid", "host", "timestamp_ms"}`` once per
  tracker, before its first record (the URI redacted: ``replay`` needs the live one from
  ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` when it hides a credential);
  records ``{"run_id", "sid", "seq", "timestamp_ms", ...}`` with ``"step", "metrics"``, or
  ``"artifact", "artifact_path"``, or ``"status"``;
  ``{"delivered": [[start, end], ...]}``: every record line starting at a byte offset in
  ``[start, end)`` was delivered (or refused by the store and dropped with a warning).
Records are identified by their byte offset, which never changes in an append-only file,
so delivery is tracked without rewriting it; a replay holds an exclusive ``flock`` on the
file, so the writer thread and ``replay`` (another process) never send the same record.
A record is marked once MLflow confirmed it, so a crash between the two sends it again;
MLflow's SQL stores ignore an identical metric logged twice. Statuses: a writer sends only
its own; ``replay`` sets the status of the run's latest session, and only if the run is
still RUNNING (a later session, online all along, may have closed it).

Where runs go: ``MLFLOW_TRACKING_URI`` (env) > ``tracking.tracking_uri`` (config) >
``sqlite:///<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``.

What is recorded: params = the flattened resolved config (immutable in MLflow, so on
resume only keys not yet logged are added); tags = things that may change across
restarts (world size, EP size, hostnames, git commit, SLURM job id, restart count);
artifact ``config.yaml`` = the resolved config of the latest start. Params, tags, the
artifact, ``tracker.tracking_uri``, the fallback file and every log line of this module
go through ``pce_dist.redact``; the live URI is held only by the MLflow client.

This file is longer than the few hundred lines we aim for: the queue, the file it spills
to and the command that replays the file are one protocol, and splitting them would put
its invariants (offsets, ordering, statuses) in two places.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import fcntl
import itertools
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pce_dist.config import RunConfig, flatten, to_dict, to_yaml
from pce_dist.redact import MASK, SecretFilter, redact, secret_values

if TYPE_CHECKING:
    from pce_dist.distributed.env import DistEnv

log = logging.getLogger("pce_dist.tracking")  # also when run as ``python -m``

FALLBACK_FILE = "metrics_fallback.jsonl"
# MLflow's batch limits (mlflow.utils.validation); older servers enforce the same numbers.
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_MAX = 6000  # MLflow >= 2.x; values are truncated client-side to stay valid
_TAG_VALUE_MAX = 5000
# (retries, backoff factor, per-request socket timeout in s) instead of MLflow's 7 retries
# with exponential backoff (minutes); urllib3 retries the first time without sleeping.
PROBE_LIMITS = (2, 1, 5)  # start / read probe: fail fast
CALL_LIMITS = (1, 1, 15)  # start / read calls on the main thread
_WRITE_LIMITS = (1, 1, 5)  # writer thread: <= 2 x 5 s per call on a hung server, then the file
_RETRY_PROBE_LIMITS = (0, 0, 2)  # an offline writer's retry starts with one 2 s request
_QUEUE_SIZE = 4096  # records; the writer normally empties it within one call
_TAKE_MAX = 256  # records taken off the queue per delivery round (one log_batch when they fit)
_FINISH_TIMEOUT_S = 30.0  # > the call in flight (~10 s) + the last probe (2 s); slow uploads get the rest
_EXIT_TIMEOUT_S = 5.0  # interpreter exit without finish(): drain briefly, then to the file


def resolve_tracking_uri(cfg: RunConfig, run_dir: str | Path) -> str:
    """The live URI: the environment wins over the config, which wins over a per-run sqlite file.

    It may carry a password; show ``redact(uri)`` (``Tracker.tracking_uri``) instead.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def is_remote_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _is_rejection(exc: BaseException) -> bool:
    """The store answered and said no (bad key/value): retrying the same request cannot help."""
    return getattr(exc, "error_code", None) in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")


class _MlflowSettings:
    """MLflow settings held while any caller is inside one of our calls, unless the user set them.

    The HTTP caps (retries, backoff factor, socket timeout), and no printing of run URLs:
    MLflow writes ``View run ... at: <live URI>`` to stdout on ``set_terminated``, password
    included (train.py prints the redacted URI instead). MLflow reads these from the
    environment at call time, so they are process-wide: the writer thread and the main
    thread may both be inside. A reference count keeps one from removing them under the
    other; the first one in chooses the limits.
    """

    _LIMITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    _QUIET = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._added: list[str] = []

    @contextlib.contextmanager
    def __call__(self, limits: tuple[int, int, int]) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                values = {**dict(zip(self._LIMITS, map(str, limits))), self._QUIET: "true"}
                self._added = [n for n in values if n not in os.environ]
                os.environ.update({n: values[n] for n in self._added})
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for name in self._added:
                        os.environ.pop(name, None)


bounded_http = _MlflowSettings()

# Scrubs every record of this module's logger (patterns of pce_dist.redact plus the live
# secrets of the runs it tracks); attached by _watch_secrets, not at import.
_SCRUB = SecretFilter()


def _watch_secrets(values: Iterable[str]) -> None:
    _SCRUB.register(set(values))
    if _SCRUB not in log.filters:
        log.addFilter(_SCRUB)


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the repository containing ``cwd``, or "unknown" (not a repo, no git, no commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------- the fallback file


@dataclass
class _Pending:
    """An undelivered record of the fallback file."""

    offset: int  # byte offset of its line: the record's identity
    end: int  # offset just past its newline
    entry: dict
    order: tuple[int, int]  # (position of its session in the file, seq): the order it was logged in


@dataclass
class _Contents:
    pending: list[_Pending]  # undelivered records, file order
    sessions: dict[str, tuple[int, dict]]  # sid -> (position in the file, session line)


class FallbackFile:
    """``metrics_fallback.jsonl``: append-only; see the module docstring for its lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._tail_checked = False
        self.num_record_appends = 0  # a replay compares it to see whether records came in meanwhile

    def append(self, entries: list[dict]) -> None:
        """One ``write`` per call (O_APPEND: concurrent appenders do not interleave lines)."""
        self._write("".join(json.dumps(e) + "\n" for e in entries).encode())
        self.num_record_appends += 1

    def mark_delivered(self, records: Iterable[_Pending]) -> None:
        spans: list[list[int]] = []
        for r in sorted(records, key=lambda p: p.offset):
            if spans and spans[-1][1] == r.offset:  # byte-adjacent lines: nothing lies between them
                spans[-1][1] = r.end
            else:
                spans.append([r.offset, r.end])
        if spans:
            self._write((json.dumps({"delivered": spans}) + "\n").encode())

    def _write(self, data: bytes) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if not self._tail_checked:
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        data = b"\n" + data  # a killed process left half a line: keep ours whole
                    self._tail_checked = True
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def read(self) -> _Contents:
        """Undelivered records and sessions. A last line without a newline is being written: skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return _Contents([], {})
        records: list[tuple[int, int, dict]] = []
        spans: list[tuple[int, int]] = []
        sessions: dict[str, tuple[int, dict]] = {}
        pos = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            start, line, pos = pos, data[pos:nl], nl + 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                log.warning("tracking: %s: unreadable line at byte %d skipped", self.path, start)
                continue
            if not isinstance(obj, dict):
                continue
            if "delivered" in obj:
                spans.extend((int(a), int(b)) for a, b in obj["delivered"])
            elif "session" in obj:
                sessions.setdefault(obj["session"], (len(sessions), obj))
            elif "run_id" in obj:
                records.append((start, pos, obj))
        spans.sort()
        starts = [a for a, _ in spans]
        pending = []
        for start, end, obj in records:
            i = bisect.bisect_right(starts, start) - 1
            if i >= 0 and start < spans[i][1]:
                continue  # delivered
            position = sessions.get(obj.get("sid"), (len(sessions), None))[0]
            pending.append(_Pending(start, end, obj, (position, int(obj.get("seq", 0)))))
        return _Contents(pending, sessions)

    @contextlib.contextmanager
    def exclusive(self, wait: bool) -> Iterator[bool]:
        """Held while replaying; yields whether it was acquired (always, with ``wait``)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            yield True  # nothing to replay, nothing to guard
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                acquired = True
            except BlockingIOError:
                acquired = False
            yield acquired
        finally:
            os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- sending records


def _deliver(client: Any, entries: list[dict], done: list[dict]) -> BaseException | None:
    """Send ``entries`` (one run's) in order, appending each handled one to ``done``.

    Handled = sent, or refused by the store and dropped with a warning. Returns the error
    that stopped it when the store did not answer, ``None`` when every entry was handled.
    Consecutive metric records share ``log_batch`` calls.
    """
    i = 0
    try:
        while i < len(entries):
            if "metrics" in entries[i]:
                j, size = i, 0
                while j < len(entries) and "metrics" in entries[j] and \
                        (j == i or size + len(entries[j]["metrics"]) <= _METRICS_PER_BATCH):
                    size += len(entries[j]["metrics"])
                    j += 1
                _send_metrics(client, entries[i:j])
            else:
                j = i + 1
                _send_other(client, entries[i])
            done.extend(entries[i:j])
            i = j
    except Exception as exc:  # noqa: BLE001 -- the store did not answer; the caller keeps the rest
        return exc
    return None


def _send_metrics(client: Any, entries: list[dict]) -> None:
    """If the store refuses a batch of several records, each is tried alone: only bad ones are dropped."""
    from mlflow.entities import Metric

    metrics = [Metric(k, v, e["timestamp_ms"], e["step"]) for e in entries for k, v in e["metrics"].items()]
    try:
        with bounded_http(_WRITE_LIMITS):
            for chunk in _chunks(metrics, _METRICS_PER_BATCH):
                client.log_batch(entries[0]["run_id"], metrics=chunk)
    except Exception as exc:
        if not _is_rejection(exc):
            raise
        if len(entries) > 1:
            for entry in entries:
                _send_metrics(client, [entry])
        else:
            log.warning("tracking: MLflow refused the metrics of step %s, dropped: %s", entries[0]["step"], exc)


def _send_other(client: Any, entry: dict) -> None:
    run_id = entry["run_id"]
    try:
        with bounded_http(_WRITE_LIMITS):
            if "artifact" in entry:
                path = Path(entry["artifact"])
                if not path.exists():
                    log.warning("tracking: artifact %s no longer exists, not uploaded", path)
                elif path.is_dir():
                    client.log_artifacts(run_id, str(path), entry.get("artifact_path"))
                else:
                    client.log_artifact(run_id, str(path), entry.get("artifact_path"))
            elif "status" in entry:
                client.set_terminated(run_id, status=entry["status"], end_time=entry["timestamp_ms"])
    except Exception as exc:
        if not _is_rejection(exc):
            raise
        log.warning("tracking: MLflow refused %s, dropped: %s",
                    entry.get("artifact") or f"status {entry.get('status')}", exc)


@dataclass
class _Replayed:
    sent: int  # records handled (delivered, or refused and dropped)
    left: int  # records of the run still undelivered
    error: BaseException | None  # why it stopped, when the store did not answer


def _replay(client: Any, fallback: FallbackFile, run_id: str, own_sid: str | None) -> _Replayed:
    """Send ``run_id``'s undelivered records in logging order; hold ``fallback.exclusive`` around it.

    ``own_sid``: the writer's session, whose status it sends (other sessions' statuses are
    superseded by it). ``None`` (the replay command): the run's latest session in the file
    decides the status, sent only if the run is still RUNNING.
    """
    contents = fallback.read()
    pending = sorted((p for p in contents.pending if p.entry["run_id"] == run_id), key=lambda p: p.order)
    command = own_sid is None
    if command:
        mine = [(pos, sid) for sid, (pos, line) in contents.sessions.items() if line.get("run_id") == run_id]
        own_sid = max(mine)[1] if mine else None
    statuses = [p for p in pending if "status" in p.entry]
    keep = statuses[-1] if statuses and statuses[-1].entry.get("sid") == own_sid else None
    if keep is not None and command:
        try:
            with bounded_http(_WRITE_LIMITS):
                running = client.get_run(run_id).info.status == "RUNNING"
        except Exception as exc:  # noqa: BLE001 -- reported by the caller
            return _Replayed(0, len(pending), exc)
        keep = keep if running else None
    superseded = [p for p in statuses if p is not keep]
    send = [p for p in pending if "status" not in p.entry or p is keep]
    done: list[dict] = []
    error = None
    try:
        error = _deliver(client, [p.entry for p in send], done)
    finally:  # also on KeyboardInterrupt: what MLflow confirmed is not sent again
        fallback.mark_delivered(superseded + send[:len(done)])
    return _Replayed(len(done), len(send) - len(done), error)


# ----------------------------------------------------------------------------- the writer thread


class _Writer:
    """Rank 0's sender: the training thread only enqueues; this thread talks to MLflow."""

    def __init__(self, client: Any, run_id: str, fallback: FallbackFile, display_uri: str, *,
                 retry_interval_s: float, queue_size: int) -> None:
        self.run_id = run_id
        self.sid = uuid.uuid4().hex[:12]
        self.num_overflowed = 0  # records that found the queue full (they went to the file)
        self._client = client
        self._fallback = fallback
        self._uri = display_uri
        self._retry_interval_s = retry_interval_s
        self._seq = itertools.count()
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=queue_size)  # None: wake up
        self._stop = threading.Event()
        self._lock = threading.Lock()  # file appends, _in_file, and the hand-over to finish
        self._session_written = False
        self._in_file = fallback.path.exists()  # an earlier session of this run may have left records
        self._online = True
        self._retry_at = 0.0
        self._in_flight: list[dict] = []
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="pce-tracking-writer", daemon=True)
        self._thread.start()

    # -- training thread

    def submit(self, fields: dict) -> None:
        entry = {"run_id": self.run_id, "sid": self.sid, "seq": next(self._seq), **fields}
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.num_overflowed += 1
            if self.num_overflowed == 1:
                log.warning("tracking: the MLflow writer is behind (%d records queued); records go to %s "
                            "until it catches up", self._queue.maxsize, self._fallback.path)
            self._spill([entry])  # a local append; replayed in logging order by seq

    def close(self, status: str | None, timeout_s: float) -> None:
        """Queue ``status`` (``None``: leave the run as it is), drain, and stop within ``timeout_s``."""
        if status is not None:
            self.submit({"timestamp_ms": _now_ms(), "status": status})
        self._stop.set()
        with contextlib.suppress(queue.Full):  # a full queue means the writer is awake anyway
            self._queue.put_nowait(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon(timeout_s)
        if self.num_overflowed:
            log.warning("tracking: %d records found the writer's queue full and went through %s",
                        self.num_overflowed, self._fallback.path)

    def _abandon(self, timeout_s: float) -> None:
        """The writer is stuck past the bound: put what it holds in the file, so nothing is lost."""
        with self._lock:
            self._abandoned = True
            left = list(self._in_flight)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item)
        self._spill(left)
        log.warning("tracking: MLflow at %s did not take the last records of run %s within %.0f s; they are in "
                    "%s: send them with `python -m pce_dist.tracking replay %s`", self._uri, self.run_id,
                    timeout_s, self._fallback.path, self._fallback.path.parent)

    # -- writer thread

    def _run(self) -> None:
        while not self._abandoned:
            entries = self._take()
            if entries:
                self._handle(entries)
            stopping = self._stop.is_set() and self._queue.empty()
            if self._in_file and not self._abandoned and (stopping or time.monotonic() >= self._retry_at):
                self._replay(final=stopping)
            if stopping:
                return

    def _take(self) -> list[dict]:
        timeout = max(0.0, self._retry_at - time.monotonic()) if self._in_file else None
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < _TAKE_MAX:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [i for i in items if i is not None]

    def _handle(self, entries: list[dict]) -> None:
        with self._lock:
            self._in_flight = entries
        if self._online and not self._in_file:
            done: list[dict] = []
            error = _deliver(self._client, entries, done)
            if error is not None:
                self._go_offline(error)
            entries = entries[len(done):]
        with self._lock:  # the rest goes behind older records in the file: they are sent first
            self._in_flight = []
            if not self._abandoned:  # else finish() has written them to the file meanwhile
                self._append_locked(entries)

    def _spill(self, entries: list[dict]) -> None:
        with self._lock:
            self._append_locked(entries)

    def _append_locked(self, entries: list[dict]) -> None:
        if not entries:
            return
        lines = entries if self._session_written else [self._session_line(), *entries]
        try:
            self._fallback.append(lines)
        except OSError as exc:
            log.warning("tracking: cannot write %s, %d records lost: %s", self._fallback.path, len(entries), exc)
            return
        self._session_written = True
        self._in_file = True

    def _session_line(self) -> dict:
        return {"session": self.sid, "run_id": self.run_id, "tracking_uri": self._uri, "pid": os.getpid(),
                "host": socket.gethostname(), "timestamp_ms": _now_ms()}

    def _replay(self, final: bool) -> None:
        error = None if self._online else self._probe()
        if error is None:
            appends = self._fallback.num_record_appends
            with self._fallback.exclusive(wait=False) as acquired:
                if not acquired:  # `replay` (another process) holds the file and sends these records
                    self._retry_at = time.monotonic() + self._retry_interval_s
                    return
                outcome = _replay(self._client, self._fallback, self.run_id, self.sid)
            error = outcome.error
        if error is None:
            if not self._online:
                log.warning("tracking: MLflow at %s is back; sent %d records from %s", self._uri, outcome.sent,
                            self._fallback.path)
            self._online, self._retry_at = True, 0.0
            with self._lock:  # records that found the queue full during the replay are still to send
                self._in_file = self._fallback.num_record_appends != appends
            return
        self._go_offline(error)
        if final:
            left = sum(p.entry["run_id"] == self.run_id for p in self._fallback.read().pending)
            log.warning("tracking: could not reach MLflow at %s to close run %s (%s); %d records stay in %s: "
                        "send them with `python -m pce_dist.tracking replay %s`", self._uri, self.run_id, error,
                        left, self._fallback.path, self._fallback.path.parent)

    def _probe(self) -> BaseException | None:
        """One short request before an offline writer replays: a hung store costs 2 s, not a full call."""
        try:
            with bounded_http(_RETRY_PROBE_LIMITS):
                self._client.get_run(self.run_id)
        except Exception as exc:  # noqa: BLE001 -- still down
            return exc
        return None

    def _go_offline(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self._retry_interval_s
        if self._online:
            self._online = False
            log.warning("tracking: MLflow at %s stopped answering (%s: %s); training is not held up: records go "
                        "to %s and are sent when it is back (retry every %.3g s)", self._uri, type(exc).__name__,
                        exc, self._fallback.path, self._retry_interval_s)


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Handle on the run. Build with ``Tracker.start``; use ``with tracker:`` or call ``finish``.

    ``tracking_uri`` is the display form (a password masked); the live URI stays in the
    MLflow client.
    """

    def __init__(self, run_id: str, *, is_main: bool, run_dir: str | Path, tracking_uri: str,
                 writer: _Writer | None = None) -> None:
        self.run_id = run_id
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self._writer = writer
        self._finished = False
        if writer is not None:
            atexit.register(self._at_exit)

    @classmethod
    def start(cls, cfg: RunConfig, env: DistEnv, run_dir: str | Path, resume_run_id: str | None = None,
              *, retry_interval_s: float = 30.0, queue_size: int = _QUEUE_SIZE) -> Tracker:
        """Create (or resume) the run on rank 0 and share its id with every rank.

        Collective: every rank must call it. Raises ``RuntimeError`` on every rank when the
        store is unreachable or ``resume_run_id`` does not exist.
        """
        run_dir = Path(run_dir)
        uri = resolve_tracking_uri(cfg, run_dir)
        display = redact(uri)
        _watch_secrets(secret_values(to_dict(cfg)) | secret_values(uri))
        hostnames = env.all_gather_object(socket.gethostname())
        outcome: tuple[str, Any] | None = None
        client = None
        if env.is_main:
            try:
                client, run_id = _open_run(cfg, env, run_dir, uri, resume_run_id, hostnames)
                outcome = ("ok", run_id)
            except Exception as exc:  # noqa: BLE001 -- reported on every rank below
                message = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                outcome = ("error", _SCRUB.scrub(message))
        outcome = env.broadcast_object(outcome)
        if outcome[0] == "error":
            raise RuntimeError(f"experiment tracking could not start at {display!r}: {outcome[1]}")
        writer = None
        if env.is_main:
            writer = _Writer(client, outcome[1], FallbackFile(run_dir / FALLBACK_FILE), display,
                             retry_interval_s=retry_interval_s, queue_size=queue_size)
        return cls(outcome[1], is_main=env.is_main, run_dir=run_dir, tracking_uri=display, writer=writer)

    @property
    def num_overflowed(self) -> int:
        """Records that found the writer's queue full and went to the fallback file."""
        return self._writer.num_overflowed if self._writer is not None else 0

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (the global optimizer step). Rank 0 only; never blocks, never raises."""
        if self._writer is None or self._finished:
            return
        try:
            fields = {"step": int(step), "timestamp_ms": _now_ms(),
                      "metrics": {str(k): float(v) for k, v in metrics.items()}}
        except (TypeError, ValueError) as exc:
            log.warning("tracking: metrics at step %s are not all numbers, skipped: %s", step, exc)
            return
        self._writer.submit(fields)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or directory) to the run, from the writer thread; it must still exist then."""
        if self._writer is None or self._finished:
            return
        self._writer.submit({"timestamp_ms": _now_ms(), "artifact": str(Path(path).resolve()),
                             "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED", timeout_s: float = _FINISH_TIMEOUT_S) -> None:
        """Send what can be sent, then close the run ("FINISHED", "FAILED" or "KILLED"); see module doc."""
        if self._writer is None or self._finished:
            return
        self._finished = True
        atexit.unregister(self._at_exit)
        self._writer.close(status, timeout_s)

    def _at_exit(self) -> None:
        """The interpreter exits without ``finish``: keep the queued records, leave the status alone."""
        if not self._finished:
            self._finished = True
            self._writer.close(None, _EXIT_TIMEOUT_S)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")


# ----------------------------------------------------------------------------- rank 0: open the run


def _open_run(cfg: RunConfig, env: DistEnv, run_dir: Path, uri: str, resume_run_id: str | None,
              hostnames: list[str]) -> tuple[Any, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    if not is_remote_uri(uri):
        run_dir.mkdir(parents=True, exist_ok=True)
    with bounded_http(PROBE_LIMITS):
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        except Exception as exc:
            raise RuntimeError(f"the tracking store at {redact(uri)!r} is not reachable ({type(exc).__name__}: "
                               f"{exc}); start it, or point tracking.tracking_uri / MLFLOW_TRACKING_URI "
                               "elsewhere") from None
    with bounded_http(CALL_LIMITS):
        experiment_id = _experiment_id(client, cfg.tracking.experiment, experiment, run_dir, uri)
        params = {k: _param_value(v) for k, v in flatten(cfg).items()}
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except Exception as exc:
                raise RuntimeError(f"cannot resume MLflow run {resume_run_id!r}: {exc}") from None
            restart_count = int(run.data.tags.get("restart_count", "0")) + 1
            old = run.data.params
            changed = sorted(k for k in params if k in old and old[k] != params[k])
            if changed:
                log.warning("tracking: resumed run %s keeps its original params for %s (MLflow params are "
                            "immutable); the new values are in this start's config.yaml", resume_run_id, changed)
            params = {k: v for k, v in params.items() if k not in old}
            client.update_run(resume_run_id, status="RUNNING")
            run_id = resume_run_id
        else:
            restart_count = 0
            run_id = client.create_run(experiment_id, run_name=redact(cfg.tracking.run_name) or None).info.run_id
        param_list = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(param_list, _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        tags = _run_tags(env, hostnames, restart_count)
        tag_list = [RunTag(k, redact(v)) for k, v in tags.items()]
        for chunk in _chunks(tag_list, _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))  # redacted
            client.log_artifact(run_id, str(path))
    return client, run_id


def _experiment_id(client: Any, name: str, experiment: Any, run_dir: Path, uri: str) -> str:
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts inside the run directory; a server decides for itself.
    location = None if is_remote_uri(uri) else (run_dir.resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        existing = client.get_experiment_by_name(name)  # another run created it meanwhile
        if existing is None:
            raise
        return existing.experiment_id


def _param_value(value: Any) -> str:
    return redact(str(value))[:_PARAM_VALUE_MAX]


def _run_tags(env: DistEnv, hostnames: list[str], restart_count: int) -> dict[str, str]:
    unique_hosts = list(dict.fromkeys(hostnames))  # rank order, no repeats
    commit = git_commit()
    tags = {
        "world_size": str(env.world_size),
        "ep_size": str(env.ep_size),
        "launcher": env.source,
        "hostnames": ",".join(unique_hosts)[:_TAG_VALUE_MAX],
        "num_hosts": str(len(unique_hosts)),
        "git_commit": commit,
        "restart_count": str(restart_count),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


# ----------------------------------------------------------------------------- replay command


def replay_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, bool]:
    """Send every undelivered record of ``run_dir``'s fallback file; returns (records sent, all sent).

    The URI: ``tracking_uri`` > ``MLFLOW_TRACKING_URI`` > the one each session recorded
    (unless it hides a credential). Holds the file's lock, so a live writer waits its turn.
    """
    from mlflow import MlflowClient

    fallback = FallbackFile(Path(run_dir) / FALLBACK_FILE)
    live = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    _watch_secrets(secret_values(live or ""))
    total, complete = 0, True
    with fallback.exclusive(wait=True):
        contents = fallback.read()
        for run_id in dict.fromkeys(p.entry["run_id"] for p in contents.pending):
            uri = live or _recorded_uri(contents, run_id)
            if uri is None:
                log.error("tracking: run %s: the tracking URI recorded in %s hides a credential; pass "
                          "--tracking-uri or set MLFLOW_TRACKING_URI", run_id, fallback.path)
                complete = False
                continue
            outcome = _replay(MlflowClient(tracking_uri=uri), fallback, run_id, own_sid=None)
            total += outcome.sent
            print(redact(f"run {run_id} at {uri}: sent {outcome.sent}, {outcome.left} left"
                         + (f" (the store did not answer: {outcome.error})" if outcome.error else "")), flush=True)
            complete = complete and outcome.error is None
    return total, complete


def _recorded_uri(contents: _Contents, run_id: str) -> str | None:
    recorded = [(pos, line["tracking_uri"]) for pos, line in contents.sessions.values()
                if line.get("run_id") == run_id and line.get("tracking_uri")]
    uri = max(recorded)[1] if recorded else None
    return None if uri is None or MASK in uri else uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.tracking",
                                 description="Tracking maintenance. replay: send the metrics, artifacts and final "
                                             "status a run directory's metrics_fallback.jsonl still holds "
                                             "(each record once; rerunning sends nothing twice).")
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="send what RUN_DIR's fallback file still holds to its MLflow run")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--tracking-uri", default=None,
                    help="the store to send to (default: MLFLOW_TRACKING_URI, else the URI the run recorded)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    sent, complete = replay_run_dir(args.run_dir, args.tracking_uri)
    print(f"sent {sent} records", flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
