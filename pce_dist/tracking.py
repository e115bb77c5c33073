"""Experiment tracking: the only module in pce_dist that talks to MLflow.

One MLflow run per training run, owned by rank 0; other ranks hold the same run id and
no-op. The contract with the training loop is asymmetric on purpose:

* ``Tracker.start`` is strict. A tracking store that cannot be reached at start raises
  ``RuntimeError`` naming the URI on *every* rank (rank 0 broadcasts the failure, so
  the others do not sit in a collective until ``dist.timeout_s``), within seconds:
  MLflow's HTTP retries default to minutes, so they are bounded here unless the user
  set the ``MLFLOW_HTTP_REQUEST_*`` variables themselves.
* After start, logging never raises. When the store goes away mid-run the tracker warns
  once, appends every metric record to ``<run_dir>/metrics_fallback.jsonl`` (one JSON
  object per line: ``{"step", "timestamp_ms", "metrics"}``), and retries the store at
  most every ``retry_interval_s`` -- so an outage costs one bounded request per
  interval, not one per step. When the store answers again, the records held in memory
  are replayed in order with their original steps and timestamps, and a line
  ``{"replayed": n}`` is appended to the file. Records still unsent at ``finish`` stay
  in the file (and the run stays RUNNING on the server).

Where runs go: ``MLFLOW_TRACKING_URI`` (env) > ``tracking.tracking_uri`` (config) >
``sqlite:///<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``, which
needs no server and travels with the run directory. Browse it with
``mlflow ui --backend-store-uri sqlite:///<abs run_dir>/mlflow.db``.

What is recorded: params = the flattened resolved config (immutable in MLflow, so on
resume only keys not yet logged are added; a changed value is warned about and kept as
the old one); tags = things that may change across restarts (world size, EP size,
hostnames, git commit, SLURM job id, restart count); artifact ``config.yaml`` = the
resolved config of the latest start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pce_dist.config import RunConfig, flatten, to_yaml

if TYPE_CHECKING:
    from pce_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)

FALLBACK_FILE = "metrics_fallback.jsonl"
# MLflow's batch limits (mlflow.utils.validation); older servers enforce the same numbers.
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_MAX = 6000  # MLflow >= 2.x; values are truncated client-side to stay valid
_TAG_VALUE_MAX = 5000
_PENDING_MAX = 100_000  # records kept in memory for replay; the JSONL file keeps all of them
# (retries, backoff factor, per-request timeout in s) instead of MLflow's 7 retries with
# exponential backoff (minutes). The start probe fails fast; a mid-run call retries once
# (urllib3 retries the first time without sleeping) and may take longer to upload an
# artifact -- a call that still fails only switches to the local fallback.
_PROBE_LIMITS = (2, 1, 5)
_CALL_LIMITS = (1, 1, 15)


def resolve_tracking_uri(cfg: RunConfig, run_dir: str | Path) -> str:
    """The environment wins over the config, which wins over a per-run sqlite file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _is_rejection(exc: BaseException) -> bool:
    """The store answered and said no (bad key/value): retrying the same request cannot help."""
    return getattr(exc, "error_code", None) in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


