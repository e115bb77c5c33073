"""DistEnv without a process group: layout resolution from torchrun / SLURM variables,
validation, and the single-process environment. (Real gloo groups: tests/distributed.)"""

from __future__ import annotations

import os
import stat

import pytest
import torch.distributed as dist

from pce_dist.config import DistConfig
from pce_dist.distributed import DistEnv, expand_nodelist, slurm_first_host, slurm_master_port

_LAUNCH_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID",
                "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_NODEID", "GROUP_RANK",
                "NODE_RANK"]


pytestmark = pytest.mark.usefixtures("restore_environ")  # DistEnv.init() exports launch variables


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No launcher variables, and no scontrol on PATH (the pure-Python parser is used)."""
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    return monkeypatch


def test_single_process_when_no_launcher_variables(clean_env):
    env = DistEnv.from_environ(DistConfig(ep_size=1))
    assert (env.rank, env.local_rank, env.world_size, env.source, env.node_rank) == (0, 0, 1, "single", 0)
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
    assert env.node_rank == 0  # no node variable: one node
    clean_env.setenv("NODE_RANK", "3")
    assert DistEnv.from_environ(DistConfig()).node_rank == 3
    clean_env.setenv("GROUP_RANK", "2")  # torchrun's own name wins
    assert DistEnv.from_environ(DistConfig()).node_rank == 2


def test_slurm_variables_without_scontrol(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[1-4],other")
    clean_env.setenv("SLURM_JOB_ID", "1234567")
    env = DistEnv.from_environ(DistConfig(ep_size=2))
    assert (env.rank, env.local_rank, env.world_size, env.source) == (3, 1, 4, "slurm")
    assert env.node_rank == 0
    clean_env.setenv("SLURM_NODEID", "1")  # the node within the job: system metrics are named by it
    assert DistEnv.from_environ(DistConfig(ep_size=2)).node_rank == 1
    assert env.master_addr == "node1"
    assert env.master_port == slurm_master_port("1234567") == 20000 + 1234567 % 10000
    # the step's own task count wins over the job's; explicit MASTER_* win over derived ones
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("MASTER_PORT", "2222")
    env = DistEnv.from_environ(DistConfig())
    assert (env.world_size, env.master_addr, env.master_port) == (8, "head", 2222)


def test_slurm_prefers_scontrol(clean_env, tmp_path):
    fake = tmp_path / "bin" / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "from-scontrol" && echo other\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert slurm_first_host("node[1-4]") == "from-scontrol"
    fake.write_text("#!/bin/sh\nexit 1\n")  # a broken scontrol falls back to the parser
    assert slurm_first_host("node[7-9]") == "node7"


def test_torchrun_variables_win_over_slurm(clean_env):
    for k, v in dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_JOB_ID="1",
                     SLURM_JOB_NODELIST="n1", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        clean_env.setenv(k, v)
    env = DistEnv.from_environ(DistConfig())
    assert (env.source, env.rank, env.world_size) == ("torchrun", 1, 2)
    with pytest.raises(ValueError, match="MASTER_PORT"):  # ranks could not agree on a port
        env.init()


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-4],other", ["node1", "node2", "node3", "node4", "other"]),
    ("gpu[01-03,7]-ib", ["gpu01-ib", "gpu02-ib", "gpu03-ib", "gpu7-ib"]),
    ("a[1-2]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2"]),
    ("single", ["single"]),
    ("x[009-011],y[2]", ["x009", "x010", "x011", "y2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_missing_slurm_variable_is_named(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("SLURM_JOB_NODELIST", "n1")
    clean_env.setenv("SLURM_JOB_ID", "9")
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        DistEnv.from_environ(DistConfig())


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


def test_layout_is_deepspeed_e_plus_d():
    env = DistEnv(rank=5, world_size=8, ep_size=2)
    assert env.ep_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert env.edp_group_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    owners = {}
    for r in range(8):
        for e in DistEnv(rank=r, world_size=8, ep_size=4).local_expert_ids(8):
            owners.setdefault(e, []).append(r)
    assert owners == {0: [0, 4], 1: [0, 4], 2: [1, 5], 3: [1, 5], 4: [2, 6], 5: [2, 6], 6: [3, 7], 7: [3, 7]}
