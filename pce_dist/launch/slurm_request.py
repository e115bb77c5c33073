"""What ``launch/slurm.py`` is asked for, and whether the cluster can take it -- before submitting.

Options become a ``JobSpec`` (defaults filled in, counts and times checked); the SLURM
client commands then check it against the cluster (``scontrol show partition``, ``sinfo``,
``sbatch --test-only``), and the config is resolved and validated against the world size
(``pce_dist.config.validate_world``: the same check every rank makes). Anything refused
here is a ``LaunchError``, reported with exit code 2 before anything is submitted:
``--nodes 0``, an unknown partition or config key, ``dist.ep_size`` not dividing the world
size, a request the partition or ``sbatch --test-only`` refuses.

No submitit here: ``pce_dist.launch.slurm`` is the one module that talks to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Cluster = Literal["slurm", "local", "debug"]
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
