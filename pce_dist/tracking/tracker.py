"""``Tracker``: the handle the training loop holds on its MLflow run, the same on every rank.

One MLflow run per training run, owned by rank 0; other ranks hold the same run id and
no-op. The contract with the training loop is asymmetric on purpose:

* ``Tracker.start`` is strict. A tracking store that cannot be reached at start raises
  ``RuntimeError`` naming the (redacted) URI on *every* rank (rank 0 broadcasts the
  failure, so the others do not sit in a collective until ``dist.timeout_s``), within
  seconds: MLflow's HTTP retries default to minutes, so they are bounded here unless the
  user set the ``MLFLOW_HTTP_REQUEST_*`` variables themselves (``client.bounded_http``).
* After start, logging never raises and never waits on the network: rank 0 hands records
  to its ``Writer`` thread, which spills them to the fallback file when the store is slow
  or gone (see ``writer``).
* ``finish(status)`` queues the final status behind the last metrics and waits for the
  writer at most ``timeout_s`` (30 s: more than the call in flight, ~10 s, plus the last
  probe, 2 s; slow uploads get the rest). Whatever was not sent stays in the file for
  ``python -m pce_dist.tracking replay``.

This module only wires the pieces together on each rank; opening the run is in
``opening``, sending in ``writer`` and ``delivery``.
"""

from __future__ import annotations

import atexit
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pce_dist.config import RunConfig, to_dict
from pce_dist.redact import redact, secret_values
from pce_dist.tracking.client import SCRUB, log, watch_secrets
from pce_dist.tracking.fallback import FALLBACK_FILE, FallbackFile
from pce_dist.tracking.opening import open_run, resolve_tracking_uri
from pce_dist.tracking.system import Placement, SystemSampler, announce
from pce_dist.tracking.writer import QUEUE_SIZE, Writer

if TYPE_CHECKING:
    from pce_dist.distributed.env import DistEnv

_FINISH_TIMEOUT_S = 30.0  # > the call in flight (~10 s) + the last probe (2 s); slow uploads get the rest
_EXIT_TIMEOUT_S = 5.0  # interpreter exit without finish(): drain briefly, then to the file
_MODEL_TIMEOUT_S = 120.0  # the whole model upload at the end of a run (a few MB and ~2 requests per metric)


