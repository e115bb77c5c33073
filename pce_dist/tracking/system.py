"""Per-node system metrics: MLflow's own sampler, one per node, into the job's one run.

Training metrics come from rank 0 alone, but a slow node or a leak on rank 3's host only
shows in that host's numbers. So the process with ``local_rank == 0`` on every node runs
MLflow's ``SystemMetricsMonitor`` (psutil: CPU, memory, disk, network; GPU utilisation
and memory through pynvml when ``nvidia-ml-py`` is installed) against the same run, with
the node id ``node<node_rank>``: its series are ``system/node<k>/cpu_utilization_percentage``
and so on, one set per node, never one per rank. ``MLFLOW_SYSTEM_METRICS_NODE_ID``, when a
user sets it, wins over that id (MLflow's own rule).

What it may cost training: nothing on the training thread. The sampler is MLflow's
daemon thread; its requests (one ``get_run`` per sample, batched ``log_batch``) run under
the writer's HTTP limits (``client.WRITE_LIMITS``), it stops by itself when the run is no
longer RUNNING or the store fails, and ``stop`` waits for it a bounded time. A sampler
that cannot start is a warning, not a failed run. On resume the series continue after the
run's last system step (MLflow's ``resume_logging``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from pce_dist import compat
from pce_dist import metrics as names
from pce_dist.tracking.client import CALL_LIMITS, WRITE_LIMITS, bounded_http, log, scrub_mlflow_logs

if TYPE_CHECKING:
    from pce_dist.config import TrackingConfig
    from pce_dist.distributed.env import DistEnv

_STOP_TIMEOUT_S = 15.0  # > one bounded request in flight (2 x 5 s), then the last flush is skipped


class SystemSampler:
    """The node's sampler; ``SystemSampler.start`` returns ``None`` where none should run."""

    def __init__(self, monitor: Any, node: str) -> None:
        self._monitor = monitor
        self.node_id = node

    @classmethod
    def start(cls, cfg: TrackingConfig, env: DistEnv, run_id: str, tracking_uri: str, *,
              resumed: bool) -> SystemSampler | None:
        """Start sampling this node into ``run_id`` (live ``tracking_uri``) if this rank is its sampler.

        ``resumed``: the run existed before this process (a resume): continue its system steps.
        """
        if not cfg.system_metrics or env.local_rank != 0:
            return None
        node = names.system_node(env.node_rank)
        try:
            with bounded_http(CALL_LIMITS):  # resume_logging reads the run once
                monitor = compat.system_metrics_monitor(
                    run_id, around_loop=lambda: bounded_http(WRITE_LIMITS), node_id=node, tracking_uri=tracking_uri,
                    sampling_interval=cfg.system_metrics_interval_s, resume_logging=resumed)
            scrub_mlflow_logs()  # the monitor's loggers exist now; they quote request URLs
            monitor.start()
        except Exception as exc:  # noqa: BLE001 -- system metrics are never worth a failed run
            log.warning("tracking: system metrics of %s are off for this run: %s: %s", node, type(exc).__name__, exc)
            return None
        return cls(monitor, monitor.node_id or node)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop the thread and send what it holds; gives up (a warning) after ``timeout_s``."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if not compat.stop_system_metrics_monitor(monitor, timeout_s):  # MLflow's finish() has no bound
            log.warning("tracking: the system-metrics sampler of %s did not stop within %.0f s; its last "
                        "samples are dropped", self.node_id, timeout_s)
            return
        done = threading.Event()

        def flush() -> None:
            try:
                with bounded_http(WRITE_LIMITS):
                    monitor.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: last system metrics of %s not sent: %s", self.node_id, exc)
            done.set()

        threading.Thread(target=flush, name="pce-system-metrics-flush", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("tracking: the last system metrics of %s were not sent within %.0f s", self.node_id,
                        timeout_s)
