"""Sharded checkpoints: the only module that builds checkpoint paths.

Layout of one checkpoint (a directory under ``<output_dir>/checkpoints/``)::

    step_00000120/
      meta.json          written last by rank 0: step, epoch, world/ep sizes, the redacted
                         config, MLflow run id, the expert -> file index, every file's size
                         and sha256
      shared.pt          rank 0: every non-expert tensor (stem, routers + keys, conv1x1s,
                         head, BN statistics) and its optimizer state, LR schedule
      experts_r{r}.pt    ranks of the first expert-parallel group: the experts they host,
                         by global id (``layers.<l>.experts.<e>.*``), with optimizer state
      rank{r}.pt         every rank: RNG states, data position, samples seen, loader stats,
                         the open log interval (sums, counts, all-to-all traffic counters)
      zero_r{r}.pt       only when optimizer state is not portable (ZeRO > 0 or bf16):
                         DeepSpeed's partitioned optimizer state of rank r
    latest               a text file naming the newest complete checkpoint

Every expert is stored exactly once, by global id, and optimizer state is stored per
parameter *name* -- so a checkpoint can be loaded on any world size / ``ep_size``: each
rank picks the experts it now hosts. The exception is DeepSpeed's partitioned optimizer
state (ZeRO-1/2, bf16), which is tied to the world size that wrote it: resuming it on
another layout is refused with an explanation.

Atomicity: all ranks write into ``.tmp-step_X``; each rank hashes its files as the bytes
go out (no second read) and hands ``(size, sha256)`` to rank 0 in the all-gather that ends
the write; rank 0 checks that every expected file is there, writes ``meta.json``, renames
the directory into place, then replaces ``latest`` (write + fsync + ``os.replace``). A kill
at any moment leaves the previous checkpoint and ``latest`` intact; stale ``.tmp-*``
directories are removed.

Nothing is unpickled beyond tensors and plain containers (``weights_only=True``): a
checkpoint is data, and a file that would need anything else to load is refused naming
the file (see ``load_plain``). The only classes let through are the three DeepSpeed puts
into its partitioned optimizer state, and only for ``zero_r*.pt``. Every read checks the
file's size and sha256 against ``meta.json`` first; ``find_resume`` skips a damaged newest
checkpoint for the next older intact one (see docs/checkpoints.md).

Two ways in: ``load`` resumes the run that wrote a checkpoint (position, schedule, RNG, the
open log interval); ``warm_start`` (``checkpoint.init_from``) starts a new run from its
weights, and optionally its optimizer state, at step 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from .config import RunConfig, to_dict
from .distributed import norm_stats
from .distributed.env import DistEnv
from .model.net import is_expert_name
from .redact import redact_obj
from .resolved import resolve_precision
from .state import TrainState

log = logging.getLogger(__name__)

# 2: sha256 per file, redacted config, numpy RNG state as a tensor (1: sizes only, ndarray)
FORMAT_VERSION = 2
# Model keys that change tensor shapes or the function computed: a checkpoint is refused
# when one of these differs from the config.
ARCHITECTURE_KEYS = ("kind", "in_channels", "image_size", "num_classes", "stem_channels", "stem_norm", "channels",
                     "patch_sizes", "downsample", "num_experts", "expert_kernel", "expert_norm", "router_dim",
                     "spp_levels", "spp_pool", "head_spp_levels")
SHARED_FILE = "shared.pt"
_STEP_DIR = re.compile(r"step_\d{8,}")
_META_KEYS = ("format", "global_step", "world_size", "ep_size", "zero_stage", "portable_optimizer", "batch_size",
              "config", "expert_files", "files")
_CHUNK = 1 << 20


def experts_file(rank: int) -> str:
    return f"experts_r{rank}.pt"


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def zero_file(rank: int) -> str:
    return f"zero_r{rank}.pt"


def expected_files(world_size: int, ep_size: int, portable: bool) -> list[str]:
    """Every data file of a checkpoint written by that layout."""
    return [SHARED_FILE] + [experts_file(r) for r in range(ep_size)] + [rank_file(r) for r in range(world_size)] + \
        ([] if portable else [zero_file(r) for r in range(world_size)])


def _expert_prefix(name: str) -> str:
    """``layers.0.experts.3.conv1.weight`` -> ``layers.0.experts.3``."""
    head, _, tail = name.partition(".experts.")
    return f"{head}.experts.{tail.split('.')[0]}"


# ----------------------------------------------------------------------------- safe file I/O


def _deepspeed_optimizer_globals() -> list[type]:
    """The classes in DeepSpeed's ZeRO-1/2 and bf16 optimizer ``state_dict`` (0.19; pinned by
    tests/distributed/test_checkpoint.py): plain data holders whose unpickling runs no
    code we do not know. Allowed for ``zero_r*.pt`` only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _legacy_numpy_globals() -> list[Any]:
    """What a format-1 ``rank*.pt`` needs: numpy's RNG keys were pickled as an ndarray
    (a uint32 array; numpy 1.x names its module ``numpy.core``, 2.x ``numpy._core``)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _global_name(obj: Any) -> str:
    """The name a pickle uses for ``obj`` (``(obj, name)`` entries carry theirs)."""
    return obj[1] if isinstance(obj, tuple) else f"{obj.__module__}.{obj.__qualname__}"


def load_plain(data: bytes, where: Path | str, allow: Sequence[Any] = ()) -> Any:
    """``torch.load`` of ``data`` that unpickles only tensors, plain containers and ``allow``.

    Raises:
        ValueError: naming ``where`` -- the file needs other classes or functions (loading
            them would let the file run code), or it is not a readable torch file.
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            allowed = {_global_name(a) for a in allow}
            names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))) - allowed)
        except Exception:  # noqa: BLE001 -- only used to word the message
            names = []
        raise ValueError(f"{where}: refusing to load it: it holds pickled objects other than tensors and plain "
                         f"containers ({', '.join(names) or 'unsupported pickle data'}); unpickling them could run "
                         "arbitrary code. pce_dist never writes such files: it was replaced or tampered with") from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{where}: not a readable torch file ({str(exc).splitlines()[0]})") from None


