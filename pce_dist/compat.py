"""Every use of another library's private API, in one place, pinned by ``tests/unit/test_compat.py``.

pce_dist leans on a few things that DeepSpeed, submitit, torch and MLflow do not promise to keep.
Each lives here, behind a function whose docstring names the private thing and why no
public call does the job; ``tests/unit/test_compat.py`` checks each against the installed
versions (DeepSpeed 0.19, submitit 1.5, torch 2.13, MLflow 3.17 when written), so an upgrade that moves
one fails there, by name, instead of deep inside a training run.

Nothing is imported at module level: ``launch/local.py`` and ``import pce_dist`` stay cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

# ----------------------------------------------------------------------------- submitit


def submission_script(executor: Any, uid: str = "dry-run") -> str:
    """The exact sbatch script ``executor.submit`` would write, without submitting.

    Private: ``SlurmExecutor._make_submission_file_text(command, uid)`` and the
    ``_submitit_command_str`` property -- the two calls submitit's own ``_submit_command``
    makes to write the script. submitit has no public "render the script" call, and
    ``--dry-run`` and the ``sbatch --test-only`` pre-flight check must see the very script
    the job would get, not a re-implementation of it. ``uid`` only names submitit's
    temporary files in the script; it is not a job id.
    """
    return executor._make_submission_file_text(executor._submitit_command_str, uid=uid)


# ----------------------------------------------------------------------------- torch DataLoader


def shutdown_loader_workers(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now; a no-op for single-process loading.

    Private: ``_MultiProcessingDataLoaderIter._shutdown_workers()``, which torch itself calls
    from the iterator's ``__del__``. There is no public way to end an epoch's workers
    deterministically: waiting for the garbage collector is not enough when an exception
    traceback keeps the iterator alive, and workers forked meanwhile for the next loader
    would inherit it. ``num_workers=0`` iterators have no workers and no such method.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# ----------------------------------------------------------------------------- DeepSpeed MoE


@functools.cache
def deepspeed_moe_marker_class() -> type:
    """A parameter-free ``deepspeed.moe.layer.MoE`` subclass that switches on DeepSpeed's MoE path.

    Private: it skips ``MoE.__init__`` (which would build DeepSpeed's own gate and experts)
    and sets by hand only the attributes ``DeepSpeedEngine`` reads from an ``MoE`` module:
    ``num_experts`` (``has_moe_layers`` is true only for ``MoE`` instances),
    ``expert_group_name`` and ``num_local_experts`` (expert checkpoint naming),
    ``ep_size``, ``use_residual`` and ``enable_expert_tensor_parallelism``. The engine calls
    ``set_deepspeed_parallelism`` on it at start-up; the marker hands that to
    ``register_groups`` (our groups, registered by ``register_expert_groups``) instead of
    letting DeepSpeed build groups of its own. PCE's routing, dispatch and experts are not
    DeepSpeed's, and there is no public hook that says "these parameters are experts".
    """
    from deepspeed.moe.layer import MoE  # lazily: importing pce_dist stays cheap
    from torch import nn

    class DeepSpeedMoEMarker(MoE):
        """Parameter-free stand-in that makes ``engine.has_moe_layers`` true."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str,
                     register_groups: Callable[[], None]) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no groups
            self.ep_size = ep_size
            self.num_experts = num_experts
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = group_name
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self._register_groups = register_groups

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            self._register_groups()

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker


def register_expert_groups(name: str, ep_group: Any, ep_ranks: Sequence[int], edp_group: Any,
                           edp_ranks: Sequence[int]) -> None:
    """Put existing process groups into DeepSpeed's expert-group registry under ``name``.

    Private: the module-level dicts ``deepspeed.utils.groups._EXPERT_PARALLEL_GROUP``,
    ``_EXPERT_PARALLEL_GROUP_RANKS``, ``_EXPERT_DATA_PARALLEL_GROUP`` and
    ``_EXPERT_DATA_PARALLEL_GROUP_RANKS``, which DeepSpeed's own getters
    (``groups._get_expert_data_parallel_group(name)``, ...) read when it reduces expert
    gradients. DeepSpeed has no call that registers a group it did not create (its own
    ``_create_expert_and_data_parallel`` builds *new* ones); writing the tables makes it
    reduce over exactly the groups our dispatcher uses.
    """
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(ep_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(edp_ranks)


# ----------------------------------------------------------------------------- DeepSpeed optimizers


def flat_fp32_groups(optimizer: Any) -> list[tuple[list[Any], Any]] | None:
    """``[(model parameters, flat fp32 partition)]`` per parameter group of DeepSpeed's
    ZeRO-1/2 optimizer or its bf16 optimizer; None for a torch optimizer (ZeRO-0 in fp32).

    Semi-private: ``DeepSpeedZeroOptimizer.bit16_groups`` / ``single_partition_of_fp32_groups``
    and ``BF16_Optimizer.bf16_groups`` / ``fp32_groups_flat_partition`` (no leading
    underscore, undocumented). The fragment API (``safe_get_full_fp32_param``, ...) works per
    parameter, but building a group's optimizer state before DeepSpeed's first step (a
    resume into a fresh engine) needs the group's flat partition, and its parameters in
    DeepSpeed's order.
    """
    if hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(optimizer, "bit16_groups"):
        return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups))
    if hasattr(optimizer, "fp32_groups_flat_partition") and hasattr(optimizer, "bf16_groups"):
        return list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition))
    return None


def base_optimizer(optimizer: Any) -> Any:
    """The torch optimizer DeepSpeed's ZeRO / bf16 optimizer steps over its flat partitions
    (its ``.optimizer`` attribute; its ``state`` is keyed by those partitions)."""
    return optimizer.optimizer


# ----------------------------------------------------------------------------- MLflow system metrics


def system_metrics_monitor(run_id: str, *, restart_after_s: float, **kwargs: Any) -> Any:
    """MLflow's ``SystemMetricsMonitor`` whose sampling thread starts again after a failed request.

    Private: that ``start()`` runs the thread on the ``monitor`` method, and that the
    monitor's ``_shutdown_event`` is what ``finish()`` sets. MLflow's loop returns for good
    on the first request that fails (one ``get_run`` during a short outage would end a
    node's system metrics for the rest of a multi-day run); here it is entered again after
    ``restart_after_s`` until the monitor is stopped, its step counter carried on.
    ``kwargs`` go to the constructor.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class ResilientMonitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                super().monitor()  # returns on a failed request, a finished run, or shutdown
                self._shutdown_event.wait(restart_after_s)

    return ResilientMonitor(run_id, **kwargs)


def stop_system_metrics_monitor(monitor: Any, timeout_s: float) -> bool:
    """Ask the monitor's thread to stop and wait ``timeout_s`` at most; False if it is still running.

    Private: ``_shutdown_event`` and ``_process`` (the thread). The public ``finish()``
    joins the thread without a bound and then flushes on the caller's thread, so a hung
    tracking server would hang the end of training.
    """
    monitor._shutdown_event.set()
    thread = monitor._process
    if thread is None:
        return True
    thread.join(timeout_s)
    return not thread.is_alive()


def flush_system_metrics(monitor: Any) -> None:
    """Send the samples the stopped monitor still holds (what ``finish()`` does after its join).

    Private: the ``mlflow_logger`` attribute (MLflow's batching ``BatchMetricsLogger``).
    """
    monitor.mlflow_logger.flush()
