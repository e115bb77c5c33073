"""Build the DeepSpeed engine from the typed config.

One function, ``build_engine``, turns (model, config, DistEnv) into a DeepSpeed engine:
  * ZeRO stage 0/1/2 (``config.validate`` refuses 3: DeepSpeed MoE does not support it),
    gradient accumulation, gradient clipping by the true global norm (``pce_dist.grad_norm``
    decides what DeepSpeed's ``gradient_clipping`` gets: off at ZeRO-0, where DeepSpeed's
    MoE norm is a mean of per-rank norms and ``GradClipper`` clips instead), the precision
    of the resolved run (bf16 on CUDA, fp32 on CPU by default, ``pce_dist.resolved``);
  * a torch optimizer (AdamW or SGD) whose parameter groups are split the way DeepSpeed's
    MoE path requires (expert parameters in groups marked ``moe``), with no weight decay
    on biases, norms and router keys (keys are unit vectors moved by EMA in phase 1: decay
    would shrink them between EMA steps);
  * a warmup + cosine (or constant) LR schedule stepped by the engine at every optimizer
    step.

Why a torch optimizer instead of DeepSpeed's own "AdamW": DeepSpeed's CPU Adam needs a
compiled extension, and FusedAdam needs CUDA; a torch optimizer works on both paths.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import RunConfig
from .distributed.env import DistEnv
from .grad_norm import deepspeed_gradient_clipping
from .resolved import resolve_precision


def deepspeed_config(cfg: RunConfig, env: DistEnv, precision: str) -> dict[str, Any]:
    """DeepSpeed's JSON config for a validated ``cfg`` (``config.load_config`` checked every key)."""
    micro = cfg.data.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * env.world_size,
        "gradient_clipping": deepspeed_gradient_clipping(cfg.optim.grad_clip, cfg.dist.zero_stage),
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".keys")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups, then split into DeepSpeed MoE and non-MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Multiplier of ``optim.lr`` at optimizer step ``s``: linear warmup, then cosine/constant."""
    o = cfg.optim
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_engine(model: torch.nn.Module, cfg: RunConfig, env: DistEnv, total_steps: int,
                 precision: str | None = None):
    """DeepSpeed engine over an already expert-parallelised model; returns (engine, scheduler).

    ``total_steps`` and ``precision`` come from the resolved run (``ResolvedRun``); a caller
    without one (a test) gets the precision derived from the config.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, env, precision or resolve_precision(cfg, env.device.type))
    model = model.to(env.device)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    env.ensure_process_group()  # world size 1: DeepSpeed still wants a group
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine, scheduler
