"""``pce_dist.compat`` against the installed DeepSpeed, submitit, torch and MLflow.

Every private thing compat uses is checked here, by what it does (not only that the name
exists), so an upgrade that moves one fails in this file, named, instead of as a wrong
gradient or a hung loader deep in a run. ``VERIFIED`` is what these checks last passed on:
a different major.minor fails ``test_versions_are_the_verified_ones`` on purpose -- run the
rest of this file against the new version, then update ``VERIFIED``.
"""

from __future__ import annotations

import ast
import inspect
import os
import stat
import textwrap
import time
from importlib.metadata import version

import psutil
import pytest
import torch
from torch import nn

from pce_dist import compat

VERIFIED = {"deepspeed": "0.19", "mlflow": "3.17", "submitit": "1.5", "torch": "2.13"}


def _installed(package: str) -> str:
    return version(package).split("+")[0]


@pytest.mark.parametrize("package", sorted(VERIFIED))
def test_versions_are_the_verified_ones(package):
    installed = _installed(package)
    assert installed.split(".")[:2] == VERIFIED[package].split("."), (
        f"{package} {installed} is installed; pce_dist.compat was verified on {VERIFIED[package]}.x. "
        "Run tests/unit/test_compat.py, check each compat function's private API, then update VERIFIED.")


# ----------------------------------------------------------------------------- submitit


def _slurm_executor(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun needed
    executor = submitit.SlurmExecutor(tmp_path / "slurm" / "%j")
    executor.update_parameters(nodes=2, ntasks_per_node=1, time=10, job_name="compat", setup=["echo set-up"])
    return executor


def test_submitit_private_calls_have_the_expected_shape():
    from submitit.slurm.slurm import SlurmExecutor

    params = list(inspect.signature(SlurmExecutor._make_submission_file_text).parameters)
    assert params == ["self", "command", "uid"], f"submitit {_installed('submitit')}: {params}"
    assert isinstance(inspect.getattr_static(SlurmExecutor, "_submitit_command_str"), property)


def test_submission_script_is_the_script_submit_writes(tmp_path, monkeypatch):
    """A fake ``sbatch`` on PATH keeps the script submitit hands it: ``--dry-run`` must print that one."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    kept = tmp_path / "submitted.sh"
    fake.write_text(f"#!/bin/sh\ncp \"$1\" {kept}\necho 'Submitted batch job 4242'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    executor = _slurm_executor(tmp_path, monkeypatch)

    script = compat.submission_script(executor, uid="dry-run")
    job = executor.submit(os.getpid)
    assert job.job_id == "4242"
    assert kept.read_text() == script, f"submitit {_installed('submitit')} writes another script than compat renders"
    for line in ("#SBATCH --nodes=2", "#SBATCH --job-name=compat", "echo set-up", "-m submitit.core._submit"):
        assert line in script, script


# ----------------------------------------------------------------------------- torch DataLoader


class _Range(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


def _worker_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def test_loader_workers_stop_at_once():
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    assert list(inspect.signature(_MultiProcessingDataLoaderIter._shutdown_workers).parameters) == ["self"]
    before = _worker_pids()
    batches = iter(torch.utils.data.DataLoader(_Range(), batch_size=4, num_workers=2))
    next(batches)
    workers = [psutil.Process(pid) for pid in _worker_pids() - before]
    assert len(workers) == 2, workers
    compat.shutdown_loader_workers(batches)  # the iterator is still referenced: only this stops them
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"torch {torch.__version__}: workers still running after shutdown_loader_workers"


def test_single_process_loader_has_nothing_to_stop():
    batches = iter(torch.utils.data.DataLoader(_Range(), batch_size=4, num_workers=0))
    next(batches)
    compat.shutdown_loader_workers(batches)
    assert next(batches).tolist() == [4, 5, 6, 7]  # a no-op: the iterator goes on


# ----------------------------------------------------------------------------- DeepSpeed MoE


def _marked_net(calls: list[str]) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2))
    marker = compat.deepspeed_moe_marker_class()(8, 2, "ep_size_2", lambda: calls.append("registered"))
    net.add_module("marker", marker)
    return net


def _engine_reads_from_moe_modules() -> dict[str, set[str]]:
    """Every attribute DeepSpeed's engine reads off a module it found to be an ``MoE``
    (``if isinstance(module, MoE): ... module.<attr>``), per source line."""
    import deepspeed.runtime.engine as engine

    reads = {}
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(engine)))):
        test = getattr(node, "test", None)
        if not (isinstance(node, ast.If) and isinstance(test, ast.Call) and getattr(test.func, "id", "") == "isinstance"
                and len(test.args) == 2 and getattr(test.args[1], "id", "") == "MoE"
                and isinstance(test.args[0], ast.Name)):
            continue
        var = test.args[0].id
        reads[f"engine.py:{node.lineno}"] = {n.attr for stmt in node.body for n in ast.walk(stmt)
                                             if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == var}
    return reads


def test_marker_is_an_moe_layer_without_parameters():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import has_moe_layers

    marker = dict(_marked_net([]).named_children())["marker"]
    assert isinstance(marker, MoE) and list(marker.parameters()) == [] and list(marker.buffers()) == []
    assert has_moe_layers(_marked_net([])) == (True, 8), f"deepspeed {_installed('deepspeed')}"
    assert (marker.num_experts, marker.num_local_experts, marker.ep_size, marker.expert_group_name) == \
        (8, 4, 2, "ep_size_2")
    assert marker.state_dict() == {}  # nothing of it lands in a checkpoint


def test_marker_sets_every_attribute_the_engine_reads():
    """``MoE.__init__`` is skipped: whatever the engine reads off an ``MoE`` must be set by hand."""
    marker = dict(_marked_net([]).named_children())["marker"]
    reads = _engine_reads_from_moe_modules()
    assert reads and any("num_experts" in attrs for attrs in reads.values()), reads  # the scan found the checks
    missing = {line: sorted(a for a in attrs if not hasattr(marker, a)) for line, attrs in reads.items()}
    assert not any(missing.values()), f"deepspeed {_installed('deepspeed')} reads, the marker lacks: {missing}"


def test_engine_start_up_hook_registers_our_groups():
    """The engine calls ``set_deepspeed_parallelism(use_data_before_expert_parallel_)`` on every
    module that has it; the marker answers by registering our groups, and nothing else."""
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert list(inspect.signature(MoE.set_deepspeed_parallelism).parameters)[:2] == \
        ["self", "use_data_before_expert_parallel_"]
    source = inspect.getsource(DeepSpeedEngine._configure_distributed_model)
    assert "set_deepspeed_parallelism(self._config.use_data_before_expert_parallel_" in source
    calls: list[str] = []
    dict(_marked_net(calls).named_children())["marker"].set_deepspeed_parallelism(False)
    assert calls == ["registered"]


def test_registered_groups_are_what_deepspeed_reads_back():
    from deepspeed.utils import groups

    name = "ep_size_compat_test"
    ep_group, edp_group = object(), object()  # any handle: DeepSpeed stores and returns it
    compat.register_expert_groups(name, ep_group, (0, 1), edp_group, (0, 2))
    try:
        assert groups._get_expert_parallel_group(name) is ep_group
        assert groups._get_expert_data_parallel_group(name) is edp_group
        assert groups._get_expert_parallel_group_ranks(name) == [0, 1]
        assert groups._get_expert_data_parallel_group_dict()[name] is edp_group
        assert groups._get_expert_parallel_group_dict()[name] is ep_group
        assert groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] == [0, 2]
    finally:
        for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                      groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            table.pop(name, None)


def test_flat_fp32_group_attributes_exist_in_deepspeed():
    """The attributes ``flat_fp32_groups`` reads are set by the installed optimizers' constructors
    (their behaviour -- a resume across ZeRO stages -- is tested in tests/distributed)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    bf16 = inspect.getsource(BF16_Optimizer.__init__) + inspect.getsource(BF16_Optimizer)
    for attr in ("self.bit16_groups", "self.single_partition_of_fp32_groups", "self.optimizer ="):
        assert attr in zero, attr
    for attr in ("self.bf16_groups", "self.fp32_groups_flat_partition", "self.optimizer ="):
        assert attr in bf16, attr
    assert compat.flat_fp32_groups(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)) is None


