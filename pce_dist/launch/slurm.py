"""Submit training to SLURM with submitit; the job checkpoints on every rank, requeues itself, resumes.

    python launch/slurm.py --nodes 2 [--gpus-per-node 8] [--partition P] [--time 1-00:00:00]
        [--config configs/X.yaml] [--output-dir DIR] [--dry-run] [key=value ...]

In the shape of DINOv2's ``run/submit.py``, and the only module that imports submitit:
``launch/slurm.py`` calls ``main`` here; the request is checked by
``pce_dist.launch.slurm_request``; options become a submitit executor, and ``TrainJob`` --
run by every task -- calls the same entry point as ``launch/local.py``
(``pce_dist.train.run``; ranks come from SLURM's variables through ``DistEnv``). ``TrainJob``
lives in the package, so submitit pickles it by reference (the job imports this module from
the repo on its ``PYTHONPATH``); the pickle carries the resolved config, so a requeued job
trains exactly what was submitted. Outputs stay in ``--output-dir`` (checkpoints, mlflow.db)
and ``<output-dir>/slurm/<job id>/`` (script, per-rank logs): a requeue keeps both.

Why not submitit's checkpoint hook: submitit calls it on global rank 0 only, and a sharded
checkpoint needs every rank. Instead (docs/slurm.md has the whole sequence) the signal --
USR2 ``--signal-delay`` s before the time limit, ``scancel --signal=USR2``, or SIGTERM -- only
sets a flag in each task; the training loop all-reduces it and every rank saves. Then rank 0
leaves a marker file and every task exits 0, and the batch script's teardown -- which runs
once srun has returned, i.e. after every rank exited by itself -- requeues the job. A requeue
from rank 0 instead would race the other ranks' exit and kill them. ``SLURM_RESTART_COUNT``
is counted against ``--max-requeues``; past it rank 0 raises ``NotRequeuedError`` naming the
checkpoint, so the job ends FAILED with a clear message and a valid checkpoint.

Bad options fail before anything is submitted, with exit code 2 (``slurm_request``).
``--dry-run`` runs the same checks, prints the sbatch script and the resolved config, and
submits nothing.

The MLflow run id exists only once rank 0 has started; the launcher does not wait for it but
prints the tracking URI and the tag that finds the run (``tags.slurm_job_id``).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from pce_dist import compat
from pce_dist.launch.slurm_request import (JobSpec, LaunchError, build_parser, check_partition, resolve_config,
                                           resolve_cpus, sbatch_test_only)

REPO_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)

REQUEUE_MARKER = "requeue_requested"  # in <output_dir>/slurm/<job id>/: rank 0 -> batch-script teardown


# ----------------------------------------------------------------------------- inside the job


@dataclass
class JobOutcome:
    """What each task returns when the job ends (submitit pickles it per task)."""

    status: str  # "FINISHED" | "STOPPED"
    rank: int
    run_id: str
    checkpoint: str | None
    restarts: int
    metrics: dict[str, float]


class NotRequeuedError(RuntimeError):
    """The run stopped after a checkpoint and the job will not be requeued."""


def why_not_requeue(cluster: str, restarts: int, max_requeues: int, stopped_by: str = "") -> str | None:
    """None when a stopped job may requeue, else the reason why not."""
    if stopped_by == "SIGUSR1":
        return "SIGUSR1 is a user's stop request, not a preemption"
    if cluster != "slurm":
        return f"--cluster {cluster} cannot requeue"
    if restarts >= max_requeues:
        return f"it has been requeued {restarts} times already (--max-requeues {max_requeues})"
    return None


@dataclass(frozen=True)
class TrainJob:
    """The callable submitit runs in every task. Picklable and self-contained: it carries the
    resolved config, so a requeued job trains exactly what was submitted."""

    config: dict
    cluster: str
    max_requeues: int
    stop_signals: tuple[int, ...]

    def requeue_marker(self, job_id: str) -> Path:
        return Path(self.config["output_dir"]) / "slurm" / job_id / REQUEUE_MARKER

    def __call__(self) -> JobOutcome:
        from pce_dist import stop as stop_signals

        stop = stop_signals.install(self.stop_signals)  # first: replaces submitit's handlers
        from pce_dist.config import apply_overrides, config_from_dict
        from pce_dist.distributed.env import DistEnv
        from pce_dist.train import run, setup_logging

        _export_local_layout(self.cluster)
        cfg = config_from_dict(self.config)
        apply_overrides(cfg, _secret_overrides())  # live values, kept out of the pickled job
        env = DistEnv.from_environ(cfg.dist).init()
        setup_logging(env, cfg)
        job_id = os.environ.get("SLURM_JOB_ID", "")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if env.is_main:
            log.info("job %s attempt %d (%d of %d requeues used), %d ranks", job_id or "-", restarts + 1,
                     restarts, self.max_requeues, env.world_size)
            if job_id:
                self.requeue_marker(job_id).unlink(missing_ok=True)  # a stale one from a killed attempt
        try:
            result = run(cfg, env, stop)
        finally:
            env.destroy()
        outcome = JobOutcome(status=result.status, rank=env.rank, run_id=result.run_id,
                             checkpoint=result.checkpoint, restarts=restarts, metrics=result.metrics)
        if result.status == "STOPPED":
            self._after_stop(outcome, env.is_main, job_id, cfg.output_dir, stop.name)
        return outcome

    def _after_stop(self, outcome: JobOutcome, is_main: bool, job_id: str, output_dir: str,
                    stopped_by: str) -> None:
        """Every rank checkpointed. Requeue (leave the marker, exit 0) or end with a clear error."""
        reason = why_not_requeue(self.cluster, outcome.restarts, self.max_requeues, stopped_by)
        if reason is None:
            if is_main:
                marker = self.requeue_marker(job_id)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{outcome.checkpoint}\n")
                log.warning("stopped after checkpoint %s; the batch script requeues job %s once every rank "
                            "has exited (requeue %d of %d)", outcome.checkpoint, job_id, outcome.restarts + 1,
                            self.max_requeues)
            # No result pickle: to submitit (and job.done()) this attempt has not finished the job.
            raise SystemExit(0)
        if is_main:
            raise NotRequeuedError(
                f"training stopped after checkpoint {outcome.checkpoint} and is not requeued: {reason}. "
                f"Submit the same command again to resume from {output_dir}/checkpoints/latest "
                f"(MLflow run {outcome.run_id} continues).")


SECRETS_ENV = "PCE_DIST_SECRET_OVERRIDES"  # JSON list of key=value; set at submission, read by every task


def split_secrets(cfg) -> tuple[dict, list[str]]:
    """``(config dict with secrets redacted, key=value overrides restoring the live values)``.

    submitit pickles the job -- config included -- into ``<output_dir>/slurm/<job id>/``, a
    folder anyone reading the run may see. Secret-bearing values travel in the job's
    environment instead (sbatch exports the submitting environment; SLURM keeps it in its
    root-only state), and each task puts them back in memory.
    """
    from pce_dist.config import flatten, flatten_dict, to_dict
    from pce_dist.redact import redact_obj

    live = flatten(cfg)
    redacted = redact_obj(to_dict(cfg))
    shown = flatten_dict(redacted)
    overrides = [f"{k}={json.dumps(v)}" for k, v in live.items() if shown.get(k) != v]
    return redacted, overrides


def _secret_overrides() -> list[str]:
    raw = os.environ.get(SECRETS_ENV)
    return list(json.loads(raw)) if raw else []


def _export_local_layout(cluster: str) -> None:
    """``--cluster local``: submitit numbers its tasks in its own variables; DistEnv reads torchrun's."""
    if cluster != "local":
        return
    from pce_dist.distributed.slurm import slurm_master_port

    job_env = submitit.JobEnvironment()
    os.environ.update(RANK=str(job_env.global_rank), LOCAL_RANK=str(job_env.local_rank),
                      WORLD_SIZE=str(job_env.num_tasks), GROUP_RANK=str(job_env.node), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(slurm_master_port(job_env.job_id)))  # same port in every task


