"""Rank 0's writer thread: the training thread only enqueues, this thread talks to MLflow.

What it promises the training loop: logging never raises and never waits on the network.
``submit`` puts a record on a bounded queue (microseconds). When the queue is full (the
thread is stuck on a hung server) the record is appended to the fallback file instead, on
the calling thread, and counted (``num_overflowed``). When the store stops answering the
thread warns once, appends every record to the file and retries at most every
``retry_interval_s``; when the store answers again the file's undelivered records of this
run are sent first (``delivery.replay_pending``), then the queue again.

Bounds of ``close``: every call runs under ``WRITE_LIMITS`` (one retry, 5 s socket
timeout: <= ~10 s against a hung server, ~0 against a refused connection), and an offline
writer's retry -- the last one at close included -- starts with one 2 s probe. So close
costs at most the call in flight plus the probe (~12 s against a hung server, ~2 s when
the outage began earlier) and never waits longer than its ``timeout_s``; if the thread is
still stuck then (a slow upload), close writes what the thread holds to the file itself.
Whatever was not sent, the final status included, stays in the file for ``replay``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

from pce_dist.tracking.client import RETRY_PROBE_LIMITS, bounded_http, log
from pce_dist.tracking.delivery import deliver, replay_pending
from pce_dist.tracking.fallback import FallbackFile

QUEUE_SIZE = 4096  # records; the writer normally empties it within one call
_TAKE_MAX = 256  # records taken off the queue per delivery round (one log_batch when they fit)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Writer:
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
        self._lock = threading.Lock()  # file appends, _in_file, and the hand-over to close
        self._session_written = False
        self._in_file = fallback.path.exists()  # an earlier session of this run may have left records
        self._online = True
        self._retry_at = 0.0
        self._in_flight: list[dict] = []
        self._abandoned = False
        self._queued = 0  # records put on the queue (training thread) ...
        self._handled = 0  # ... and taken off it and sent or spilled (writer thread): ``drain``
        self._thread = threading.Thread(target=self._run, name="pce-tracking-writer", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every record submitted so far was sent or spilled; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._handled < self._queued:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return True

    @property
    def online(self) -> bool:
        """The store answered the last call (records are not going to the file for an outage)."""
        return self._online

    # -- training thread

    def submit(self, fields: dict) -> None:
        """Queue one record (``fields``: step and metrics, an artifact, or a status), stamped now."""
        entry = {"run_id": self.run_id, "sid": self.sid, "seq": next(self._seq), "timestamp_ms": _now_ms(),
                 **fields}
        try:
            self._queue.put_nowait(entry)
            self._queued += 1
        except queue.Full:
            self.num_overflowed += 1
            if self.num_overflowed == 1:
                log.warning("tracking: the MLflow writer is behind (%d records queued); records go to %s "
                            "until it catches up", self._queue.maxsize, self._fallback.path)
            self._spill([entry])  # a local append; replayed in logging order by seq

    def close(self, status: str | None, timeout_s: float) -> None:
        """Queue ``status`` (``None``: leave the run as it is), drain, and stop within ``timeout_s``."""
        if status is not None:
            self.submit({"status": status})
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
                    "%s: %s", self._uri, self.run_id, timeout_s, self._fallback.path, self._fallback.replay_hint())

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
        handled = len(entries)
        with self._lock:
            self._in_flight = entries
        if self._online and not self._in_file:
            done: list[dict] = []
            error = deliver(self._client, entries, done)
            if error is not None:
                self._go_offline(error)
            entries = entries[len(done):]
        with self._lock:  # the rest goes behind older records in the file: they are sent first
            self._in_flight = []
            if not self._abandoned:  # else close() has written them to the file meanwhile
                self._append_locked(entries)
        self._handled += handled

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
                outcome = replay_pending(self._client, self._fallback, self.run_id, self.sid)
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
            left = len(self._fallback.read().pending_of(self.run_id))
            log.warning("tracking: could not reach MLflow at %s to close run %s (%s); %d records stay in %s: %s",
                        self._uri, self.run_id, error, left, self._fallback.path, self._fallback.replay_hint())

    def _probe(self) -> BaseException | None:
        """One short request before an offline writer replays: a hung store costs 2 s, not a full call."""
        try:
            with bounded_http(RETRY_PROBE_LIMITS):
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
