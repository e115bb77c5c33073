"""Sharded checkpoints: the only module that builds checkpoint paths.

Layout of one checkpoint (a directory under ``<output_dir>/checkpoints/``)::

    step_00000120/
      meta.json          written last by rank 0: step, epoch, world/ep sizes, config,
                         MLflow run id, the expert -> file index, every file's size
      shared.pt          rank 0: every non-expert tensor (stem, routers + keys, conv1x1s,
                         head, BN statistics) and its optimizer state, LR schedule
      experts_r{r}.pt    ranks of the first expert-parallel group: the experts they host,
                         by global id (``layers.<l>.experts.<e>.*``), with optimizer state
      rank{r}.pt         every rank: RNG states, data position, samples seen, loader stats
      zero_r{r}.pt       only when optimizer state is not portable (ZeRO > 0 or bf16):
                         DeepSpeed's partitioned optimizer state of rank r
    latest               a text file naming the newest complete checkpoint

Every expert is stored exactly once, by global id, and optimizer state is stored per
parameter *name* -- so a checkpoint can be loaded on any world size / ``ep_size``: each
rank picks the experts it now hosts. The exception is DeepSpeed's partitioned optimizer
state (ZeRO-1/2, bf16), which is tied to the world size that wrote it: resuming it on
another layout is refused with an explanation.

Atomicity: all ranks write into ``.tmp-step_X``; after a barrier rank 0 checks that every
expected file is there, writes ``meta.json``, renames the directory into place, then
replaces ``latest`` (write + fsync + ``os.replace``). A kill at any moment leaves the
previous checkpoint and ``latest`` intact; stale ``.tmp-*`` directories are removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig, to_dict
from .distributed.env import DistEnv
from .model.net import is_expert_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Model keys that change tensor shapes or the function computed: a checkpoint is refused
# when one of these differs from the config.
ARCHITECTURE_KEYS = ("kind", "in_channels", "image_size", "num_classes", "stem_channels", "stem_norm", "channels",
                     "patch_sizes", "downsample", "num_experts", "expert_kernel", "expert_norm", "router_dim",
                     "spp_levels", "spp_pool", "head_spp_levels")


def _expert_prefix(name: str) -> str:
    """``layers.0.experts.3.conv1.weight`` -> ``layers.0.experts.3``."""
    head, _, tail = name.partition(".experts.")
    return f"{head}.experts.{tail.split('.')[0]}"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run's ``checkpoints`` directory or its ``latest`` file."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        path = path.parent / path.read_text().strip()
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no meta.json)")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def full_model_state(path: Path) -> tuple[dict, dict]:
    """Every tensor of the model (shared + every expert, by global id) and the saved config."""
    meta = read_meta(path)
    state = dict(torch.load(path / "shared.pt", map_location="cpu", weights_only=False)["model"])
    for fname in sorted(set(meta["expert_files"].values())):
        state.update(torch.load(path / fname, map_location="cpu", weights_only=False)["model"])
    return state, meta["config"]


class Checkpointer:
    """Saves and restores sharded checkpoints of one run; also carries the stop request
    (set by a signal handler, agreed on by all ranks in the training loop)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: Path) -> None:
        self.cfg, self.env = cfg, env
        self.root = Path(run_dir) / "checkpoints"
        self.run_id: str | None = None
        self._stop = False
        self.last_saved: Path | None = None
        self.saved_step: int | None = None

    # ------------------------------------------------------------------ stop requests

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def install_signal_handler(self, signum: int = signal.SIGUSR1) -> None:
        signal.signal(signum, self.request_stop)

    # ------------------------------------------------------------------ paths

    def _portable_optimizer(self) -> bool:
        from .engine import resolve_precision

        return self.cfg.dist.zero_stage == 0 and resolve_precision(self.cfg, self.env) == "fp32"

    def find_resume(self) -> Path | None:
        """``checkpoint.resume`` if set, else ``<output_dir>/checkpoints/latest`` when present."""
        if self.cfg.checkpoint.resume:
            try:
                return resolve(self.cfg.checkpoint.resume)
            except ValueError as exc:
                raise ValueError(f"config key 'checkpoint.resume' = {self.cfg.checkpoint.resume!r}: {exc}") from None
        if not (self.root / "latest").is_file():
            return None
        return resolve(self.root / "latest")

    # ------------------------------------------------------------------ save

    def save(self, trainer: Any, reason: str = "step") -> Path:
        """Every rank calls this at an optimizer-step boundary; returns the checkpoint dir."""
        env, state = self.env, trainer.state
        trainer.sync_norm_statistics()  # one model on disk, whichever rank writes a module
        name = f"step_{state.global_step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        env.barrier()
        model, engine = trainer.model, trainer.engine
        portable = self._portable_optimizer()
        named_state = self._named_optimizer_state(model, engine.optimizer) if portable else {}
        model_state = model.state_dict()
        if env.is_main:
            shared = {k: v for k, v in model_state.items() if not is_expert_name(k)}
            _atomic_save({"model": shared,
                          "optimizer": {k: v for k, v in named_state.items() if not is_expert_name(k)},
                          "optimizer_groups": self._group_hparams(engine.optimizer),
                          "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
                         tmp / "shared.pt")
        if env.rank < env.ep_size:  # the first expert-parallel group stores each expert once
            experts = {k: v for k, v in model_state.items() if is_expert_name(k)}
            _atomic_save({"model": experts, "optimizer": {k: v for k, v in named_state.items() if is_expert_name(k)}},
                         tmp / f"experts_r{env.rank}.pt")
        if not portable:
            _atomic_save(engine.optimizer.state_dict(), tmp / f"zero_r{env.rank}.pt")
        loader_stats = getattr(trainer.data, "stats", lambda: {})()
        _atomic_save({"rng": _rng_state(), "state": trainer.state_dict(), "loader": loader_stats},
                     tmp / f"rank{env.rank}.pt")
        env.barrier()
        if env.is_main:
            self._finalise(tmp, final, trainer, model_state, portable, reason)
        env.barrier()
        self.last_saved, self.saved_step = final, state.global_step
        return final

    def _finalise(self, tmp: Path, final: Path, trainer: Any, model_state: dict, portable: bool,
                  reason: str) -> None:
        env, state = self.env, trainer.state
        expected = ["shared.pt"] + [f"experts_r{r}.pt" for r in range(env.ep_size)] + \
                   [f"rank{r}.pt" for r in range(env.world_size)] + \
                   ([] if portable else [f"zero_r{r}.pt" for r in range(env.world_size)])
        missing = [f for f in expected if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} is incomplete, missing {missing}; not publishing it")
        num_experts = self.cfg.model.num_experts
        per_rank = num_experts // env.ep_size
        layers = sorted({k.partition(".experts.")[0] for k in model_state if is_expert_name(k)})
        index = {f"{layer}.experts.{e}": f"experts_r{e // per_rank}.pt" for layer in layers for e in range(num_experts)}
        meta = {
            "format": FORMAT_VERSION, "reason": reason, "global_step": state.global_step, "epoch": state.epoch,
            "micro_step": state.micro_step, "world_size": env.world_size, "ep_size": env.ep_size,
            "zero_stage": self.cfg.dist.zero_stage, "portable_optimizer": portable,
            "batch_size": self.cfg.data.batch_size, "mlflow_run_id": self.run_id, "config": to_dict(self.cfg),
            "expert_files": index, "files": {f: (tmp / f).stat().st_size for f in expected},
        }
        _atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write_text(self.root / "latest", final.name)
        self._prune(keep=self.cfg.checkpoint.keep_last, current=final.name)
        log.info("checkpoint %s saved (%s)", final, reason)

    def _prune(self, keep: int, current: str) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file())
        for old in done[:-keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _param_names(model: torch.nn.Module) -> dict[int, str]:
        return {id(p): n for n, p in model.named_parameters()}

    def _named_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        names = self._param_names(model)
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in optimizer.state and optimizer.state[p]:
                    out[names[id(p)]] = {k: (v.clone() if torch.is_tensor(v) else v)
                                         for k, v in optimizer.state[p].items()}
        return out

    @staticmethod
    def _group_hparams(optimizer: torch.optim.Optimizer) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    # ------------------------------------------------------------------ load

    def check_compatible(self, meta: dict, path: Path) -> None:
        saved = meta["config"]["model"]
        for key in ARCHITECTURE_KEYS:
            if saved.get(key) != getattr(self.cfg.model, key):
                raise ValueError(f"checkpoint {path} was saved with model.{key}={saved.get(key)!r}, but the config "
                                 f"has model.{key}={getattr(self.cfg.model, key)!r}; they are incompatible")

    def load(self, path: Path, model: torch.nn.Module, engine: Any):
        """Restore weights, optimizer, schedule, RNG and position; returns the ``TrainState``."""
        from .trainer import TrainState

        env = self.env
        meta = read_meta(path)
        self.check_compatible(meta, path)
        same_layout = meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
        portable_now = self._portable_optimizer()
        if not meta["portable_optimizer"] or not portable_now:
            if not (same_layout and meta["portable_optimizer"] == portable_now
                    and meta["zero_stage"] == self.cfg.dist.zero_stage):
                raise ValueError(
                    f"checkpoint {path} holds DeepSpeed-partitioned optimizer state (ZeRO stage {meta['zero_stage']}, "
                    f"{meta['world_size']} ranks, ep_size {meta['ep_size']}); it can only resume on that exact layout "
                    f"and zero stage (now: {env.world_size} ranks, ep_size {env.ep_size}, ZeRO {self.cfg.dist.zero_stage})."
                    " Portable checkpoints need dist.zero_stage=0 in fp32.")
        shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=False)
        wanted = model.state_dict()
        state = dict(shared["model"])
        optim_state = dict(shared["optimizer"])
        needed_files = {meta["expert_files"][_expert_prefix(k)] for k in wanted if is_expert_name(k)}
        for fname in sorted(needed_files):
            part = torch.load(path / fname, map_location="cpu", weights_only=False)
            state.update({k: v for k, v in part["model"].items() if k in wanted})
            optim_state.update({k: v for k, v in part["optimizer"].items() if k in wanted})
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[:3]}")
        model.load_state_dict({k: state[k] for k in wanted})
        if meta["portable_optimizer"]:
            self._load_named_optimizer_state(model, engine.optimizer, optim_state)
        else:
            # DeepSpeed's ZeRO / bf16 optimizers take the list of every rank's state and pick their own
            engine.optimizer.load_state_dict([torch.load(path / f"zero_r{r}.pt", map_location="cpu", weights_only=False)
                                              for r in range(meta["world_size"])])
        if shared.get("scheduler") is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(shared["scheduler"])
            # the scheduler writes a group's lr only when it steps; the next optimizer step
            # must already use the saved schedule position
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        self.run_id = meta.get("mlflow_run_id")
        train_state = TrainState(**self._rank_state(path, meta)["state"])
        if same_layout:
            _set_rng_state(self._rank_state(path, meta)["rng"])
        else:
            train_state.micro_step, train_state.samples_seen = self._map_position(meta, train_state)
        engine.global_steps = train_state.global_step
        self.last_saved, self.saved_step = path, train_state.global_step  # nothing new to save yet
        log.info("resumed from %s (step %d, epoch %d, %s layout)", path, train_state.global_step, train_state.epoch,
                 "same" if same_layout else "different")
        return train_state

    def _rank_state(self, path: Path, meta: dict) -> dict:
        rank = self.env.rank if meta["world_size"] == self.env.world_size else 0
        return torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)

    def _map_position(self, meta: dict, st) -> tuple[int, int]:
        """Same fraction of the epoch on a new world size (see docs/checkpoints.md)."""
        consumed = st.micro_step * meta["batch_size"] * meta["world_size"]
        new_micro = consumed // (self.cfg.data.batch_size * self.env.world_size)
        new_micro -= new_micro % self.cfg.train.grad_accum  # resume on an optimizer-step boundary
        return new_micro, st.samples_seen * meta["world_size"] // self.env.world_size

    def _load_named_optimizer_state(self, model, optimizer, named: dict) -> None:
        by_id = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = by_id[id(p)]
                if name in named:
                    optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                          for k, v in named[name].items()}
