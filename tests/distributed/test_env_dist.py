"""DistEnv with real gloo groups: group membership, collectives that fail instead of
hanging, DeepSpeed reusing the group. (Resolution without a process group: tests/unit/test_env.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import spawn

from pce_dist.config import DistConfig
from pce_dist.distributed import DistEnv


def _membership(group) -> list[int]:
    """Sum 2**rank over the group: the bits of the result are exactly its members."""
    t = torch.tensor([2 ** dist.get_rank()], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return [r for r in range(dist.get_world_size()) if int(t.item()) >> r & 1]


def _groups_worker(rank: int, world_size: int, ep_size: int) -> dict:
    env = DistEnv.from_environ(DistConfig(ep_size=ep_size, timeout_s=30.0)).init()
    try:
        out = {
            "dp": _membership(env.dp_group),
            "ep": _membership(env.ep_group),
            "edp": _membership(env.edp_group),
            "ep_rank": env.ep_rank,
            "experts": env.local_expert_ids(4),
            "flag_any": env.all_reduce_flag(rank == world_size - 1),
            "flag_none": env.all_reduce_flag(False),
            "from_main": env.broadcast_object(f"run-{rank}"),
            "gathered": env.all_gather_object(rank * 10),
        }
        env.barrier()
        return out
    finally:
        env.destroy()


@pytest.mark.parametrize("world_size, ep_size", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_groups_have_the_right_members(world_size, ep_size):
    results = spawn(_groups_worker, world_size, args=(ep_size,), timeout_s=60)
    per_rank = 4 // ep_size
    for rank, got in enumerate(results):
        ep_index, ep_rank = divmod(rank, ep_size)
        assert got["dp"] == list(range(world_size))
        assert got["ep"] == list(range(ep_index * ep_size, (ep_index + 1) * ep_size))
        assert got["edp"] == [r for r in range(world_size) if r % ep_size == ep_rank]
        assert got["ep_rank"] == ep_rank
        assert got["experts"] == list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
        assert got["flag_any"] is True and got["flag_none"] is False
        assert got["from_main"] == "run-0"
        assert got["gathered"] == [r * 10 for r in range(world_size)]
    # together, the ranks of one EP group host every expert exactly once
    hosted = sorted(e for got in results[:ep_size] for e in got["experts"])
    assert hosted == [0, 1, 2, 3]


def _timeout_worker(rank: int, world_size: int, behaviour: str, done_file: str) -> float:
    env = DistEnv.from_environ(DistConfig(timeout_s=5.0)).init()
    if rank == 1:
        if behaviour == "sleeps":  # alive but never joins the collective
            deadline = time.monotonic() + 30
            while not os.path.exists(done_file) and time.monotonic() < deadline:
                time.sleep(0.1)
        return 0.0  # "exits": leave without taking part
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception:  # gloo raises RuntimeError / DistBackendError depending on the version
        return time.monotonic() - start
    finally:
        Path(done_file).touch()
    raise AssertionError("all_reduce with a missing peer returned normally")


@pytest.mark.parametrize("behaviour", ["sleeps", "exits"])
def test_collective_fails_within_timeout_instead_of_hanging(behaviour, tmp_path):
    elapsed, _ = spawn(_timeout_worker, 2, args=(behaviour, str(tmp_path / "done")), timeout_s=40)
    assert elapsed < 5.0 + 5.0, f"all_reduce took {elapsed:.1f} s to fail with a 5 s timeout"
    if behaviour == "sleeps":
        assert elapsed >= 4.0  # it really waited for the peer, then gave up


def _deepspeed_worker(rank: int, world_size: int) -> dict:
    env = DistEnv.from_environ(DistConfig(timeout_s=30.0)).init()
    default_group = dist.group.WORLD
    import deepspeed
    import deepspeed.comm as ds_comm

    deepspeed.init_distributed(dist_backend=env.backend, timeout=env.timeout)
    t = torch.tensor([rank + 1.0])
    ds_comm.all_reduce(t)
    out = {"ds_world": ds_comm.get_world_size(), "sum": t.item(), "same_group": dist.group.WORLD is default_group}
    env.destroy()
    return out


@pytest.mark.slow
def test_deepspeed_reuses_the_initialised_group():
    for got in spawn(_deepspeed_worker, 2, timeout_s=90):
        assert got == {"ds_world": 2, "sum": 3.0, "same_group": True}
