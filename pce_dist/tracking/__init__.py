"""Experiment tracking, writing side: the only package in pce_dist that sends to MLflow.

(``pce_dist.runs`` reads runs back for ``compare``.) One module per concern:

* ``tracker``  -- ``Tracker``, the handle every rank holds: strict start, logging that
  never raises or waits, a bounded ``finish``;
* ``opening``  -- rank 0 opens the run: tracking URI, experiment, params, tags, config;
* ``writer``   -- rank 0's background thread with its bounded queue and offline spill;
* ``fallback`` -- the spill file's format, delivered offsets and lock;
* ``delivery`` -- sending records in logging order, refusals, statuses: shared by the
  writer and ``replay``, so the file's invariants have one home each;
* ``replay``   -- ``python -m pce_dist.tracking replay RUN_DIR``;
* ``system``   -- per-node system metrics (MLflow's sampler on the lowest rank of each node);
* ``model``    -- the trained model as an MLflow PyTorch model;
* ``client``   -- bounded HTTP, the scrubbed logger: the edge to MLflow, also used by
  ``pce_dist.runs``.

This module only re-exports the names used outside the package.
"""

from pce_dist.tracking.client import CALL_LIMITS, PROBE_LIMITS, bounded_http, is_remote_uri
from pce_dist.tracking.fallback import FALLBACK_FILE, FallbackFile
from pce_dist.tracking.model import log_exported_model
from pce_dist.tracking.opening import git_commit, resolve_tracking_uri
from pce_dist.tracking.replay import main, replay_run_dir
from pce_dist.tracking.tracker import Tracker

__all__ = ["CALL_LIMITS", "FALLBACK_FILE", "PROBE_LIMITS", "FallbackFile", "Tracker", "bounded_http",
           "git_commit", "log_exported_model", "is_remote_uri", "main", "replay_run_dir", "resolve_tracking_uri"]
