"""BatchNorm running statistics: one model for evaluation and checkpoints, own ones for training.

In training mode BatchNorm normalises with batch statistics, but each rank updates its
*running* statistics from its own micro-batches only, so the replicas drift apart.
Evaluation and checkpoints must see one model: shared buffers are averaged over the
data-parallel group, expert buffers over the expert-data-parallel group (the ranks hosting
the same experts). Training never reads these buffers, so losses are unchanged. Two
all-reduces (flattened), at evaluations and checkpoints.

``average`` returns this rank's own statistics from before the averaging (copies): a
checkpoint writes the averaged model, then puts these back (``restore``) and stores them per
rank, so a save changes nothing the run computes later -- an evaluation after a resume equals
the uninterrupted run's bit for bit, not to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.net import is_expert_name
from .env import DistEnv


_RUNNING_STATS = ("running_mean", "running_var")


@torch.no_grad()
def average(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Average every BatchNorm running statistic over the ranks holding the same module; returns
    this rank's values from before (``{}`` on one rank, where there is nothing to average).

    Only ``running_mean`` / ``running_var``: other buffers are either constant (positional
    channels) or identical on every rank by construction (a router's selection bias, moved
    by an all-reduced update), and averaging could only add rounding to them.
    """
    if env.world_size == 1:
        return {}
    shared, experts, own = [], [], {}
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] in _RUNNING_STATS:  # the step counters agree
            (experts if is_expert_name(name) else shared).append(buf)
            own[name] = buf.detach().clone()
    for bufs, group in ((shared, "dp"), (experts, "edp")):
        size = env.group_size(group)
        if not bufs or size == 1:
            continue
        flat = env.all_reduce(torch.cat([b.reshape(-1).float() for b in bufs]), group)
        flat /= size
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
    return own


@torch.no_grad()
def restore(model: nn.Module, own: dict[str, torch.Tensor]) -> None:
    """Put back statistics returned by ``average`` (or loaded from a checkpoint)."""
    if not own:
        return
    buffers = dict(model.named_buffers())
    for name, value in own.items():
        if name in buffers:
            buffers[name].copy_(value)
