"""Submit training to SLURM with submitit; the job checkpoints on every rank, requeues itself, resumes.

    python launch/slurm.py --nodes 2 [--gpus-per-node 8] [--partition P] [--time 1-00:00:00]
        [--config configs/X.yaml] [--output-dir DIR] [--dry-run] [key=value ...]

A thin wrapper in the shape of DINOv2's ``run/submit.py``, and the only module that imports
submitit: options become a submitit executor, and ``TrainJob`` -- run by every task -- calls
the same entry point as ``launch/local.py`` (``pce_dist.train.run``; ranks come from SLURM's
variables through ``DistEnv``). ``TrainJob`` lives in this file because launch/ is no package
a job could import: the callable is pickled by value, with the resolved config inside, so a
requeued job trains exactly what was submitted. Outputs stay in ``--output-dir`` (checkpoints,
mlflow.db) and ``<output-dir>/slurm/<job id>/`` (script, per-rank logs): a requeue keeps both.

Why not submitit's checkpoint hook: submitit calls it on global rank 0 only, and a sharded
checkpoint needs every rank. Instead (docs/slurm.md has the whole sequence) the signal --
USR2 ``--signal-delay`` s before the time limit, ``scancel --signal=USR2``, or SIGTERM -- only
sets a flag in each task; the training loop all-reduces it and every rank saves. Then rank 0
leaves a marker file and every task exits 0, and the batch script's teardown -- which runs
once srun has returned, i.e. after every rank exited by itself -- requeues the job. A requeue
from rank 0 instead would race the other ranks' exit and kill them. ``SLURM_RESTART_COUNT``
is counted against ``--max-requeues``; past it rank 0 raises ``NotRequeuedError`` naming the
checkpoint, so the job ends FAILED with a clear message and a valid checkpoint.

Bad options -- ``--nodes 0``, an unknown partition or config key, ``dist.ep_size`` not dividing
the world size, a request the partition or ``sbatch --test-only`` refuses -- fail before
anything is submitted, with exit code 2. ``--dry-run`` runs the same checks, prints the sbatch
script and the resolved config, and submits nothing.

The MLflow run id exists only once rank 0 has started; the launcher does not wait for it but
prints the tracking URI and the tag that finds the run (``tags.slurm_job_id``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("pce_dist.launch.slurm")

Cluster = Literal["slurm", "local", "debug"]
REQUEUE_MARKER = "requeue_requested"  # in <output_dir>/slurm/<job id>/: rank 0 -> batch-script teardown
GPU_CPUS_PER_TASK = 8  # data-loader workers + the main process for one GPU; typical 8-GPU nodes have 64+ cores
SLURM_QUERY_TIMEOUT_S = 30


class LaunchError(ValueError):
    """A bad option or a request the cluster cannot satisfy; raised before submission."""


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class JobSpec:
    """The resolved resource request. Build with ``JobSpec.from_args`` (fills in defaults)."""

    cluster: Cluster
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int | None  # None: the partition's smallest node, decided by ``resolve_cpus``
    time_min: int
    signal_delay_s: int
    max_requeues: int
    mem: str | None = None  # SLURM syntax ("64G"); None = the cluster's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    comment: str | None = None
    job_name: str = "pce_dist"

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def cpu_only(self) -> bool:
        return self.gpus_per_node == 0

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> JobSpec:
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            value = getattr(a, name)
            if value is not None and value < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("gpus_per_node", "max_requeues"):
            if getattr(a, name) < 0:
                raise LaunchError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
        tasks = a.tasks_per_node or max(1, a.gpus_per_node)  # one task per GPU; CPU mode: one per node
        if a.gpus_per_node and tasks > a.gpus_per_node:
            raise LaunchError(f"--tasks-per-node {tasks} > --gpus-per-node {a.gpus_per_node}: each task drives "
                              "one GPU (use --gpus-per-node 0 for a CPU-only job)")
        time_min = parse_time(a.time)
        if not 0 < a.signal_delay < time_min * 60:
            raise LaunchError(f"--signal-delay {a.signal_delay} s must be > 0 and shorter than --time "
                              f"({time_min} min): it is how long before the limit the job is told to checkpoint")
        if a.signal_delay > 65535:  # SLURM's upper bound for --signal
            raise LaunchError(f"--signal-delay {a.signal_delay} s exceeds SLURM's limit of 65535 s")
        if a.cluster != "slurm" and a.nodes != 1:
            raise LaunchError(f"--cluster {a.cluster} runs on this machine only: --nodes must be 1, got {a.nodes}")
        if a.cluster == "debug" and tasks != 1:
            raise LaunchError(f"--cluster debug runs one task in this process: --tasks-per-node must be 1, got {tasks}")
        if a.mem is not None and not re.fullmatch(r"\d+[KMGT]?", a.mem):
            raise LaunchError(f"--mem {a.mem!r}: expected SLURM syntax like 64G, 500M or 0 (all of a node)")
        return cls(cluster=a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=tasks,
                   cpus_per_task=a.cpus_per_task or (None if a.gpus_per_node == 0 else GPU_CPUS_PER_TASK),
                   time_min=time_min, signal_delay_s=a.signal_delay, max_requeues=a.max_requeues, mem=a.mem,
                   partition=a.partition, account=a.account, qos=a.qos, constraint=a.constraint,
                   exclude=a.exclude, comment=a.comment, job_name=a.job_name)


_TIME_FORMS = (  # SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
    r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
    r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
)


def parse_time(text: str) -> int:
    """A SLURM time limit ("90", "1:30:00", "2-00:00:00", ...) in whole minutes (rounded up)."""
    for pattern in _TIME_FORMS:
        match = re.fullmatch(pattern, text.strip())
        if match:
            g = {k: int(v) for k, v in match.groupdict().items()}
            seconds = ((g.get("d", 0) * 24 + g.get("h", 0)) * 60 + g.get("m", 0)) * 60 + g.get("s", 0)
            if seconds <= 0:
                break
            return -(-seconds // 60)
    raise LaunchError(f"--time {text!r}: expected minutes or [D-]HH:MM[:SS] and more than 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/slurm.py", allow_abbrev=False,
                                description="Submit pce_dist training to SLURM (submitit).")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU-only job (gloo, one task per node)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node, or 1 without GPUs")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help=f"default: {GPU_CPUS_PER_TASK} per GPU task; CPU mode: every CPU of the smallest node")
    p.add_argument("--mem", default=None, help="memory per node, SLURM syntax (64G); default: the cluster's")
    p.add_argument("--time", default="1440", help="time limit: minutes or [D-]HH:MM[:SS] (default 24 h)")
    p.add_argument("--partition", default=None, help="default: the cluster's default partition")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[3-4]")
    p.add_argument("--comment", default=None)
    p.add_argument("--job-name", default="pce_dist")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="requeues after preemption/time limit before the job gives up (submitit's default: 3)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job is told to checkpoint; must cover "
                        "train.log_every_steps steps plus one checkpoint")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="local: N tasks on this machine in the background; debug: one task in this process")
    p.add_argument("--config", default=None, help="YAML file of config overrides (configs/*.yaml)")
    p.add_argument("--output-dir", default=None, help="run directory; default: output_dir of the config")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


# ----------------------------------------------------------------------------- pre-flight checks


def _slurm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A SLURM client command, bounded in time; its absence is a ``LaunchError``."""
    if shutil.which(args[0]) is None:
        raise LaunchError(f"`{args[0]}` is not on PATH: this machine is no SLURM client "
                          "(use --cluster local to run here)")
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=SLURM_QUERY_TIMEOUT_S,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(args)}` did not answer in {SLURM_QUERY_TIMEOUT_S} s: is slurmctld up?") from None


def _key_values(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def check_partition(spec: JobSpec) -> dict[str, str]:
    """The partition's ``scontrol show partition`` fields; errors when it cannot take the job."""
    proc = _slurm("scontrol", "show", "partition", "--oneliner")
    if proc.returncode != 0:
        raise LaunchError(f"cannot list partitions: {proc.stderr.strip() or proc.stdout.strip()}")
    parts = {kv["PartitionName"]: kv for kv in map(_key_values, proc.stdout.splitlines()) if "PartitionName" in kv}
    if spec.partition is None:
        defaults = [kv for kv in parts.values() if kv.get("Default") == "YES"]
        if not defaults:
            raise LaunchError(f"no --partition given and the cluster has no default one; choose from {sorted(parts)}")
        info = defaults[0]
    elif spec.partition not in parts:
        raise LaunchError(f"--partition {spec.partition!r} does not exist on this cluster; choose from {sorted(parts)}")
    else:
        info = parts[spec.partition]
    name = info["PartitionName"]
    if info.get("State") in ("INACTIVE", "DRAIN"):
        raise LaunchError(f"partition {name!r} is {info['State']} and accepts no new jobs")
    for key, what in (("TotalNodes", "nodes in partition"), ("MaxNodes", "MaxNodes per job in partition")):
        value = info.get(key, "UNLIMITED")
        if value.isdigit() and spec.nodes > int(value):
            raise LaunchError(f"--nodes {spec.nodes} > {value} ({what} {name!r})")
    max_time = info.get("MaxTime", "UNLIMITED")
    if max_time not in ("UNLIMITED", "NONE") and spec.time_min > parse_time(max_time):
        raise LaunchError(f"--time {spec.time_min} min exceeds partition {name!r}'s MaxTime={max_time}")
    return info


def resolve_cpus(spec: JobSpec, partition: str | None) -> JobSpec:
    """CPU mode without ``--cpus-per-task``: one task gets every CPU of the smallest node."""
    if spec.cpus_per_task is not None:
        return spec
    if spec.cluster != "slurm":
        return dataclasses.replace(spec, cpus_per_task=max(1, (os.cpu_count() or 1) // spec.tasks_per_node))
    proc = _slurm("sinfo", "-h", "-p", partition or "", "-o", "%c")
    counts = [int(c.rstrip("+")) for c in proc.stdout.split() if c.rstrip("+").isdigit()]
    if proc.returncode != 0 or not counts:
        raise LaunchError(f"cannot read CPUs per node of partition {partition!r} ({proc.stderr.strip()}); "
                          "pass --cpus-per-task")
    return dataclasses.replace(spec, cpus_per_task=min(counts))


def sbatch_test_only(script: str) -> str:
    """SLURM's own verdict on the script (accounts, QOS, constraints, GPUs), without submitting."""
    proc = _slurm("sbatch", "--test-only", stdin=script)
    if proc.returncode != 0:
        raise LaunchError("sbatch --test-only rejects the job: " + (proc.stderr.strip() or proc.stdout.strip()))
    return (proc.stderr.strip() or proc.stdout.strip()).removeprefix("sbatch: ")


# ----------------------------------------------------------------------------- config


def resolve_config(config: str | None, output_dir: str | None, overrides: list[str], spec: JobSpec):
    """The config the job will run, validated here so a bad key fails before submission."""
    from pce_dist.config import load_config, validate_world

    overrides = list(overrides) + ([f"output_dir={output_dir}"] if output_dir else [])
    try:
        cfg = load_config(config, overrides)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # the job and its requeues find the same place
    if spec.cpu_only:
        if cfg.dist.backend == "nccl":
            raise LaunchError("config key 'dist.backend' = 'nccl' needs GPUs, but --gpus-per-node is 0")
        cfg.dist.backend = "gloo"
    try:
        validate_world(cfg, spec.world_size)
    except ValueError as exc:
        raise LaunchError(f"{exc} (= --nodes {spec.nodes} x --tasks-per-node {spec.tasks_per_node})") from None
    return cfg


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
                      WORLD_SIZE=str(job_env.num_tasks), MASTER_ADDR="127.0.0.1",
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
        "unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT",
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
    """The exact script ``submit`` would pass to sbatch. submitit has no public call for this;
    these are the two calls its ``_submit_command`` makes (tests pin the behaviour)."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


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
    if __name__ != "__main__":  # imported (tests): launch/ is no package the job could import
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
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
    if str(REPO_ROOT) not in sys.path:  # `python launch/slurm.py` puts launch/, not the repo, on the path
        sys.path.insert(1, str(REPO_ROOT))
    # intermixed: key=value overrides may come before, between or after the options
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = JobSpec.from_args(args)
        cfg = resolve_config(args.config, args.output_dir, args.overrides, spec)
        return submit(spec, cfg, args.dry_run)
    except LaunchError as exc:
        print(f"launch/slurm.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run as a script, TrainJob lives in __main__ and is pickled by value
    sys.exit(main())
