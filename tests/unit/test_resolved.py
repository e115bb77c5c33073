"""The resolved run: precision, schedule and placement derived once from config + world."""

import pytest
import torch

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.resolved import resolve_precision, resolve_run


def _env(world=4, rank=1, ep=2):
    return DistEnv(rank=rank, local_rank=rank, world_size=world, ep_size=ep)


def test_schedule_uses_whole_accumulation_windows_and_max_steps_wins():
    cfg = load_config(None, ["train.grad_accum=3", "train.epochs=5", "model.num_experts=4", "dist.ep_size=2"])
    run = resolve_run(cfg, _env(), batches_per_epoch=10)
    assert (run.batches_per_epoch, run.micro_per_epoch, run.num_epochs, run.total_steps) == (10, 9, 5, 15)
    cfg = load_config(None, ["train.grad_accum=3", "train.max_steps=7", "dist.ep_size=2"])
    run = resolve_run(cfg, _env(), batches_per_epoch=10)
    assert (run.num_epochs, run.total_steps) == (3, 7)  # 3 optimizer steps per epoch: ceil(7 / 3) epochs
    with pytest.raises(ValueError, match="train.grad_accum=3"):
        resolve_run(cfg, _env(), batches_per_epoch=2)


def test_precision_and_placement():
    cfg = load_config(None, ["model.num_experts=8", "dist.ep_size=2"])
    run = resolve_run(cfg, _env(rank=3), batches_per_epoch=4)
    assert run.precision == "fp32" and run.dtype == torch.float32
    assert run.local_expert_ids == (4, 5, 6, 7)  # ep_rank 1 of 2 hosts the second half
    assert resolve_precision(load_config(None, []), "cuda") == "bf16"
    with pytest.raises(ValueError, match="dist.precision"):
        resolve_precision(load_config(None, ["dist.precision=bf16"]), "cpu")


def test_zero_partitioning_with_replicated_experts_is_refused_before_start():
    from pce_dist.config import validate_world

    cfg = load_config(None, ["dist.zero_stage=1", "dist.ep_size=2"])
    validate_world(cfg, 2)  # every expert on one rank: supported
    with pytest.raises(ValueError, match=r"dist.zero_stage.*every expert on exactly one rank"):
        validate_world(cfg, 4)
    validate_world(load_config(None, ["dist.zero_stage=1", "model.kind=dense"]), 4)  # no experts, no problem