class Tracker:
    """Handle on the run. Build with ``Tracker.start``; use ``with tracker:`` or call ``finish``.

    ``tracking_uri`` is the display form (a password masked); the live URI stays in the
    MLflow client.
    """

    def __init__(self, run_id: str, *, is_main: bool, run_dir: str | Path, tracking_uri: str,
                 writer: Writer | None = None, sampler: SystemSampler | None = None,
                 live_uri: str | None = None) -> None:
        self.run_id = run_id
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self._writer = writer
        self._sampler = sampler  # this node's system metrics, on the lowest rank of every node
        self._live_uri = live_uri  # rank 0: for the model upload; never shown
        self._finished = False
        if writer is not None or sampler is not None:
            atexit.register(self._at_exit)

    @classmethod
    def start(cls, cfg: RunConfig, env: DistEnv, run_dir: str | Path, resume_run_id: str | None = None,
              *, init_source: Mapping[str, Any] | None = None, retry_interval_s: float = 30.0,
              queue_size: int = QUEUE_SIZE) -> Tracker:
        """Create (or resume) the run on rank 0 and share its id with every rank.

        ``init_source``: the checkpoint a warm start began from (``Checkpointer.init_source``),
        recorded as ``init_from*`` tags (``opening.init_tags``).

        Collective: every rank must call it. Raises ``RuntimeError`` on every rank when the
        store is unreachable or ``resume_run_id`` does not exist.
        """
        run_dir = Path(run_dir)
        uri = resolve_tracking_uri(cfg, run_dir)
        display = redact(uri)
        watch_secrets(secret_values(to_dict(cfg)) | secret_values(uri))
        gathered = env.all_gather_object((socket.gethostname(), env.node_rank))
        placement = Placement.from_ranks(gathered)
        hostnames, node_ranks = [h for h, _ in gathered], placement.node_ranks
        outcome: tuple[str, Any] | None = None
        client = None
        if env.is_main:
            try:
                client, run_id = open_run(cfg, env, run_dir, uri, resume_run_id, hostnames, node_ranks=node_ranks,
                                          init_source=init_source)
                outcome = ("ok", run_id)
            except Exception as exc:  # noqa: BLE001 -- reported on every rank below
                message = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                outcome = ("error", SCRUB.scrub(message))
        outcome = env.broadcast_object(outcome)
        if outcome[0] == "error":
            raise RuntimeError(f"experiment tracking could not start at {display!r}: {outcome[1]}")
        writer = None
        if env.is_main:
            writer = Writer(client, outcome[1], FallbackFile(run_dir / FALLBACK_FILE), display,
                            retry_interval_s=retry_interval_s, queue_size=queue_size)
        if env.is_main:
            announce(cfg.tracking, placement, uri, display)
        sampler = SystemSampler.start(cfg.tracking, placement, env.rank, outcome[1], uri,
                                      resumed=resume_run_id is not None)
        return cls(outcome[1], is_main=env.is_main, run_dir=run_dir, tracking_uri=display, writer=writer,
                   sampler=sampler, live_uri=uri if env.is_main else None)

    @property
    def num_overflowed(self) -> int:
        """Records that found the writer's queue full and went to the fallback file."""
        return self._writer.num_overflowed if self._writer is not None else 0

    @property
    def _open(self) -> bool:
        """Rank 0 before ``finish``: the only state in which anything is sent."""
        return self._writer is not None and not self._finished

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (the global optimizer step). Rank 0 only; never blocks, never raises."""
        if not self._open:
            return
        try:
            fields = {"step": int(step), "metrics": {str(k): float(v) for k, v in metrics.items()}}
        except (TypeError, ValueError) as exc:
            log.warning("tracking: metrics at step %s are not all numbers, skipped: %s", step, exc)
            return
        self._writer.submit(fields)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or directory) to the run, from the writer thread; it must still exist then."""
        if self._open:
            self._writer.submit({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_model(self, exported: str | Path, *, step: int, register_as: str = "",
                  timeout_s: float = _MODEL_TIMEOUT_S) -> str | None:
        """Log an exported model file as the run's MLflow model (rank 0; ``model.log_exported_model``).

        ``step``: the optimizer step of the model; MLflow links the run's metrics at that step
        to it, so the records queued so far are sent first (at most ``timeout_s`` of it).
        The upload runs on a thread of its own and is waited for ``timeout_s`` in all: the
        number of requests grows with the run's metric names, and object stores (S3, GCS)
        ignore MLflow's HTTP limits. Never raises: a store that is down or slow is a warning
        naming the command that logs the model later; returns ``models:/<model id>`` or ``None``.
        """
        if not self._open:
            return None
        self._stop_sampler()
        hint = f"log it later with `python -m pce_dist.export --mlflow {self.run_dir}`"
        deadline = time.monotonic() + timeout_s
        if not self._writer.drain(timeout_s) or not self._writer.online:
            log.warning("tracking: MLflow at %s is not taking records; the model is not logged (%s)",
                        self.tracking_uri, hint)
            return None
        from pce_dist.tracking.model import log_exported_model

        outcome: dict[str, Any] = {}

        def upload() -> None:
            try:
                outcome["uri"] = log_exported_model(exported, self.run_id, self._live_uri, step=step,
                                                    register_as=register_as)
            except Exception as exc:  # noqa: BLE001 -- reported below
                outcome["error"] = exc

        thread = threading.Thread(target=upload, name="pce-model-upload", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("tracking: logging the model to MLflow at %s did not finish within %.0f s; %s",
                        self.tracking_uri, timeout_s, hint)
            return None
        if "error" in outcome:
            exc = outcome["error"]
            log.warning("tracking: the model was not logged to MLflow at %s (%s: %s); %s", self.tracking_uri,
                        type(exc).__name__, exc, hint)
            return None
        return outcome["uri"]

    def finish(self, status: str = "FINISHED", timeout_s: float = _FINISH_TIMEOUT_S) -> None:
        """Send what can be sent, then close the run ("FINISHED", "FAILED" or "KILLED"); see module doc.

        Every rank: the node's system-metrics sampler stops first (before the status changes).
        """
        self._stop_sampler()
        if not self._open:
            return
        self._finished = True
        atexit.unregister(self._at_exit)
        self._writer.close(status, timeout_s)

    def _stop_sampler(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.stop()

    def _at_exit(self) -> None:
        """The interpreter exits without ``finish``: keep the queued records, leave the status alone."""
        self._stop_sampler()
        if not self._finished and self._writer is not None:
            self._finished = True
            self._writer.close(None, _EXIT_TIMEOUT_S)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")
