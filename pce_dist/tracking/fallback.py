"""The fallback file, ``<run_dir>/metrics_fallback.jsonl``: where records wait for the store.

This module owns the file's format; the writer thread and the ``replay`` command only
append records to it and read undelivered ones back. It is append-only JSON lines:

* ``{"session": sid, "run_id", "tracking_uri", "pid", "host", "timestamp_ms"}`` once per
  tracker, before its first record (the URI redacted: ``replay`` needs the live one from
  ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` when it hides a credential);
* records ``{"run_id", "sid", "seq", "timestamp_ms", ...}`` with ``"step", "metrics"``, or
  ``"artifact", "artifact_path"``, or ``"status"``;
* ``{"delivered": [[start, end], ...]}``: every record line starting at a byte offset in
  ``[start, end)`` was delivered (or refused by the store and dropped with a warning).

Records are identified by their byte offset, which never changes in an append-only file,
so delivery is tracked without rewriting it. A replay holds an exclusive ``flock`` on the
file (``FallbackFile.exclusive``), so the writer thread and ``replay`` (another process)
never send the same record.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pce_dist.tracking.client import log

FALLBACK_FILE = "metrics_fallback.jsonl"


@dataclass
class Pending:
    """An undelivered record of the fallback file."""

    offset: int  # byte offset of its line: the record's identity
    end: int  # offset just past its newline
    entry: dict
    order: tuple[int, int]  # (position of its session in the file, seq): the order it was logged in


@dataclass
class Contents:
    pending: list[Pending]  # undelivered records, file order
    sessions: dict[str, tuple[int, dict]]  # sid -> (position in the file, session line); file order

    def pending_of(self, run_id: str) -> list[Pending]:
        """``run_id``'s undelivered records in the order they were logged (not file order)."""
        return sorted((p for p in self.pending if p.entry["run_id"] == run_id), key=lambda p: p.order)

    def sessions_of(self, run_id: str) -> list[tuple[str, dict]]:
        """``run_id``'s ``(sid, session line)`` pairs in file order: the latest session last."""
        return [(sid, line) for sid, (_, line) in self.sessions.items() if line.get("run_id") == run_id]


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

    def mark_delivered(self, records: Iterable[Pending]) -> None:
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

    def read(self) -> Contents:
        """Undelivered records and sessions. A last line without a newline is being written: skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Contents([], {})
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
            pending.append(Pending(start, end, obj, (position, int(obj.get("seq", 0)))))
        return Contents(pending, sessions)

    def replay_hint(self) -> str:
        """How the user sends what this file still holds, for the warnings that leave records in it."""
        return f"send them with `python -m pce_dist.tracking replay {self.path.parent}`"

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
