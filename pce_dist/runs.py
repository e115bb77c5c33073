"""Experiment tracking, reading side: run summaries back out of MLflow (``pce_dist.compare``).

``pce_dist.tracking`` writes runs; this module only reads them, with the same bounded
HTTP limits, and never creates a store. Together they are the only two modules that
talk to MLflow. URIs in error messages are redacted (``pce_dist.redact``): a tracking
URI may carry a password.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pce_dist.metrics import SUMMARY_METRICS, metric_goal
from pce_dist.redact import redact
from pce_dist.tracking import CALL_LIMITS, PROBE_LIMITS, bounded_http, is_remote_uri


def run_dir_store_uri(run_dir: str | Path) -> str:
    """The per-run sqlite store of a run directory (see ``tracking.resolve_tracking_uri``); it must exist."""
    db = Path(run_dir).resolve() / "mlflow.db"
    if not db.is_file():
        raise ValueError(f"{run_dir} has no mlflow.db: not a run directory, or its run logged to another "
                         "tracking URI (pass that with --tracking-uri)")
    return f"sqlite:///{db}"


def _require_existing_local_store(uri: str) -> None:
    """Reading must not create a store: MLflow makes an empty sqlite file / mlruns folder on first use."""
    if is_remote_uri(uri):
        return
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    elif uri.startswith("file://"):
        path = Path(uri[len("file://"):])
    elif uri.startswith("file:") or ":" not in uri:  # a plain path is MLflow's file store
        path = Path(uri.removeprefix("file:"))
    else:
        return  # another database URL (postgresql://, mysql://): connecting tells
    if not path.exists():
        raise RuntimeError(f"the tracking store at {redact(uri)!r} does not exist ({path} is missing)")


def _paged(call: Any, **kwargs: Any) -> list:
    items, token = [], None
    while True:
        page = call(page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def fetch_runs(tracking_uri: str, experiment: str | None = None, *,
               best_keys: tuple[str, ...] | list[str] = SUMMARY_METRICS) -> list[dict[str, Any]]:
    """Summaries of the active runs in ``experiment`` (every experiment when ``None``), oldest first.

    Read-only: a local store that does not exist is an error, not created. Each summary:
    ``run_id, run_name, experiment, status, start_time_ms, wall_time_s, params, tags,
    metrics`` (latest value = value at the highest step) ``and best`` (over the whole
    history, for the ``best_keys`` that have a ``metrics.metric_goal``). By default the
    ``best_keys`` are the headline metrics, ``metrics.SUMMARY_METRICS``.

    ``wall_time_s`` runs from start to the later of the end time and the last timestamp of
    the ``best_keys`` histories: a resumed run is RUNNING with its previous end time still
    set, and a crashed one never got one. It spans restarts, downtime included.

    Raises:
        RuntimeError: the store is missing or does not answer.
        ValueError: ``experiment`` is not in the store (the message lists the ones that are).
    """
    from mlflow import MlflowClient

    _require_existing_local_store(tracking_uri)
    with bounded_http(PROBE_LIMITS):
        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiments = _paged(client.search_experiments)
        except Exception as exc:
            raise RuntimeError(redact(f"the tracking store at {tracking_uri!r} is not reachable "
                                      f"({type(exc).__name__}: {exc})")) from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, name in names.items() if name == experiment]
        if not ids:
            raise ValueError(f"no experiment {experiment!r} at {redact(tracking_uri)}; it has "
                             f"{sorted(names.values())}")
    else:
        ids = list(names)
    with bounded_http(CALL_LIMITS):
        runs = _paged(client.search_runs, experiment_ids=ids, max_results=1000) if ids else []
        summaries = [_summarise_run(client, run, names, best_keys) for run in runs]
    return sorted(summaries, key=lambda r: r["start_time_ms"] or 0)


def _summarise_run(client: Any, run: Any, experiment_names: dict[str, str], best_keys: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    best: dict[str, float] = {}
    last_seen = info.end_time or 0
    for key in dict.fromkeys(best_keys):
        if key not in data.metrics:
            continue
        history = client.get_metric_history(info.run_id, key)
        last_seen = max([last_seen] + [m.timestamp for m in history])
        values = [m.value for m in history if math.isfinite(m.value)]
        goal = metric_goal(key)
        if values and goal is not None:
            best[key] = max(values) if goal == "max" else min(values)
    start = info.start_time
    return {
        "run_id": info.run_id,
        "run_name": info.run_name or "",
        "experiment": experiment_names.get(info.experiment_id, info.experiment_id),
        "status": info.status,
        "start_time_ms": start,
        "wall_time_s": (last_seen - start) / 1000.0 if start and last_seen >= start else None,
        "params": dict(data.params),
        "tags": {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
        "metrics": dict(data.metrics),
        "best": best,
    }
