"""Rank 0 opens the MLflow run: where it goes, and what is recorded about it at start.

Kept apart from the writer thread because it is the strict half of the contract: it runs
on the main thread before training, under the start limits, and any failure here is
raised (``Tracker.start`` reports it on every rank) instead of being spilled to a file.

Where runs go: ``MLFLOW_TRACKING_URI`` (env) > ``tracking.tracking_uri`` (config) >
``sqlite:///<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts``.

What is recorded: params = the flattened resolved config (immutable in MLflow, so on
resume only keys not yet logged are added); tags = things that may change across
restarts (world size, EP size, hostnames, the host of each node id, git commit, SLURM job id,
restart count) and,
for a warm start, where it began (``init_from``, ``init_from_run_id``, ``init_from_step``,
``init_optimizer``);
artifact ``config.yaml`` = the resolved config of the latest start. Params, tags and the
artifact go through ``pce_dist.redact``; the live URI is held only by the MLflow client.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pce_dist import metrics as names
from pce_dist.config import RunConfig, flatten, to_yaml
from pce_dist.redact import redact
from pce_dist.tracking.client import CALL_LIMITS, PROBE_LIMITS, bounded_http, chunks, is_remote_uri, log
from pce_dist.tracking.relocation import ARTIFACTS_DIR, follow_run_dir

if TYPE_CHECKING:
    from pce_dist.distributed.env import DistEnv

# MLflow's batch limits (mlflow.utils.validation); older servers enforce the same numbers.
_PARAMS_TAGS_PER_BATCH = 100
_PARAM_VALUE_MAX = 6000  # MLflow >= 2.x; values are truncated client-side to stay valid
_TAG_VALUE_MAX = 5000


def resolve_tracking_uri(cfg: RunConfig, run_dir: str | Path) -> str:
    """The live URI: the environment wins over the config, which wins over a per-run sqlite file.

    It may carry a password; show ``redact(uri)`` (``Tracker.tracking_uri``) instead.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the repository containing ``cwd``, or "unknown" (not a repo, no git, no commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run(cfg: RunConfig, env: DistEnv, run_dir: Path, uri: str, resume_run_id: str | None,
             hostnames: list[str], init_source: dict | None = None,
             node_ranks: list[int] | None = None) -> tuple[Any, str]:
    """Create (or resume) the run and record params, tags and ``config.yaml``; returns (client, run id).

    Rank 0 only. Raises when the store does not answer or ``resume_run_id`` is not in it.
    A run directory's own sqlite store is first pointed at where the directory is now
    (``relocation.follow_run_dir``): a copied or moved run writes only inside itself.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    if not is_remote_uri(uri):
        run_dir.mkdir(parents=True, exist_ok=True)
        follow_run_dir(uri, run_dir)
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
                raise RuntimeError(
                    f"cannot resume MLflow run {resume_run_id!r}: {exc}. A resume continues the run that wrote the "
                    f"checkpoint, in that run's tracking store ({redact(uri)!r} here); to start a new run from "
                    "another run's checkpoint use checkpoint.init_from=PATH instead of checkpoint.resume") from None
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
        tags = _run_tags(env, hostnames, restart_count, node_ranks)
        if init_source and not resume_run_id:
            tags.update(init_tags(init_source))
        for kind, items in (("params", [Param(k, v) for k, v in params.items()]),
                            ("tags", [RunTag(k, redact(v)) for k, v in tags.items()])):
            for chunk in chunks(items, _PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, **{kind: chunk})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))  # redacted
            client.log_artifact(run_id, str(path))
    return client, run_id


def _experiment_id(client: Any, name: str, experiment: Any, run_dir: Path, uri: str) -> str:
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts inside the run directory; a server decides for itself.
    location = None if is_remote_uri(uri) else (run_dir.resolve() / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        existing = client.get_experiment_by_name(name)  # another run created it meanwhile
        if existing is None:
            raise
        return existing.experiment_id


def init_tags(source: dict) -> dict[str, str]:
    """The tags of a warm start (``Checkpointer.init_source``); the path is redacted when written."""
    return {"init_from": str(source["path"]), "init_from_run_id": str(source.get("run_id") or ""),
            "init_from_step": str(source["step"]), "init_optimizer": str(bool(source.get("optimizer"))).lower()}


def _param_value(value: Any) -> str:
    return redact(str(value))[:_PARAM_VALUE_MAX]


def _run_tags(env: DistEnv, hostnames: list[str], restart_count: int,
              node_ranks: list[int] | None = None) -> dict[str, str]:
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
    if node_ranks is not None:  # which host each system/node<k>/ series measures
        node_hosts = dict(sorted(zip(node_ranks, hostnames)))
        tags["nodes"] = ",".join(f"{names.system_node(n)}={h}" for n, h in node_hosts.items())[:_TAG_VALUE_MAX]
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