# ----------------------------------------------------------------------------- submission


def preempt_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (``--signal=USR2@...``)."""
    return int(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG])


def make_executor(spec: JobSpec, cfg, partition: str | None):
    """A submitit executor for ``spec``; its folder is ``<output_dir>/slurm/<job id>``."""
    folder = Path(cfg.output_dir) / "slurm" / "%j"
    setup = [
        # DistEnv prefers torchrun's variables to SLURM's: none may leak in from the submitting shell
        "unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK MASTER_ADDR MASTER_PORT",
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{spec.cpus_per_task}}}",  # as torchrun: no oversubscription
    ]
    if spec.cpu_only:
        setup.append("export CUDA_VISIBLE_DEVICES=")  # a CPU job must not pick up GPUs it was not given
    if spec.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if spec.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=spec.max_requeues)
        executor.update_parameters(tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node,
                                   timeout_min=spec.time_min, signal_delay_s=spec.signal_delay_s, setup=setup)
        return executor
    teardown = [  # runs after srun returns, i.e. after every rank exited by itself; keeps srun's status
        "rc=$?",
        f'marker={shlex.quote(str(Path(cfg.output_dir) / "slurm"))}/"$SLURM_JOB_ID"/{REQUEUE_MARKER}',
        'if [ -f "$marker" ]; then',
        '  rm -f "$marker"',
        '  echo "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"',
        '  scontrol requeue "$SLURM_JOB_ID" || rc=$?',
        "fi",
        "exit $rc",
    ]
    executor = submitit.SlurmExecutor(folder, max_num_timeout=spec.max_requeues)
    params: dict[str, Any] = dict(
        job_name=spec.job_name, nodes=spec.nodes, ntasks_per_node=spec.tasks_per_node,
        cpus_per_task=spec.cpus_per_task, time=spec.time_min, signal_delay_s=spec.signal_delay_s,
        setup=setup, teardown=teardown, additional_parameters={"requeue": True, "chdir": os.getcwd()})
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    optional = dict(mem=spec.mem, partition=partition, account=spec.account, qos=spec.qos,
                    constraint=spec.constraint, exclude=spec.exclude, comment=spec.comment)
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor) -> str:
    """The exact script ``submit`` would pass to sbatch (submitit has no public call for it)."""
    return compat.submission_script(executor, uid="dry-run")


def describe(job, spec: JobSpec, cfg) -> str:
    """What the user needs after submitting: where to look, and how to find the MLflow run."""
    from pce_dist.tracking import resolve_tracking_uri

    task0 = job.task(0).paths if spec.world_size > 1 else job.paths
    from pce_dist.redact import redact

    uri = redact(resolve_tracking_uri(cfg, cfg.output_dir))
    if spec.cluster == "slurm":
        find_run = f"filter tags.slurm_job_id = '{job.job_id}' once rank 0 has started, or"
        requeues = (f"up to {spec.max_requeues}; {signal.Signals(preempt_signal()).name} "
                    f"{spec.signal_delay_s} s before the {spec.time_min} min limit checkpoints and requeues")
    else:
        find_run = "see"
        requeues = f"none on --cluster {spec.cluster}: a stopped run resumes when this command is run again"
    return "\n".join([
        f"job id:      {job.job_id}",
        f"layout:      {spec.nodes} node(s) x {spec.tasks_per_node} task(s) = {spec.world_size} ranks "
        f"({'CPU, gloo' if spec.cpu_only else f'{spec.gpus_per_node} GPUs per node'}), cluster {spec.cluster}",
        f"output dir:  {cfg.output_dir}",
        f"logs:        {task0.stdout} (rank 0; rank r: {str(task0.stdout).replace('_0_log', '_<r>_log')}; "
        "stderr in .err)",
        f"MLflow:      {uri}, experiment {cfg.tracking.experiment!r}; run id: {find_run} "
        "'MLflow run: <id>' in rank 0's log at the end of each attempt",
        f"requeues:    {requeues}",
    ])


def submit(spec: JobSpec, cfg, dry_run: bool) -> int:
    """Check, then print (``dry_run``) or submit. ``LaunchError`` for anything refused up front."""
    from pce_dist.config import to_yaml

    partition = None
    checks = []
    if spec.cluster == "slurm":
        info = check_partition(spec)
        partition = info["PartitionName"]
        checks.append(f"partition {partition}: {info.get('TotalNodes', '?')} nodes, State={info.get('State')}, "
                      f"MaxTime={info.get('MaxTime')}")
    spec = resolve_cpus(spec, partition)
    executor = make_executor(spec, cfg, partition)
    if spec.cluster == "slurm":
        script = sbatch_script(executor)
        checks.append(f"sbatch --test-only: {sbatch_test_only(script)}")
    if dry_run:
        if spec.cluster == "slurm":
            print(f"==> sbatch script (--dry-run: nothing submitted)\n{script}")
        else:
            print(f"==> --cluster {spec.cluster}: {spec.world_size} task(s) on this machine, no sbatch script")
        print(f"==> resolved config (the job writes it to {cfg.output_dir}/config.yaml)\n{to_yaml(cfg)}")
        print("==> checks\n" + ("\n".join(checks) or "none (not a SLURM submission)"))
        return 0
    config, secret_overrides = split_secrets(cfg)
    if secret_overrides:
        os.environ[SECRETS_ENV] = json.dumps(secret_overrides)  # inherited by sbatch, not written to a file
    job_fn = TrainJob(config=config, cluster=spec.cluster, max_requeues=spec.max_requeues,
                      stop_signals=(preempt_signal(), int(signal.SIGUSR1), int(signal.SIGTERM)))
    try:
        job = executor.submit(job_fn)
    except (submitit.core.utils.FailedJobError, OSError) as exc:  # sbatch refused it after all
        print(f"launch/slurm.py: submission failed: {exc}", file=sys.stderr)
        return 1
    print(describe(job, spec, cfg), flush=True)
    if spec.cluster == "debug":  # runs here and now
        outcome = job.result()
        print(f"finished: {outcome.status}, run {outcome.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``launch/slurm.py ARGV``: check, then submit (or print, ``--dry-run``); returns the exit code."""
    # intermixed: key=value overrides may come before, between or after the options
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = JobSpec.from_args(args)
        cfg = resolve_config(args.config, args.output_dir, args.overrides, spec)
        return submit(spec, cfg, args.dry_run)
    except LaunchError as exc:
        print(f"launch/slurm.py: error: {exc}", file=sys.stderr)
        return 2

