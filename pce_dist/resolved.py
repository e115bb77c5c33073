"""What a run is, derived once from config + world: precision, schedule, expert placement.

Why one object: these values used to be recomputed where they were needed -- precision in
the trainer, the checkpointer and the engine builder, the schedule twice (once by building
a whole train loader to learn its length). Computed here once per rank, after
``config.validate_world`` has accepted the layout, and handed to whoever needs them, they
cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import RunConfig


def resolve_precision(cfg: RunConfig, device_type: str) -> str:
    """``dist.precision`` made concrete: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if cfg.dist.precision != "auto":
        if cfg.dist.precision == "bf16" and device_type != "cuda":
            raise ValueError("config key 'dist.precision' = 'bf16': needs a CUDA device; use fp32 on CPU")
        return cfg.dist.precision
    return "bf16" if device_type == "cuda" else "fp32"


def schedule_length(cfg: RunConfig, batches_per_epoch: int) -> tuple[int, int, int]:
    """``(micro-batches per epoch, epochs, optimizer steps)``.

    An epoch uses the largest multiple of ``train.grad_accum`` batches; ``train.max_steps``
    (optimizer steps) overrides ``train.epochs`` when set.
    """
    accum = cfg.train.grad_accum
    micro_per_epoch = batches_per_epoch // accum * accum
    if micro_per_epoch < 1:
        raise ValueError(f"an epoch has {batches_per_epoch} batches per rank, fewer than "
                         f"train.grad_accum={accum}; lower data.batch_size or train.grad_accum")
    steps_per_epoch = micro_per_epoch // accum
    if cfg.train.max_steps > 0:
        return micro_per_epoch, math.ceil(cfg.train.max_steps / steps_per_epoch), cfg.train.max_steps
    return micro_per_epoch, cfg.train.epochs, cfg.train.epochs * steps_per_epoch


@dataclass(frozen=True)
class ResolvedRun:
    """The derived facts of one run on one rank (see the module docstring)."""

    precision: str  # "fp32" | "bf16"
    zero_stage: int
    world_size: int
    ep_size: int
    batches_per_epoch: int  # what the loader yields per rank and epoch
    micro_per_epoch: int  # what training uses of them: a whole number of accumulation windows
    num_epochs: int
    total_steps: int  # optimizer steps: the LR schedule's length
    local_expert_ids: tuple[int, ...]  # global ids of the experts this rank hosts (per PCE layer)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve_run(cfg: RunConfig, env, batches_per_epoch: int) -> ResolvedRun:
    """Everything in ``ResolvedRun`` for ``cfg`` on ``env`` (a ``DistEnv``, initialised or not)."""
    micro_per_epoch, num_epochs, total_steps = schedule_length(cfg, batches_per_epoch)
    return ResolvedRun(
        precision=resolve_precision(cfg, env.device.type), zero_stage=cfg.dist.zero_stage,
        world_size=env.world_size, ep_size=env.ep_size, batches_per_epoch=batches_per_epoch,
        micro_per_epoch=micro_per_epoch, num_epochs=num_epochs, total_steps=total_steps,
        local_expert_ids=tuple(env.local_expert_ids(cfg.model.num_experts)))