# ----------------------------------------------------------------------------- MLflow system metrics


def test_system_monitor_restarts_after_a_failed_request_and_stops_when_told(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("compat", artifact_location=str(tmp_path / "a"))).info.run_id
    monitor = compat.system_metrics_monitor(run_id, restart_after_s=0.2, sampling_interval=0.1, node_id="nodeX",
                                            tracking_uri=uri)
    assert monitor._process is None and not monitor._shutdown_event.is_set()  # what stop/flush rely on

    def samples() -> int:
        return len(client.get_metric_history(run_id, "system/nodeX/cpu_utilization_percentage"))

    monitor.start()
    assert monitor._process.name == "SystemMetricsMonitor"
    deadline = time.monotonic() + 10
    while samples() == 0:
        assert time.monotonic() < deadline, "the monitor logged nothing"
        time.sleep(0.1)
    # MLflow's loop returns for good when the run is not RUNNING; the resilient one waits and
    # comes back: end the run, let the loop fall out, reopen it, and samples arrive again
    client.set_terminated(run_id)
    time.sleep(0.5)
    compat.flush_system_metrics(monitor)
    before = samples()
    client.update_run(run_id, status="RUNNING")
    deadline = time.monotonic() + 10
    while samples() <= before:
        assert time.monotonic() < deadline, "the monitor did not come back after its loop ended"
        time.sleep(0.1)
    assert compat.stop_system_metrics_monitor(monitor, timeout_s=5.0) is True
    assert not monitor._process.is_alive()
