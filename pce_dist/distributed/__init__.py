"""Process layout and process groups (``DistEnv``); the patch dispatcher lives beside it."""

from pce_dist.distributed.env import DistEnv, free_port
from pce_dist.distributed.slurm import expand_nodelist, slurm_first_host, slurm_master_port

__all__ = ["DistEnv", "expand_nodelist", "free_port", "slurm_first_host", "slurm_master_port"]