class _HashingWriter:
    """What ``torch.save`` writes to, passed through to ``file`` and hashed on the way."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.num_bytes = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _atomic_save(obj: Any, path: Path, allow: Sequence[Any] = ()) -> tuple[int, str]:
    """``torch.save`` via ``.part`` + fsync + rename; returns (bytes, sha256) of the file.

    Refuses to publish a file that ``load_plain`` would refuse: a checkpoint found
    unloadable at resume time is lost work, so fail at the first save instead."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp)) - {_global_name(a) for a in allow}
    if unsafe:
        raise RuntimeError(f"{path} would need {sorted(unsafe)} to load; store plain types instead (a bug)")
    os.replace(tmp, path)
    return writer.num_bytes, writer.sha256.hexdigest()


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
    """Every RNG stream as tensors / ints: loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)  # a format-1 checkpoint holds numpy's own tuple
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- reading and verifying


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


def resolve_source(path: str | Path) -> Path:
    """``resolve`` that also takes a run directory (``<run>/checkpoints/latest``): what
    ``checkpoint.init_from`` accepts."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not (path / "meta.json").is_file():
        path = path / "checkpoints"
    return resolve(path)


def read_meta(path: Path) -> dict:
    """``meta.json``, checked for what the loader relies on.

    Raises:
        ValueError: naming ``meta.json`` -- missing, unreadable, incomplete or from a newer format.
    """
    where = path / "meta.json"
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{where}: lacks {missing}")
    if meta["format"] > FORMAT_VERSION:
        raise ValueError(f"{where}: format {meta['format']} is newer than this pce_dist reads ({FORMAT_VERSION})")
    expected = expected_files(meta["world_size"], meta["ep_size"], meta["portable_optimizer"])
    if sorted(meta["files"]) != sorted(expected) or not set(meta["expert_files"].values()) <= set(expected):
        raise ValueError(f"{where}: lists files {sorted(meta['files'])}, but the layout it records needs {expected}")
    return meta


def _mismatch(file: Path, meta: dict, size: int, digest: str | None) -> str | None:
    """Why ``file`` differs from what ``meta.json`` records, or None."""
    want_size, want_digest = meta["files"][file.name], meta.get("sha256", {}).get(file.name)
    if size != want_size:
        return f"{file}: {size} bytes on disk, meta.json records {want_size} (truncated or replaced)"
    if want_digest is not None and digest != want_digest:
        return f"{file}: sha256 {digest} differs from the {want_digest} recorded in meta.json (corrupted)"
    return None


