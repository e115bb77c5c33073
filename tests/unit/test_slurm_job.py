"""The SLURM launcher's pieces in process: options, time limits, the requeue rule, secrets.

No cluster needed: these run before submission (``pce_dist.launch.slurm_request``) or inside
the task (``pce_dist.launch.slurm``); tests/cluster runs the whole launcher against SLURM.
"""

from __future__ import annotations

import json
from pathlib import Path

import cloudpickle
import pytest

from pce_dist.launch import slurm
from pce_dist.launch.slurm_request import JobSpec, LaunchError, build_parser, parse_time

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def test_option_defaults_and_time_parsing():
    parse = build_parser().parse_intermixed_args
    gpu = JobSpec.from_args(parse(["--nodes", "2"]))
    assert (gpu.gpus_per_node, gpu.tasks_per_node, gpu.cpus_per_task, gpu.world_size) == (8, 8, 8, 16)
    cpu = JobSpec.from_args(parse(["--nodes", "3", "--gpus-per-node", "0"]))
    assert (cpu.tasks_per_node, cpu.cpus_per_task, cpu.world_size, cpu.cpu_only) == (1, None, 3, True)
    assert [parse_time(t) for t in ("90", "1:30", "2:00:00", "1-0", "1-2:30", "0-0:0:59")] == \
        [90, 2, 120, 1440, 1590, 1]
    for bad, message in ((["--time", "0"], "--time"), (["--gpus-per-node", "2", "--tasks-per-node", "4"], "GPU"),
                         (["--time", "2", "--signal-delay", "120"], "--signal-delay"),
                         (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"), (["--mem", "lots"], "--mem")):
        with pytest.raises(LaunchError, match=message):
            JobSpec.from_args(parse(bad))


def test_requeue_rule():
    assert slurm.why_not_requeue("slurm", 0, 3) is None
    assert "--max-requeues 3" in slurm.why_not_requeue("slurm", 3, 3)
    assert "cannot requeue" in slurm.why_not_requeue("local", 0, 3)
    assert "user's stop request" in slurm.why_not_requeue("slurm", 0, 3, stopped_by="SIGUSR1")


def test_train_job_is_pickled_by_reference():
    """submitit pickles the job with cloudpickle; the job's Python imports
    ``pce_dist.launch.slurm``, so the pickle names the class and carries no code."""
    job = slurm.TrainJob(config={"output_dir": "/x"}, cluster="slurm", max_requeues=3, stop_signals=(12,))
    blob = cloudpickle.dumps(job)
    assert b"pce_dist.launch.slurm" in blob and b"TrainJob" in blob
    assert b"_after_stop" not in blob and b"requeue_marker" not in blob  # no methods, i.e. no code
    assert cloudpickle.loads(blob) == job


def test_secrets_stay_out_of_the_pickled_job_and_come_back_in_the_task(monkeypatch):
    """The job's config is redacted; the live value travels as an override in the environment."""
    from pce_dist.config import apply_overrides, config_from_dict, load_config

    live = "http://alice:hunter22@127.0.0.1:5055"
    cfg = load_config(DIGITS, [f"tracking.tracking_uri={live}"])
    redacted, overrides = slurm.split_secrets(cfg)
    assert "hunter22" not in str(redacted) and redacted["tracking"]["tracking_uri"] == live.replace("hunter22", "***")
    monkeypatch.setenv(slurm.SECRETS_ENV, json.dumps(overrides))
    restored = apply_overrides(config_from_dict(redacted), slurm._secret_overrides())
    assert restored.tracking.tracking_uri == live and restored == cfg