@contextlib.contextmanager
def _bounded_http(limits: tuple[int, int, int]) -> Iterator[None]:
    """Cap MLflow's HTTP retries/timeouts for one call, unless the user set them."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    added = [n for n in names if n not in os.environ]
    for name, value in zip(names, limits):
        if name in added:
            os.environ[name] = str(value)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


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


class Tracker:
    """Handle on the run. Build with ``Tracker.start``; use ``with tracker:`` or call ``finish``."""

    def __init__(self, run_id: str, *, is_main: bool, run_dir: str | Path, tracking_uri: str,
                 client: Any = None, retry_interval_s: float = 30.0) -> None:
        self.run_id = run_id
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self._client = client
        self._retry_interval_s = retry_interval_s
        self._offline = False
        self._retry_at = 0.0
        self._pending: deque[dict] = deque()
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._dropped = 0
        self._finished = False

    # ------------------------------------------------------------------ start (strict)

    @classmethod
    def start(cls, cfg: RunConfig, env: DistEnv, run_dir: str | Path, resume_run_id: str | None = None,
              *, retry_interval_s: float = 30.0) -> Tracker:
        """Create (or resume) the run on rank 0 and share its id with every rank.

        Collective: every rank must call it. Raises ``RuntimeError`` on every rank when the
        store is unreachable or ``resume_run_id`` does not exist.
        """
        run_dir = Path(run_dir)
        uri = resolve_tracking_uri(cfg, run_dir)
        hostnames = env.all_gather_object(socket.gethostname())
        outcome: tuple[str, Any] | None = None
        client = None
        if env.is_main:
            try:
                client, run_id = _open_run(cfg, env, run_dir, uri, resume_run_id, hostnames)
                outcome = ("ok", run_id)
            except Exception as exc:  # noqa: BLE001 -- reported on every rank below
                outcome = ("error", str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}")
        outcome = env.broadcast_object(outcome)
        if outcome[0] == "error":
            raise RuntimeError(f"experiment tracking could not start at {uri!r}: {outcome[1]}")
        return cls(outcome[1], is_main=env.is_main, run_dir=run_dir, tracking_uri=uri, client=client,
                   retry_interval_s=retry_interval_s)

    # ------------------------------------------------------------------ logging (never raises)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (the global optimizer step). Rank 0 only; others no-op."""
        if not self.is_main or self._finished:
            return
        try:
            record = {"step": int(step), "timestamp_ms": int(time.time() * 1000),
                      "metrics": {str(k): float(v) for k, v in metrics.items()}}
        except (TypeError, ValueError) as exc:
            log.warning("tracking: metrics at step %s are not all numbers, skipped: %s", step, exc)
            return
        if self._reachable():
            try:
                self._replay()
                self._send(record)
                return
            except Exception as exc:  # noqa: BLE001
                self._go_offline(exc)
        self._spill(record)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or directory) to the run; retried later if the store is down."""
        if not self.is_main or self._finished:
            return
        self._pending_artifacts.append((str(path), artifact_path))
        if self._reachable():
            try:
                self._replay()
            except Exception as exc:  # noqa: BLE001
                self._go_offline(exc)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush what can be flushed and close the run ("FINISHED", "FAILED" or "KILLED")."""
        if not self.is_main or self._finished:
            return
        self._finished = True
        self._retry_at = 0.0  # one last attempt even inside a retry interval
        try:
            self._replay()
            with _bounded_http(_CALL_LIMITS):
                self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning("tracking: could not close run %s at %s (%s); %d metric records remain only in %s",
                        self.run_id, self.tracking_uri, exc, len(self._pending) + self._dropped,
                        self.fallback_path)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    # ------------------------------------------------------------------ outage handling

    def _reachable(self) -> bool:
        return not self._offline or time.monotonic() >= self._retry_at

    def _go_offline(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self._retry_interval_s
        if not self._offline:
            self._offline = True
            log.warning("tracking: MLflow at %s stopped answering (%s: %s); training continues, metrics go "
                        "to %s and are replayed when it is back (retry every %.0f s)", self.tracking_uri,
                        type(exc).__name__, exc, self.fallback_path, self._retry_interval_s)

    def _spill(self, record: dict) -> None:
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            log.warning("tracking: cannot write %s: %s", self.fallback_path, exc)
        self._pending.append(record)
        if len(self._pending) > _PENDING_MAX:
            self._pending.popleft()
            self._dropped += 1

    def _send(self, record: dict) -> None:
        """Raises only when the store is unreachable; a rejected record is dropped with a warning."""
        from mlflow.entities import Metric

        metrics = [Metric(k, v, record["timestamp_ms"], record["step"]) for k, v in record["metrics"].items()]
        try:
            with _bounded_http(_CALL_LIMITS):
                for chunk in _chunks(metrics, _METRICS_PER_BATCH):
                    self._client.log_batch(self.run_id, metrics=chunk)
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            log.warning("tracking: MLflow rejected the metrics of step %s, dropped: %s", record["step"], exc)

    def _upload(self, path: str, artifact_path: str | None) -> None:
        if not Path(path).exists():
            log.warning("tracking: artifact %s no longer exists, not uploaded", path)
            return
        try:
            with _bounded_http(_CALL_LIMITS):
                if Path(path).is_dir():
                    self._client.log_artifacts(self.run_id, path, artifact_path)
                else:
                    self._client.log_artifact(self.run_id, path, artifact_path)
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            log.warning("tracking: MLflow rejected artifact %s, dropped: %s", path, exc)

    def _replay(self) -> None:
        """Send what piled up during an outage, oldest first; raises if the store is still down."""
        replayed = 0
        while self._pending:
            self._send(self._pending[0])
            self._pending.popleft()
            replayed += 1
        while self._pending_artifacts:
            self._upload(*self._pending_artifacts[0])
            self._pending_artifacts.pop(0)
        if self._offline:
            self._offline = False
            log.warning("tracking: MLflow at %s is back; replayed %d metric records%s", self.tracking_uri,
                        replayed, f" ({self._dropped} older ones only in the fallback file)" if self._dropped else "")
            with contextlib.suppress(OSError), self.fallback_path.open("a") as f:
                f.write(json.dumps({"replayed": replayed}) + "\n")


# ----------------------------------------------------------------------------- rank 0: open the run


def _open_run(cfg: RunConfig, env: DistEnv, run_dir: Path, uri: str, resume_run_id: str | None,
              hostnames: list[str]) -> tuple[Any, str]:
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    if not _is_remote(uri):
        run_dir.mkdir(parents=True, exist_ok=True)
    with _bounded_http(_PROBE_LIMITS):
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        except Exception as exc:
            raise RuntimeError(f"the tracking store at {uri!r} is not reachable ({type(exc).__name__}: {exc}); "
                               "start it, or point tracking.tracking_uri / MLFLOW_TRACKING_URI elsewhere") from None
    with _bounded_http(_CALL_LIMITS):
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
            run_id = client.create_run(experiment_id, run_name=cfg.tracking.run_name or None).info.run_id
        param_list = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(param_list, _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        tags = _run_tags(env, hostnames, restart_count)
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for chunk in _chunks(tag_list, _PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))
            client.log_artifact(run_id, str(path))
    return client, run_id


def _experiment_id(client: Any, name: str, experiment: Any, run_dir: Path, uri: str) -> str:
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts inside the run directory; a server decides for itself.
    location = None if _is_remote(uri) else (run_dir.resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        existing = client.get_experiment_by_name(name)  # another run created it meanwhile
        if existing is None:
            raise
        return existing.experiment_id


def _param_value(value: Any) -> str:
    return str(value)[:_PARAM_VALUE_MAX]


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


# ----------------------------------------------------------------------------- reading runs back (compare)

# Headline metrics whose whole history is read to find the best value; every other
# metric costs nothing extra (its latest value comes with the run).
SUMMARY_METRICS = ("eval/accuracy", "eval/loss", "val/accuracy", "perf/img_per_s")
_HIGHER_IS_BETTER = ("accuracy", "acc", "top1", "top5", "f1", "precision", "recall", "img_per_s", "samples_per_s",
                     "throughput")
_LOWER_IS_BETTER = ("loss", "ce", "error", "err", "step_time_s", "seconds")


def metric_goal(key: str) -> str | None:
    """``"max"`` for accuracy-like names, ``"min"`` for loss-like ones, ``None`` when "best" has no meaning.

    Decided by the last path component (``eval/accuracy`` -> ``accuracy``), so every split
    and prefix follows the same rule.
    """
    name = key.rsplit("/", 1)[-1].lower()
    if name in _HIGHER_IS_BETTER:
        return "max"
    if name in _LOWER_IS_BETTER:
        return "min"
    return None


def run_dir_store_uri(run_dir: str | Path) -> str:
    """The per-run sqlite store of a run directory (see ``resolve_tracking_uri``); it must exist."""
    db = Path(run_dir).resolve() / "mlflow.db"
    if not db.is_file():
        raise ValueError(f"{run_dir} has no mlflow.db: not a run directory, or its run logged to another "
                         "tracking URI (pass that with --tracking-uri)")
    return f"sqlite:///{db}"


def _require_existing_local_store(uri: str) -> None:
    """Reading must not create a store: MLflow makes an empty sqlite file / mlruns folder on first use."""
    if _is_remote(uri):
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
        raise RuntimeError(f"the tracking store at {uri!r} does not exist ({path} is missing)")


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
    history, for the ``best_keys`` that have a ``metric_goal``).

    ``wall_time_s`` runs from start to the later of the end time and the last timestamp of
    the ``best_keys`` histories: a resumed run is RUNNING with its previous end time still
    set, and a crashed one never got one. It spans restarts, downtime included.

    Raises:
        RuntimeError: the store is missing or does not answer.
        ValueError: ``experiment`` is not in the store (the message lists the ones that are).
    """
    from mlflow import MlflowClient

    _require_existing_local_store(tracking_uri)
    with _bounded_http(_PROBE_LIMITS):
        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiments = _paged(client.search_experiments)
        except Exception as exc:
            raise RuntimeError(f"the tracking store at {tracking_uri!r} is not reachable "
                               f"({type(exc).__name__}: {exc})") from None
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, name in names.items() if name == experiment]
        if not ids:
            raise ValueError(f"no experiment {experiment!r} at {tracking_uri}; it has {sorted(names.values())}")
    else:
        ids = list(names)
    with _bounded_http(_CALL_LIMITS):
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
