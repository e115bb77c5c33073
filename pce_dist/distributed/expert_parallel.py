"""Place PCE experts on ranks and make DeepSpeed treat them as MoE experts.

DeepSpeed reduces a parameter over the expert-data-parallel (EDP) group -- the ranks that
hold the *same* expert -- only when (a) the engine has MoE layers, which it detects solely
as instances of ``deepspeed.moe.layer.MoE``, and (b) the parameter carries
``allreduce = False`` and ``group_name``. Otherwise it would average the gradients of
*different* experts across ranks. PCE layers are not DeepSpeed MoE layers (their routing,
dispatch and experts are our own), so ``parallelize_experts``:

  * keeps on each rank only the experts it hosts (named by global id, so checkpoints and
    reduction groups need no renaming), and swaps in the all-to-all dispatcher;
  * marks every expert parameter ``allreduce=False, group_name="ep_size_<ep>"``;
  * attaches one parameter-free ``DeepSpeedMoEMarker`` (a ``MoE`` subclass) so the engine
    switches to its MoE gradient path, and registers *our* DistEnv groups under that name
    in DeepSpeed's group registry -- DeepSpeed then reduces experts over exactly the groups
    our dispatcher uses, and builds none of its own.

DeepSpeed divides the summed expert gradients by the full data-parallel world size, which
is the gradient of the global mean loss (the all-to-all backward already sums the
contributions of every rank in the EP group); tests compare against one process.
This is done for every ep_size, 1 included, so there is one code path.
"""

from __future__ import annotations

from torch import nn

from ..model.net import PCENet
from .dispatch import AllToAllDispatcher
from .env import DistEnv


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def _marker_class():
    from deepspeed.moe.layer import MoE  # imported lazily: importing pce_dist stays cheap

    class DeepSpeedMoEMarker(MoE):
        """Parameter-free stand-in that makes ``engine.has_moe_layers`` true.

        ``MoE.__init__`` would build DeepSpeed's own gate and experts; we skip it and set
        only the attributes the engine reads.
        """

        def __init__(self, env: DistEnv, num_experts: int) -> None:
            nn.Module.__init__(self)
            self.ep_size = env.ep_size
            self.num_experts = num_experts
            self.num_local_experts = num_experts // env.ep_size
            self.expert_group_name = expert_group_name(env.ep_size)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self._env = env

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            register_groups_with_deepspeed(self._env)

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker


def register_groups_with_deepspeed(env: DistEnv) -> None:
    """Expose the DistEnv EP/EDP groups under DeepSpeed's group name (no new groups)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    name = expert_group_name(env.ep_size)
    world = dist.group.WORLD  # a single process has no groups of its own; DeepSpeed needs handles
    ep_ranks = next(r for r in env.ep_group_ranks() if env.rank in r)
    edp_ranks = next(r for r in env.edp_group_ranks() if env.rank in r)
    groups._EXPERT_PARALLEL_GROUP[name] = env.ep_group or world
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(ep_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = env.edp_group or world
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(edp_ranks)


def parallelize_experts(model: PCENet, env: DistEnv) -> PCENet:
    """Keep this rank's experts, install the dispatcher, mark expert params for DeepSpeed."""
    group_name = expert_group_name(env.ep_size)
    layers = model.pce_layers()
    for layer in layers:
        local_ids = env.local_expert_ids(layer.num_experts)
        layer.keep_experts(local_ids)
        if env.ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(env.ep_group, env.ep_size, env.ep_rank, local_ids)
        for param in layer.experts.parameters():
            param.allreduce = False
            param.group_name = group_name
    if layers:
        model.add_module("deepspeed_moe_marker", _marker_class()(env, layers[0].num_experts))
    return model


def traffic_stats(model: PCENet) -> dict[str, int]:
    """Sum and reset the all-to-all traffic counters of every layer (host ints, no sync)."""
    totals = {"routed_bytes": 0, "dispatch_bytes": 0, "return_bytes": 0}
    for layer in model.pce_layers():
        stats = getattr(layer.dispatcher, "stats", None)
        if stats is not None:
            for key in totals:
                totals[key] += getattr(stats, key)
            stats.reset()
    return totals
