"""Sending records to MLflow, and sending what the fallback file still holds.

The writer thread (records straight off its queue, and the file once the store is back)
and the ``replay`` command (the file, from another process) send through the same two
functions, so the rules of delivery live here once:

* order: a run's records go out in the order they were logged (session, then ``seq``),
  with their original steps and timestamps; consecutive metric records share
  ``log_batch`` calls;
* refusals: a record the store refuses (bad key or value) is dropped with a warning, and
  only that record -- the store answered, so it is not an outage;
* marking: a record is marked delivered once MLflow confirmed it, so a crash between the
  two sends it again; MLflow's SQL stores ignore an identical metric logged twice;
* statuses: a writer sends only its own session's; ``replay`` sets the status of the
  run's latest session, and only if the run is still RUNNING (a later session, online
  all along, may have closed it). Every other status is superseded: marked delivered
  without being sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pce_dist.tracking.client import WRITE_LIMITS, bounded_http, chunks, is_rejection, log
from pce_dist.tracking.fallback import FallbackFile

# MLflow's batch limit (mlflow.utils.validation); older servers enforce the same number.
_METRICS_PER_BATCH = 1000


def deliver(client: Any, entries: list[dict], done: list[dict]) -> BaseException | None:
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
        with bounded_http(WRITE_LIMITS):
            for chunk in chunks(metrics, _METRICS_PER_BATCH):
                client.log_batch(entries[0]["run_id"], metrics=chunk)
    except Exception as exc:
        if not is_rejection(exc):
            raise
        if len(entries) > 1:
            for entry in entries:
                _send_metrics(client, [entry])
        else:
            log.warning("tracking: MLflow refused the metrics of step %s, dropped: %s", entries[0]["step"], exc)


def _send_other(client: Any, entry: dict) -> None:
    run_id = entry["run_id"]
    try:
        with bounded_http(WRITE_LIMITS):
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
        if not is_rejection(exc):
            raise
        log.warning("tracking: MLflow refused %s, dropped: %s",
                    entry.get("artifact") or f"status {entry.get('status')}", exc)


@dataclass
class Replayed:
    sent: int  # records handled (delivered, or refused and dropped)
    left: int  # records of the run still undelivered
    error: BaseException | None  # why it stopped, when the store did not answer


def replay_pending(client: Any, fallback: FallbackFile, run_id: str, own_sid: str | None) -> Replayed:
    """Send ``run_id``'s undelivered records in logging order; hold ``fallback.exclusive`` around it.

    ``own_sid``: the writer's session, whose status it sends (other sessions' statuses are
    superseded by it). ``None`` (the replay command): the run's latest session in the file
    decides the status, sent only if the run is still RUNNING.
    """
    contents = fallback.read()
    pending = contents.pending_of(run_id)
    command = own_sid is None
    if command:
        sessions = contents.sessions_of(run_id)
        own_sid = sessions[-1][0] if sessions else None
    statuses = [p for p in pending if "status" in p.entry]
    keep = statuses[-1] if statuses and statuses[-1].entry.get("sid") == own_sid else None
    if keep is not None and command:
        try:
            with bounded_http(WRITE_LIMITS):
                running = client.get_run(run_id).info.status == "RUNNING"
        except Exception as exc:  # noqa: BLE001 -- reported by the caller
            return Replayed(0, len(pending), exc)
        keep = keep if running else None
    superseded = [p for p in statuses if p is not keep]
    send = [p for p in pending if "status" not in p.entry or p is keep]
    done: list[dict] = []
    error = None
    try:
        error = deliver(client, [p.entry for p in send], done)
    finally:  # also on KeyboardInterrupt: what MLflow confirmed is not sent again
        fallback.mark_delivered(superseded + send[:len(done)])
    return Replayed(len(done), len(send) - len(done), error)