def _read_verified(path: Path, meta: dict, name: str) -> bytes:
    """The bytes of one data file, after checking them against ``meta.json``: what is
    unpickled is exactly what was checked."""
    file = path / name
    if name not in meta["files"]:
        raise ValueError(f"{file}: not listed in {path / 'meta.json'}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{file}: unreadable ({exc.strerror or exc})") from None
    problem = _mismatch(file, meta, len(data), hashlib.sha256(data).hexdigest() if "sha256" in meta else None)
    if problem:
        raise ValueError(problem)
    return data


def load_file(path: Path, meta: dict, name: str) -> Any:
    """One verified data file of checkpoint ``path``, with only the classes its kind needs."""
    allow: list[Any] = []
    if name.startswith("zero_r"):
        allow = _deepspeed_optimizer_globals()
    elif name.startswith("rank") and meta["format"] < 2:
        allow = _legacy_numpy_globals()
    return load_plain(_read_verified(path, meta, name), path / name, allow)


def verify(path: Path) -> dict:
    """Check every file of checkpoint ``path`` (size, and sha256 where recorded); returns its meta.

    Raises:
        ValueError: naming the first damaged file and what is wrong with it.
    """
    meta = read_meta(path)
    for name in meta["files"]:
        file = path / name
        digest, size = hashlib.sha256(), 0
        try:
            with open(file, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise ValueError(f"{file}: unreadable ({exc.strerror or exc})") from None
        problem = _mismatch(file, meta, size, digest.hexdigest())
        if problem:
            raise ValueError(problem)
    return meta


def full_model_state(path: Path) -> tuple[dict, dict]:
    """Every tensor of the model (shared + every expert, by global id) and the saved config."""
    meta = read_meta(path)
    state = dict(load_file(path, meta, SHARED_FILE)["model"])
    for name in sorted(set(meta["expert_files"].values())):
        state.update(load_file(path, meta, name)["model"])
    return state, meta["config"]


class Checkpointer:
    """Saves and restores sharded checkpoints of one run.

    It is handed what it saves (``save(model, engine, state, loader_stats)``) and returns what
    it loads (``load`` -> ``TrainState``); it holds no reference to the trainer and no stop
    flag. ``portable_optimizer`` comes from the resolved run (``ResolvedRun``); a caller that
    has none (a test) gets it derived from the config.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: Path, portable_optimizer: bool | None = None) -> None:
        self.cfg, self.env = cfg, env
        self.root = Path(run_dir) / "checkpoints"
        if portable_optimizer is None:
            portable_optimizer = cfg.dist.zero_stage == 0 and resolve_precision(cfg, env.device.type) == "fp32"
        self.portable_optimizer = portable_optimizer
        self.run_id: str | None = None
        self.log_window: dict | None = None  # set by a same-layout ``load`` (see ``save``)
        self.init_source: dict | None = None  # set by ``warm_start``: what the new run started from
        self.last_saved: Path | None = None
        self.saved_step: int | None = None

    # ------------------------------------------------------------------ which checkpoint

    def find_resume(self) -> Path | None:
        """``checkpoint.resume`` if set, else the newest intact checkpoint under
        ``<output_dir>/checkpoints`` when ``latest`` is present; the same on every rank.

        Rank 0 verifies (one reader, not N hashing the same files) and broadcasts its choice.
        A damaged newest checkpoint is skipped with a warning for the next older intact one;
        an explicit ``checkpoint.resume`` is never replaced by another.

        Raises:
            ValueError: on every rank -- the explicit checkpoint is damaged, or none is intact.
        """
        choice = None
        if self.env.is_main:
            try:
                choice = ("ok", self._choose_resume())
            except ValueError as exc:
                choice = ("error", str(exc))
        status, value = self.env.broadcast_object(choice)
        if status == "error":
            raise ValueError(value)
        return Path(value) if value else None

    def _choose_resume(self) -> str | None:
        if self.cfg.checkpoint.resume:
            try:
                path = resolve(self.cfg.checkpoint.resume)
                verify(path)
            except ValueError as exc:
                raise ValueError(f"config key 'checkpoint.resume' = {self.cfg.checkpoint.resume!r}: {exc}") from None
            return str(path)
        latest = self.root / "latest"
        published = sorted((p for p in self.root.glob("step_*") if (p / "meta.json").is_file()), reverse=True)
        problems: list[str] = []
        if latest.is_file():
            candidates = self._candidates(latest, published, problems)
        elif published:  # the first save was killed between its rename and writing ``latest``
            log.warning("%s is missing but %s exists; resuming from the newest intact step_*", latest, published[0])
            candidates = published
        else:
            return None
        for path in candidates:
            try:
                verify(path)
            except ValueError as exc:
                log.warning("checkpoint %s is damaged, skipping it: %s", path.name, exc)
                problems.append(f"{path.name}: {exc}")
                continue
            if problems:
                log.warning("resuming from the older intact checkpoint %s instead", path)
            return str(path)
        raise ValueError(f"no intact checkpoint to resume from in {self.root}: " + "; ".join(problems))

    @staticmethod
    def _candidates(latest: Path, published: list[Path], problems: list[str]) -> list[Path]:
        """The checkpoint ``latest`` names, then the older published ``step_*``, newest first."""
        try:
            name = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            name = f"<unreadable: {exc}>"
        if not _STEP_DIR.fullmatch(name):
            problems.append(f"{latest}: names {name!r}, not a step_* checkpoint")
            log.warning("%s is damaged, trying every step_* newest first: %s", latest, problems[-1])
            return published
        return [latest.parent / name] + [p for p in published if p.name < name]

    # ------------------------------------------------------------------ save

    def save(self, model: torch.nn.Module, engine: Any, state: TrainState, *, loader_stats: dict | None = None,
             reason: str = "step", log_window: dict | None = None) -> Path:
        """Every rank calls this at an optimizer-step boundary; returns the checkpoint dir.

        Args:
            model: the expert-parallel model (this rank's experts); engine: its DeepSpeed
                engine (optimizer, LR schedule); state: the position to resume at;
            loader_stats: this rank's data accounting, stored for the record.
            log_window: this rank's open log interval (``Trainer.log_window_state``: plain
                tensors, ints, None), handed back as ``self.log_window`` by a same-layout
                ``load`` so the resumed run logs what the uninterrupted one did.
        """
        env = self.env
        own_norm = norm_stats.average(model, env)  # one model on disk, whichever rank writes a module
        name = f"step_{state.global_step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        env.barrier()
        portable = self.portable_optimizer
        named_state = self._named_optimizer_state(model, engine.optimizer) if portable else {}
        model_state = model.state_dict()
        written: dict[str, tuple[int, str]] = {}
        if env.is_main:
            shared = {k: v for k, v in model_state.items() if not is_expert_name(k)}
            written[SHARED_FILE] = _atomic_save(
                {"model": shared, "optimizer": {k: v for k, v in named_state.items() if not is_expert_name(k)},
                 "optimizer_groups": self._group_hparams(engine.optimizer),
                 "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
                tmp / SHARED_FILE)
        if env.rank < env.ep_size:  # the first expert-parallel group stores each expert once
            experts = {k: v for k, v in model_state.items() if is_expert_name(k)}
            written[experts_file(env.rank)] = _atomic_save(
                {"model": experts, "optimizer": {k: v for k, v in named_state.items() if is_expert_name(k)}},
                tmp / experts_file(env.rank))
        if not portable:
            written[zero_file(env.rank)] = _atomic_save(engine.optimizer.state_dict(), tmp / zero_file(env.rank),
                                                        allow=_deepspeed_optimizer_globals())
        written[rank_file(env.rank)] = _atomic_save(
            {"rng": _rng_state(), "state": asdict(state), "loader": dict(loader_stats or {}),
             "norm_buffers": own_norm, "log_window": log_window},
            tmp / rank_file(env.rank))
        norm_stats.restore(model, own_norm)  # the live run goes on exactly as without this save
        everyone = env.all_gather_object(written)  # also the barrier after every rank's writes
        if env.is_main:
            self._finalise(tmp, final, state, model_state, portable, reason,
                           {f: entry for w in everyone for f, entry in w.items()})
        env.barrier()
        self.last_saved, self.saved_step = final, state.global_step
        return final

    def _finalise(self, tmp: Path, final: Path, state: TrainState, model_state: dict, portable: bool, reason: str,
                  written: dict[str, tuple[int, str]]) -> None:
        env = self.env
        expected = expected_files(env.world_size, env.ep_size, portable)
        missing = [f for f in expected if f not in written or not (tmp / f).is_file()
                   or (tmp / f).stat().st_size != written[f][0]]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} is incomplete, missing or short {missing}; not publishing it")
        num_experts = self.cfg.model.num_experts
        per_rank = num_experts // env.ep_size
        layers = sorted({k.partition(".experts.")[0] for k in model_state if is_expert_name(k)})
        index = {f"{layer}.experts.{e}": experts_file(e // per_rank) for layer in layers for e in range(num_experts)}
        meta = {
            "format": FORMAT_VERSION, "reason": reason, "global_step": state.global_step, "epoch": state.epoch,
            "micro_step": state.micro_step, "world_size": env.world_size, "ep_size": env.ep_size,
            "zero_stage": self.cfg.dist.zero_stage, "portable_optimizer": portable,
            "batch_size": self.cfg.data.batch_size, "mlflow_run_id": self.run_id,
            "config": redact_obj(to_dict(self.cfg)), "expert_files": index,
            "files": {f: written[f][0] for f in expected}, "sha256": {f: written[f][1] for f in expected},
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
        """Keep the newest ``keep`` up to ``current``. Later ones (left by a run that resumed
        from an older checkpoint) are overwritten when training reaches their step, and do
        not count: they must not push intact checkpoints of this run out."""
        done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file() and p.name <= current)
        for old in done[:-keep]:
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
        """Restore weights, optimizer, schedule, RNG and position; returns the ``TrainState``.

        Each file is checked against ``meta.json`` as it is read (``find_resume`` has checked
        them all on rank 0 already; this covers a direct call and a file damaged since)."""
        env = self.env
        meta = read_meta(path)
        self.check_compatible(meta, path)
        same_layout = meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
        portable_now = self.portable_optimizer
        if not meta["portable_optimizer"] or not portable_now:
            if not (same_layout and meta["portable_optimizer"] == portable_now
                    and meta["zero_stage"] == self.cfg.dist.zero_stage):
                raise ValueError(
                    f"checkpoint {path} holds DeepSpeed-partitioned optimizer state (ZeRO stage {meta['zero_stage']}, "
                    f"{meta['world_size']} ranks, ep_size {meta['ep_size']}); it can only resume on that exact layout "
                    f"and zero stage (now: {env.world_size} ranks, ep_size {env.ep_size}, ZeRO {self.cfg.dist.zero_stage})."
                    " Portable checkpoints need dist.zero_stage=0 in fp32.")
        shared, state, optim_state = self._read_hosted(path, meta, model)
        rank_state = load_file(path, meta, rank_file(env.rank if meta["world_size"] == env.world_size else 0))
        model.load_state_dict(state)
        if meta["portable_optimizer"]:
            self._load_named_optimizer_state(model, engine.optimizer, optim_state)
        else:
            # DeepSpeed's ZeRO / bf16 optimizers take the list of every rank's state and pick their own
            engine.optimizer.load_state_dict([load_file(path, meta, zero_file(r)) for r in range(meta["world_size"])])
        if shared.get("scheduler") is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(shared["scheduler"])
            # the scheduler writes a group's lr only when it steps; the next optimizer step
            # must already use the saved schedule position
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        self.run_id = meta.get("mlflow_run_id")
        train_state = TrainState(**rank_state["state"])
        if same_layout:
            _set_rng_state(rank_state["rng"])
            # each rank continues from its own BatchNorm statistics, not the average the shared
            # files hold (see ``distributed.norm_stats``)
            norm_stats.restore(model, rank_state.get("norm_buffers") or {})
            # per-rank sums of the open log interval; a checkpoint of format 2 before they were
            # stored has none, and the interval then restarts at the checkpoint
            self.log_window = rank_state.get("log_window")
        else:  # per-rank sums do not map to other ranks: the log interval restarts here
            train_state.micro_step, train_state.samples_seen = self._map_position(meta, train_state)
        engine.global_steps = train_state.global_step
        self.last_saved, self.saved_step = path, train_state.global_step  # nothing new to save yet
        log.info("resumed from %s (step %d, epoch %d, %s layout)", path, train_state.global_step, train_state.epoch,
                 "same" if same_layout else "different")
        return train_state

    @staticmethod
    def _read_hosted(path: Path, meta: dict, model: torch.nn.Module) -> tuple[dict, dict, dict]:
        """``(shared.pt, model state, named optimizer state)`` of what this rank's ``model``
        holds: the shared tensors and the experts it hosts now, by global id, from
        whichever files hold them (any layout wrote them the same way)."""
        shared = load_file(path, meta, SHARED_FILE)
        wanted = model.state_dict()
        state = dict(shared["model"])
        optim_state = dict(shared["optimizer"])
        needed_files = {meta["expert_files"][_expert_prefix(k)] for k in wanted if is_expert_name(k)}
        for name in sorted(needed_files):
            part = load_file(path, meta, name)
            state.update({k: v for k, v in part["model"].items() if k in wanted})
            optim_state.update({k: v for k, v in part["optimizer"].items() if k in wanted})
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[:3]}")
        return shared, {k: state[k] for k in wanted}, optim_state

    # ------------------------------------------------------------------ warm start

    def find_init(self) -> Path | None:
        """The verified checkpoint ``checkpoint.init_from`` names (None when unset); the same on every rank.

        Raises:
            ValueError: on every rank, naming ``checkpoint.init_from`` -- not a checkpoint, or damaged.
        """
        source = self.cfg.checkpoint.init_from
        if not source:
            return None
        choice = None
        if self.env.is_main:
            try:
                path = resolve_source(source)
                verify(path)
                choice = ("ok", str(path))
            except ValueError as exc:
                choice = ("error", f"config key 'checkpoint.init_from' = {source!r}: {exc}")
        status, value = self.env.broadcast_object(choice)
        if status == "error":
            raise ValueError(value)
        return Path(value)

    def warm_start(self, path: Path, model: torch.nn.Module, engine: Any) -> TrainState:
        """Start a *new* run from another run's checkpoint: weights (router keys included),
        and with ``checkpoint.init_optimizer`` the optimizer moments; position 0.

        Why not ``load``: a resume continues the run that wrote the checkpoint (its MLflow
        run, schedule position, RNG streams, data position); a warm start keeps none of that.
        The LR schedule starts from step 0 of this run's config, RNG streams are this run's
        seeds, and ``run_id`` stays None (a new MLflow run). Any layout can be read (experts
        are stored by global id). K-means key init is skipped when the source had run it:
        the loaded keys are trained ones and would otherwise be overwritten.

        Raises:
            ValueError: an incompatible model, or ``checkpoint.init_optimizer`` with optimizer
                state that does not map by parameter name (ZeRO-1/2 or bf16 source or target).
        """
        meta = read_meta(path)
        self.check_compatible(meta, path)
        with_optimizer = self.cfg.checkpoint.init_optimizer
        if with_optimizer and not (meta["portable_optimizer"] and self.portable_optimizer):
            raise ValueError(
                f"config key 'checkpoint.init_optimizer' = True: checkpoint {path} (ZeRO stage {meta['zero_stage']}, "
                f"portable optimizer state: {meta['portable_optimizer']}) and this run (ZeRO stage "
                f"{self.cfg.dist.zero_stage}, portable: {self.portable_optimizer}) must both keep optimizer state by "
                "parameter name (dist.zero_stage=0 in fp32); set checkpoint.init_optimizer=false to take the weights only")
        _, state, optim_state = self._read_hosted(path, meta, model)
        model.load_state_dict(state)
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO-1/2, bf16: master copies would undo the load at the first step
            refresh()
        if with_optimizer:
            self._load_named_optimizer_state(model, engine.optimizer, optim_state)
        source_state = load_file(path, meta, rank_file(0))["state"]
        self.init_source = {"path": str(path), "step": int(meta["global_step"]),
                            "run_id": meta.get("mlflow_run_id") or "", "optimizer": with_optimizer}
        log.info("warm start from %s (step %d of run %s; optimizer state %s)", path, meta["global_step"],
                 meta.get("mlflow_run_id"), "loaded" if with_optimizer else "fresh")
        return TrainState(keys_initialised=bool(source_state.get("keys_initialised", False)))

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
