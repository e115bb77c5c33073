"""Per-node system metrics: MLflow's own sampler, one per node, into the job's one run.

Training metrics come from rank 0 alone, but a slow node or a leak on rank 3's host only
shows in that host's numbers. So one process per node (the node's lowest rank) runs MLflow's
``SystemMetricsMonitor`` (psutil: CPU, memory, disk, network; GPU utilisation and memory
through pynvml when ``nvidia-ml-py`` is installed) against the same run, with the node id
``node<k>``: its series are ``system/node<k>/cpu_utilization_percentage`` and so on, one
set per node, never one per rank. ``MLFLOW_SYSTEM_METRICS_NODE_ID`` and
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, when a user sets them, win (MLflow's rule).

Which node is which (``placement``): the launcher's node rank (``DistEnv.node_rank``:
SLURM_NODEID, torchrun's GROUP_RANK). A launcher that gives none makes every node claim
node 0; when the gathered hostnames show that (one node rank, several hosts), the ids are
taken from the order of the hosts instead, with a warning.

Which nodes sample (``tracking.system_metrics_nodes``): every node writes into the run
itself, so with a *file* store (the default ``sqlite:///<output_dir>/mlflow.db``) several
hosts would write one SQLite file at once -- unsafe on the network filesystems clusters
share. ``auto`` samples every node when the store is a server (``http(s)://``) and node 0
only otherwise (a warning says so); ``all`` every node (a store that takes concurrent
writers, e.g. one local disk); ``main`` node 0 only.

What it may cost training: nothing on the training thread. The sampler is MLflow's
daemon thread (restarted after a failed request, ``compat.system_metrics_monitor``), and
``stop`` waits for it a bounded time. A sampler that cannot start is a warning, not a
failed run. On resume the series continue after the run's last system step (MLflow's
``resume_logging``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pce_dist import compat
from pce_dist import metrics as names
from pce_dist.tracking.client import CALL_LIMITS, WRITE_LIMITS, bounded_http, is_remote_uri, log, scrub_mlflow_logs

if TYPE_CHECKING:
    from pce_dist.config import TrackingConfig

_STOP_TIMEOUT_S = 15.0  # > one request in flight, then the last samples are dropped
_RESTART_AFTER_S = 30.0  # a failed request: MLflow's loop ends; start it again this much later


@dataclass(frozen=True)
class Placement:
    """Every rank's node: ``node_ranks[r]``, and the rank that samples each node (its lowest)."""

    node_ranks: list[int]
    hosts: dict[int, str]  # node rank -> host
    consistent: bool  # False: the launcher's node ranks disagreed with the hostnames

    @classmethod
    def from_ranks(cls, gathered: list[tuple[str, int]]) -> Placement:
        """``gathered[r] = (hostname, launcher node rank)`` of every rank ``r``."""
        by_node: dict[int, set[str]] = {}
        for host, node in gathered:
            by_node.setdefault(node, set()).add(host)
        consistent = all(len(hosts) == 1 for hosts in by_node.values())
        if consistent:
            node_ranks = [node for _, node in gathered]
        else:  # several hosts claim one node rank: number the hosts in rank order instead
            order = list(dict.fromkeys(host for host, _ in gathered))
            node_ranks = [order.index(host) for host, _ in gathered]
        hosts = {}
        for (host, _), node in zip(gathered, node_ranks):
            hosts.setdefault(node, host)
        return cls(node_ranks, dict(sorted(hosts.items())), consistent)

    def is_sampler(self, rank: int) -> bool:
        return self.node_ranks.index(self.node_ranks[rank]) == rank

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


def samples_node(cfg: TrackingConfig, node_rank: int, tracking_uri: str) -> bool:
    """Whether the node ``node_rank`` samples into a store at ``tracking_uri`` (see module doc)."""
    if not cfg.system_metrics:
        return False
    if node_rank == 0 or cfg.system_metrics_nodes == "all":
        return True
    return cfg.system_metrics_nodes == "auto" and is_remote_uri(tracking_uri)


class SystemSampler:
    """The node's sampler; ``SystemSampler.start`` returns ``None`` where none should run."""

    def __init__(self, monitor: Any, node: str) -> None:
        self._monitor = monitor
        self.node_id = node

    @classmethod
    def start(cls, cfg: TrackingConfig, placement: Placement, rank: int, run_id: str, tracking_uri: str, *,
              resumed: bool) -> SystemSampler | None:
        """Start sampling this node into ``run_id`` (live ``tracking_uri``) if ``rank`` is its sampler.

        ``resumed``: the run existed before this process (a resume): continue its system steps.
        """
        node_rank = placement.node_ranks[rank]
        if not placement.is_sampler(rank) or not samples_node(cfg, node_rank, tracking_uri):
            return None
        node = names.system_node(node_rank)
        try:
            with bounded_http(CALL_LIMITS):  # resume_logging reads the run once
                monitor = compat.system_metrics_monitor(
                    run_id, restart_after_s=_RESTART_AFTER_S, node_id=node, tracking_uri=tracking_uri,
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
                    compat.flush_system_metrics(monitor)
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: last system metrics of %s not sent: %s", self.node_id, exc)
            done.set()

        threading.Thread(target=flush, name="pce-system-metrics-flush", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("tracking: the last system metrics of %s were not sent within %.0f s", self.node_id,
                        timeout_s)


def announce(cfg: TrackingConfig, placement: Placement, tracking_uri: str, display_uri: str) -> None:
    """Rank 0: say which nodes sample, when that is not every node, and a node-id repair."""
    if not placement.consistent:
        log.warning("tracking: the launcher's node ranks do not match the hosts (one node rank on several hosts); "
                    "system metrics name nodes by host order instead: %s",
                    ", ".join(f"{names.system_node(n)}={h}" for n, h in placement.hosts.items()))
    skipped = [n for n in placement.hosts if cfg.system_metrics and not samples_node(cfg, n, tracking_uri)]
    if skipped:
        log.warning("tracking: system metrics come from node0 only, not from the other %d nodes: the store %s is a "
                    "file that several hosts would write at once (unsafe on a shared filesystem). Use a tracking "
                    "server for per-node series, or tracking.system_metrics_nodes=all for a store that takes "
                    "concurrent writers", len(skipped), display_uri)
