"""DistEnv: layout resolution (pure), real gloo groups, and collectives that fail instead of hanging."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import spawn

from pce_dist.config import DistConfig
from pce_dist.distributed import DistEnv, expand_nodelist, slurm_first_host, slurm_master_port

_LAUNCH_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
                "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No launcher variables, and no scontrol on PATH (the pure-Python parser is used)."""
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    return monkeypatch


# ----------------------------------------------------------------------------- resolution (unit)


@pytest.mark.unit
def test_single_process_when_no_launcher_variables(clean_env):
    env = DistEnv.from_environ(DistConfig(ep_size=1))
    assert (env.rank, env.local_rank, env.world_size, env.source) == (0, 0, 1, "single")
    env.init()
    try:
        assert env.dp_group is env.ep_group is env.edp_group is None
        assert not dist.is_initialized()  # world size 1 creates no process group
        assert env.is_main and env.all_reduce_flag(True) and not env.all_reduce_flag(False)
        assert env.broadcast_object("x") == "x" and env.all_gather_object(3) == [3]
        assert env.local_expert_ids(4) == [0, 1, 2, 3]
        # exported for DeepSpeed, which asserts LOCAL_RANK and needs a rendezvous port
        assert os.environ["LOCAL_RANK"] == "0" and int(os.environ["MASTER_PORT"]) > 0
        env.barrier()
    finally:
        env.destroy()


@pytest.mark.unit
def test_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("MASTER_ADDR", "10.0.0.7")
    clean_env.setenv("MASTER_PORT", "29511")
    env = DistEnv.from_environ(DistConfig(ep_size=4, timeout_s=12.0))
    assert (env.rank, env.local_rank, env.world_size, env.source) == (5, 1, 8, "torchrun")
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 29511)
    assert (env.ep_size, env.ep_rank) == (4, 1)
    assert env.timeout.total_seconds() == 12.0
    assert env.local_expert_ids(8) == [2, 3]


@pytest.mark.unit
def test_slurm_variables_without_scontrol(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[1-4],other")
    clean_env.setenv("SLURM_JOB_ID", "1234567")
    env = DistEnv.from_environ(DistConfig(ep_size=2))
    assert (env.rank, env.local_rank, env.world_size, env.source) == (3, 1, 4, "slurm")
    assert env.master_addr == "node1"
    assert env.master_port == slurm_master_port("1234567") == 20000 + 1234567 % 10000
    # the step's own task count wins over the job's; explicit MASTER_* win over derived ones
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("MASTER_PORT", "2222")
    env = DistEnv.from_environ(DistConfig())
    assert (env.world_size, env.master_addr, env.master_port) == (8, "head", 2222)


@pytest.mark.unit
def test_slurm_prefers_scontrol(clean_env, tmp_path):
    fake = tmp_path / "bin" / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "from-scontrol" && echo other\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert slurm_first_host("node[1-4]") == "from-scontrol"
    fake.write_text("#!/bin/sh\nexit 1\n")  # a broken scontrol falls back to the parser
    assert slurm_first_host("node[7-9]") == "node7"


@pytest.mark.unit
def test_torchrun_variables_win_over_slurm(clean_env):
    for k, v in dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_JOB_ID="1",
                     SLURM_JOB_NODELIST="n1", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        clean_env.setenv(k, v)
    env = DistEnv.from_environ(DistConfig())
    assert (env.source, env.rank, env.world_size) == ("torchrun", 1, 2)
    with pytest.raises(ValueError, match="MASTER_PORT"):  # ranks could not agree on a port
        env.init()


@pytest.mark.unit
@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-4],other", ["node1", "node2", "node3", "node4", "other"]),
    ("gpu[01-03,7]-ib", ["gpu01-ib", "gpu02-ib", "gpu03-ib", "gpu7-ib"]),
    ("a[1-2]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2"]),
    ("single", ["single"]),
    ("x[009-011],y[2]", ["x009", "x010", "x011", "y2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.unit
def test_missing_slurm_variable_is_named(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("SLURM_JOB_NODELIST", "n1")
    clean_env.setenv("SLURM_JOB_ID", "9")
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        DistEnv.from_environ(DistConfig())


@pytest.mark.unit
def test_ep_size_validation_names_the_key():
    with pytest.raises(ValueError, match=r"dist\.ep_size.*world size 6"):
        DistEnv(rank=0, world_size=6, ep_size=4)
    with pytest.raises(ValueError, match=r"dist\.ep_size"):
        DistEnv(rank=0, world_size=4, ep_size=0)
    with pytest.raises(ValueError, match=r"dist\.ep_size.*num_experts=6"):
        DistEnv(rank=1, world_size=4, ep_size=4).local_expert_ids(6)
    with pytest.raises(ValueError, match=r"dist\.backend"):
        DistEnv(backend="mpi")
    with pytest.raises(ValueError, match=r"dist\.timeout_s"):
        DistEnv(timeout_s=0)


@pytest.mark.unit
def test_layout_is_deepspeed_e_plus_d():
    env = DistEnv(rank=5, world_size=8, ep_size=2)
    assert env.ep_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert env.edp_group_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    owners = {}
    for r in range(8):
        for e in DistEnv(rank=r, world_size=8, ep_size=4).local_expert_ids(8):
            owners.setdefault(e, []).append(r)
    assert owners == {0: [0, 4], 1: [0, 4], 2: [1, 5], 3: [1, 5], 4: [2, 6], 5: [2, 6], 6: [3, 7], 7: [3, 7]}


# ----------------------------------------------------------------------------- real groups


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
