"""``DistEnv``: who this process is, and every process group it belongs to.

One object resolves the launch environment (single process, torchrun-style variables, or
SLURM), initialises ``torch.distributed`` and owns the three group families the MoE
trainer needs. It is built once by the entry function and passed down; nothing here is
global and nothing happens at import time.

Group layout for ``world_size = 8, ep_size = 2`` (the same layout as DeepSpeed's
"E + D" expert groups, so an engine built on top agrees with us about who holds what):

    dp   (data parallel)         [0 1 2 3 4 5 6 7]              non-expert grads
    ep   (expert parallel)       [0 1] [2 3] [4 5] [6 7]        all-to-all of patches
    edp  (expert data parallel)  [0 2 4 6] [1 3 5 7]            expert grads

Rank ``r`` sits at position ``ep_rank = r % ep_size`` of EP group ``r // ep_size`` and
hosts the contiguous expert block ``ep_rank * E/ep_size ... (ep_rank+1) * E/ep_size - 1``.

Every collective runs under ``dist.timeout_s``: a dead or stuck peer turns into an
exception on the survivors instead of a job that hangs until the wall-clock limit.

DeepSpeed on top: ``init()`` exports RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
(DeepSpeed's engine asserts LOCAL_RANK is in ``os.environ``, and its
``init_distributed`` would otherwise go looking for MPI). When ``torch.distributed`` is
already initialised, ``deepspeed.init_distributed(dist_backend=..., timeout=...)`` wraps
the existing default group instead of creating a second one. With ``world_size == 1``
no group is created here (nothing to talk to); DeepSpeed may create its own one-rank
group later from the exported variables.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from pce_dist.config import DistConfig, check_expert_layout
from pce_dist.distributed.rendezvous import free_port, listen_socket, pin_loopback_transports
from pce_dist.distributed.slurm import slurm_first_host, slurm_master_port

_BACKENDS = ("auto", "gloo", "nccl")


def _env_int(environ: Mapping[str, str], *names: str) -> int:
    """The first of ``names`` present in ``environ``, as an int; errors name the variable."""
    for name in names:
        if name in environ:
            try:
                return int(environ[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None
    raise ValueError(f"environment variable {' or '.join(names)} is not set")


class DistEnv:
    """Resolved rank/world layout plus, after ``init()``, the process groups.

    Build with ``DistEnv.from_environ(cfg.dist)`` in real runs, or with the constructor in
    tests. Construction validates the layout but touches no network; ``init()`` does.

    Attributes:
        rank, local_rank, world_size: this process in the job, on its node, and the total.
        node_rank: which node this process runs on (SLURM_NODEID; torchrun's GROUP_RANK or
            NODE_RANK; 0 for a single node). Per-node work -- one system-metrics sampler --
            runs on the node's lowest rank (``tracking.system``).
        ep_size: expert-parallel degree; ep_rank: position inside the EP group.
        dp_group, ep_group, edp_group: ``ProcessGroup`` objects after ``init()``; ``None``
            when ``world_size == 1`` (every group would be just this process).
        io_group: every rank again, on a communicator of its own (gloo) for the checkpoint
            writer's background thread; reached through ``group="io"``.
        device: ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.
        source: "single", "torchrun" or "slurm" -- where the layout came from.
    """

    def __init__(
        self,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        *,
        ep_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        backend: str = "auto",
        timeout_s: float = 300.0,
        source: str = "single",
        node_rank: int = 0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if local_rank < 0:
            raise ValueError(f"local rank must be >= 0, got {local_rank}")
        if node_rank < 0:
            raise ValueError(f"node rank must be >= 0, got {node_rank}")
        check_expert_layout(ep_size, world_size=world_size)
        if backend not in _BACKENDS:
            raise ValueError(f"config key 'dist.backend' = {backend!r}: not one of {list(_BACKENDS)}")
        if timeout_s <= 0:
            raise ValueError(f"config key 'dist.timeout_s' = {timeout_s}: must be > 0")
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.ep_size = ep_size
        self.ep_rank = rank % ep_size
        self.master_addr, self.master_port = master_addr, master_port
        self.requested_backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.source = source
        self.node_rank = node_rank
        self.backend: str | None = None  # resolved by init()
        self.device = torch.device("cpu")
        self.dp_group: Any = None
        self.ep_group: Any = None
        self.edp_group: Any = None
        self.io_group: Any = None
        self._owns_process_group = False
        self._initialized = False

    # ------------------------------------------------------------------ resolution

    @classmethod
    def from_environ(cls, cfg: DistConfig, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Resolve the layout from torchrun variables, else SLURM, else a single process.

        torchrun-style variables win over SLURM ones, so ``launch/local.py`` or torchrun
        started inside a SLURM allocation behave as they do outside it. An explicit
        MASTER_ADDR / MASTER_PORT also overrides what SLURM would derive.
        """
        env = os.environ if environ is None else environ
        common = dict(ep_size=cfg.ep_size, backend=cfg.backend, timeout_s=cfg.timeout_s)
        if "RANK" in env and "WORLD_SIZE" in env:
            rank = _env_int(env, "RANK")
            return cls(
                rank=rank,
                local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank,
                world_size=_env_int(env, "WORLD_SIZE"),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
                source="torchrun",
                node_rank=next((_env_int(env, n) for n in ("GROUP_RANK", "NODE_RANK") if n in env), 0),
                **common,
            )
        if "SLURM_PROCID" in env:
            # The step's task count and node list describe *this* srun; the job's may be larger.
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if "MASTER_ADDR" in env:
                addr = env["MASTER_ADDR"]
            elif nodelist:
                addr = slurm_first_host(nodelist)
            else:
                raise ValueError("environment variable SLURM_JOB_NODELIST is not set (needed for MASTER_ADDR)")
            if "MASTER_PORT" in env:
                port = _env_int(env, "MASTER_PORT")
            elif "SLURM_JOB_ID" in env:
                port = slurm_master_port(env["SLURM_JOB_ID"])
            else:
                raise ValueError("environment variable SLURM_JOB_ID is not set (needed for MASTER_PORT)")
            return cls(
                rank=_env_int(env, "SLURM_PROCID"),
                local_rank=_env_int(env, "SLURM_LOCALID"),
                world_size=_env_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
                master_addr=addr,
                master_port=port,
                source="slurm",
                node_rank=_env_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0,
                **common,
            )
        return cls(source="single", **common)

    # ------------------------------------------------------------------ layout (pure)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs metrics and talks to MLflow."""
        return self.rank == 0

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def ep_group_ranks(self) -> list[list[int]]:
        """All expert-parallel groups: consecutive blocks of ``ep_size`` ranks."""
        return [list(range(g, g + self.ep_size)) for g in range(0, self.world_size, self.ep_size)]

    def edp_group_ranks(self) -> list[list[int]]:
        """All expert-data-parallel groups: ranks at the same position of their EP group."""
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    def local_expert_ids(self, num_experts: int) -> list[int]:
        """Global ids of the experts this rank hosts: a contiguous block chosen by ``ep_rank``."""
        check_expert_layout(self.ep_size, num_experts=num_experts)
        per_rank = num_experts // self.ep_size
        return list(range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank))

    # ------------------------------------------------------------------ lifecycle

    def _resolve_backend(self) -> str:
        cuda = torch.cuda.is_available()
        if self.requested_backend == "auto":
            return "nccl" if cuda else "gloo"
        if self.requested_backend == "nccl" and not cuda:
            raise ValueError("config key 'dist.backend' = 'nccl': needs CUDA, which is not available here; "
                             "use 'gloo' or 'auto'")
        return self.requested_backend

    def _export_environ(self) -> None:
        """Publish the resolved layout in torchrun's variable names (DeepSpeed reads them)."""
        if self.master_port is None:
            if self.world_size > 1:  # each rank would pick a different port and never meet
                raise ValueError(f"environment variable MASTER_PORT is not set (world size {self.world_size})")
            self.master_port = free_port()
        os.environ.update(
            RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))

    def init(self) -> DistEnv:
        """Pick the device, initialise ``torch.distributed`` and build every group. Idempotent.

        Every rank creates every group, in the same order, because ``new_group`` is itself
        a collective over the whole world -- even for ranks that are not members.
        """
        if self._initialized:
            return self
        self.backend = self._resolve_backend()
        if torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} "
                                   "CUDA devices are visible on this node")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        self._export_environ()
        if self.world_size > 1:
            if not dist.is_initialized():
                pin_loopback_transports(self.master_addr)
                dist.init_process_group(backend=self.backend, store=self._store(), rank=self.rank,
                                        world_size=self.world_size, timeout=self.timeout)
                self._owns_process_group = True
            elif dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
                raise RuntimeError(
                    f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                    f"{dist.get_world_size()}, but the environment says rank {self.rank} of {self.world_size}")
            self._build_groups()
        self._initialized = True
        return self

    def _store(self) -> Any:
        """The rendezvous store; rank 0 listens on MASTER_ADDR only (``rendezvous`` module)."""
        if self.rank == 0:
            sock = listen_socket(self.master_addr, self.master_port)
            return dist.TCPStore(self.master_addr, self.master_port, self.world_size, True, self.timeout,
                                 wait_for_workers=False, master_listen_fd=sock.detach())
        return dist.TCPStore(self.master_addr, self.master_port, self.world_size, False, self.timeout)

    def _new_group(self, ranks: list[int]) -> Any:
        if len(ranks) == self.world_size:
            return dist.group.WORLD  # no second communicator over the same ranks
        return dist.new_group(ranks, timeout=self.timeout, backend=self.backend)

    def _build_groups(self) -> None:
        self.dp_group = dist.group.WORLD
        for ranks in self.ep_group_ranks():
            group = self._new_group(ranks)
            if self.rank in ranks:
                self.ep_group = group
        for ranks in self.edp_group_ranks():
            group = self._new_group(ranks)
            if self.rank in ranks:
                self.edp_group = group
        # A communicator of its own for the checkpoint writer's background thread: two
        # threads must never issue collectives on one communicator (their order would differ
        # between ranks). gloo whatever the backend: it carries a few small objects.
        self.io_group = dist.new_group(list(range(self.world_size)), timeout=self.timeout, backend="gloo")

    def destroy(self) -> None:
        """Tear down the groups (and the default group, if ``init()`` created it). Idempotent."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False
        self.dp_group = self.ep_group = self.edp_group = self.io_group = None
        self._initialized = False

    # ------------------------------------------------------------------ small collectives

    def _require_init(self) -> None:
        if self.world_size > 1 and not self._initialized:
            raise RuntimeError("DistEnv.init() must be called before collectives")

    def barrier(self) -> None:
        self._require_init()
        if self.world_size == 1:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])  # tells NCCL which GPU, no guessing
        else:
            dist.barrier()

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (e.g. "a preemption signal arrived")."""
        self._require_init()
        if self.world_size == 1:
            return bool(flag)
        comm_device = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (small things: run ids, paths)."""
        self._require_init()
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any, group: str = "dp") -> list[Any]:
        """Every rank's picklable ``obj``, indexed by rank; ``group="io"`` on the checkpoint
        writer's communicator (the only group another thread may use, see ``_build_groups``)."""
        self._require_init()
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.io_group if group == "io" else None)
        return out

    # ------------------------------------------------------------------ tensor collectives
    # The only callers of torch.distributed outside the all-to-all dispatcher: every reduction
    # the trainer, the key updater, the norm statistics and key init need goes through here.

    def group_size(self, group: str = "dp") -> int:
        """Ranks in ``group``: "dp" (everyone), "ep" (one expert-parallel group) or "edp"
        (the ranks hosting the same experts)."""
        return {"dp": self.world_size, "ep": self.ep_size, "edp": self.world_size // self.ep_size}[group]

    def group_handle(self, group: str) -> Any:
        """The ``ProcessGroup`` of ``group`` for a library that needs one (DeepSpeed's registry):
        the default group where this process has no group of its own (one rank)."""
        handle = {"dp": self.dp_group, "ep": self.ep_group, "edp": self.edp_group}[group]
        return handle if handle is not None else dist.group.WORLD

    def all_reduce(self, t: torch.Tensor, group: str = "dp") -> torch.Tensor:
        """Sum ``t`` in place over ``group`` and return it (a no-op for a one-rank group)."""
        self._require_init()
        if self.group_size(group) > 1:
            dist.all_reduce(t, group={"dp": self.dp_group, "ep": self.ep_group, "edp": self.edp_group}[group])
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), indexed by rank."""
        self._require_init()
        if self.world_size == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return parts

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` copied in place into every rank's ``t`` (same shape everywhere)."""
        self._require_init()
        if self.world_size > 1:
            dist.broadcast(t, src=src)
        return t

    def ensure_process_group(self) -> None:
        """A one-rank default group when none exists: DeepSpeed needs ``torch.distributed``
        even for a single process. An in-memory store: nothing listens on any port."""
        if dist.is_initialized():
            return
        if self.world_size > 1:
            raise RuntimeError("DistEnv.init() must be called before building a multi-rank engine")
        dist.init_process_group(backend=self.backend or self._resolve_backend(), store=dist.HashStore(),
                                rank=0, world_size=1, timeout=self.timeout)
        self._owns_process_group = True

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def __repr__(self) -> str:
        return (f"DistEnv(rank={self.rank}, local_rank={self.local_rank}, world_size={self.world_size}, "
                f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, source={self.source!r}, "
                f"master={self.master_addr}:{self.master_port}, backend={self.backend or self.requested_backend})")
