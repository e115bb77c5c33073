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
    our dispatcher uses, and builds none of its own. Both lean on DeepSpeed internals and
    live in ``pce_dist.compat``.

DeepSpeed divides the summed expert gradients by the full data-parallel world size, which
is the gradient of the global mean loss (the all-to-all backward already sums the
contributions of every rank in the EP group); tests compare against one process.
This is done for every ep_size, 1 included, so there is one code path.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import compat
from ..model.dispatch import DispatchStats
from ..model.net import PCENet
from .dispatch import AllToAllCapacityDispatcher, AllToAllDispatcher
from .env import DistEnv


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def _moe_marker(env: DistEnv, num_experts: int) -> nn.Module:
    """The parameter-free DeepSpeed ``MoE`` marker (``pce_dist.compat``): when the engine sets
    up expert parallelism it registers *our* groups instead of building its own."""
    marker_class = compat.deepspeed_moe_marker_class()
    return marker_class(num_experts, env.ep_size, expert_group_name(env.ep_size),
                        functools.partial(register_groups_with_deepspeed, env))


def register_groups_with_deepspeed(env: DistEnv) -> None:
    """Expose the DistEnv EP/EDP groups under DeepSpeed's group name (no new groups)."""
    ep_ranks = next(r for r in env.ep_group_ranks() if env.rank in r)
    edp_ranks = next(r for r in env.edp_group_ranks() if env.rank in r)
    compat.register_expert_groups(expert_group_name(env.ep_size), env.group_handle("ep"), ep_ranks,
                                  env.group_handle("edp"), edp_ranks)


def parallelize_experts(model: PCENet, env: DistEnv) -> PCENet:
    """Keep this rank's experts, install the dispatcher, mark expert params for DeepSpeed."""
    group_name = expert_group_name(env.ep_size)
    layers = model.pce_layers()
    for layer in layers:
        local_ids = env.local_expert_ids(layer.num_experts)
        layer.keep_experts(local_ids)
        if env.ep_size > 1 and layer.dispatch_mode == "capacity":
            layer.dispatcher = AllToAllCapacityDispatcher(env.ep_group, env.ep_size, env.ep_rank, local_ids,
                                                          layer.capacity_factor)
        elif env.ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(env.ep_group, env.ep_size, env.ep_rank, local_ids)
        for param in layer.experts.parameters():
            param.allreduce = False
            param.group_name = group_name
    if layers:
        model.add_module("deepspeed_moe_marker", _moe_marker(env, layers[0].num_experts))
    return model


def take_dispatch_stats(model: PCENet, device) -> tuple[dict[str, int], torch.Tensor]:
    """This rank's dispatch counters since the last call, summed over layers where that is
    meaningful, and reset: ``(traffic, work_L3)``.

    ``traffic``: all-to-all bytes (``dispatch_bytes``/``return_bytes``/``backward_bytes``
    measured at the dispatcher's ``all_to_all_single`` call, ``routed_bytes`` computed from
    the routing counts; see ``model.dispatch.DispatchStats``), host ints. ``work_L3``: per
    layer ``DispatchStats.WORK`` (``[expert_rows, pairs, dropped]``) as a float tensor on ``device`` -- the rows this
    rank's experts computed, the pairs its router selected, the pairs capacity dispatch
    dropped -- left on the device for the caller's all-reduce. Capacity dispatch keeps its
    counters on the device; the one host copy here (of the routed bytes) is at a log
    interval (one per layer), never in the forward.
    """
    stats = [layer.dispatcher.stats for layer in model.pce_layers()]
    rows = [[getattr(s, key) for key in DispatchStats.WORK] for s in stats]
    work_L3 = (torch.stack([torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in row])
                            for row in rows]) if rows else torch.zeros(0, 3, device=device))
    traffic = {key: sum(int(getattr(s, key)) for s in stats) for key in DispatchStats.TRAFFIC}
    for s in stats:
        s.reset()
    return traffic, work_L3


def traffic_stats(model: PCENet) -> dict[str, int]:
    """The all-to-all bytes of ``take_dispatch_stats`` (and, as it does, reset every counter)."""
    return take_dispatch_stats(model, torch.device("cpu"))[0]
