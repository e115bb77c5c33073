"""Sharded checkpoints: the only module that builds checkpoint paths.

Layout of one checkpoint (a directory under ``<output_dir>/checkpoints/``)::

    step_00000120/
      meta.json          written last by rank 0: step, epoch, world/ep sizes, the redacted
                         config, MLflow run id, the expert -> file index, every file's size
                         and sha256
      shared.pt          rank 0: every non-expert tensor (stem, routers + keys, conv1x1s,
                         head, BN statistics; weights as fp32 masters) and its optimizer
                         state by parameter name, LR schedule
      experts_r{r}.pt    ranks of the first expert-parallel group: the experts they host,
                         by global id (``layers.<l>.experts.<e>.*``), with optimizer state
      rank{r}.pt         every rank: RNG states, data position, samples seen, loader stats,
                         the open log interval (sums, counts, all-to-all traffic counters)
      zero_r{r}.pt       only in format-2 checkpoints of ZeRO-1/2 or bf16 runs: DeepSpeed's
                         partitioned optimizer state of rank r (read, never written now)
    latest               a text file naming the newest complete checkpoint

Every expert is stored exactly once, by global id, and optimizer state is stored per
parameter *name* (full fp32 master weights and moments, whatever ZeRO stage and precision
wrote them: ``optim_state``) -- so a checkpoint can be loaded on any world size,
``ep_size``, ZeRO stage or precision: each rank takes what it now holds. Only a format-2
checkpoint of a ZeRO-1/2 or bf16 run (DeepSpeed's partitioned ``zero_r*.pt``) is tied to
the layout that wrote it; resuming it on another is refused with an explanation.

Atomicity: all ranks write into ``.tmp-step_X``; each rank hashes its files as the bytes
go out (no second read) and hands ``(size, sha256)`` to rank 0 in the all-gather that ends
the write; rank 0 checks that every expected file is there, writes ``meta.json``, renames
the directory into place, then replaces ``latest`` (write + fsync + ``os.replace``). A kill
at any moment leaves the previous checkpoint and ``latest`` intact; stale ``.tmp-*``
directories are removed.

Asynchronous save (``checkpoint.async_save``, the default): the step boundary only copies
the state to host memory; a background thread writes the files and runs the protocol above
on the ``io`` communicator of its own (``DistEnv``), while training goes on. At most one save
is in flight; a failure on any rank is raised on every rank at the next save or at the end
of training (``wait``), and is never published.

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
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from . import compat, optim_state
from .config import ModelConfig, RunConfig, to_dict
from .distributed import norm_stats
from .distributed.env import DistEnv
from .model.net import is_expert_name
from .redact import redact_obj
from .state import TrainState

log = logging.getLogger(__name__)

# 3: optimizer state by parameter name (fp32 masters + moments) for every ZeRO stage and
#    precision; 2: sha256 per file, redacted config, numpy RNG state as a tensor; 1: sizes only
FORMAT_VERSION = 3
# Model keys that change tensor shapes or the function computed: a checkpoint is refused
# when one of these differs from the config.
ARCHITECTURE_KEYS = ("kind", "in_channels", "image_size", "input_pad", "num_classes", "stem_channels", "stem_norm",
                     "channels", "patch_sizes", "downsample", "num_experts", "expert_kernel", "expert_norm",
                     "router_dim", "router_position", "spp_levels", "spp_pool", "head_spp_levels")
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


class CheckpointError(RuntimeError):
    """A save failed; the message names the rank, the file and why, and what ``latest`` still names."""


@dataclass
class _SaveJob:
    """One checkpoint between the step boundary and its publication."""

    name: str
    files: dict  # file name -> (object to torch.save, globals it may need to load)
    state: TrainState
    reason: str
    expert_layers: list[str]


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory and every container rebuilt, so that
    nothing in it changes when training goes on. CUDA tensors go to pinned buffers without
    blocking, then one synchronise: the copy costs one device-to-host transfer, not one per
    tensor."""
    on_device = []

    def copy(x: Any) -> Any:
        if torch.is_tensor(x):
            if x.device.type == "cpu":
                return x.detach().clone()
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            on_device.append(out)
            return out.copy_(x.detach(), non_blocking=True)
        if isinstance(x, dict):
            out = {k: copy(v) for k, v in x.items()}
            return OrderedDict(out) if isinstance(x, OrderedDict) else out  # a state_dict stays one
        if isinstance(x, list):
            return [copy(v) for v in x]
        if isinstance(x, tuple):
            items = [copy(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else tuple(items)  # a namedtuple stays one
        return x

    result = copy(obj)
    if on_device:
        torch.cuda.synchronize()
    return result


class Checkpointer:
    """Saves and restores sharded checkpoints of one run.

    It is handed what it saves (``save(model, engine, state, loader_stats)``) and returns what
    it loads (``load`` -> ``TrainState``); it holds no reference to the trainer and no stop
    flag.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: Path) -> None:
        self.cfg, self.env = cfg, env
        self.root = Path(run_dir) / "checkpoints"
        self.run_id: str | None = None
        self.log_window: dict | None = None  # set by a same-layout ``load`` (see ``save``)
        self.init_source: dict | None = None  # set by ``warm_start``: what the new run started from
        self.last_saved: Path | None = None  # the newest checkpoint published (after ``wait`` when async)
        self.saved_step: int | None = None  # the step of the newest save started
        self.asynchronous = cfg.checkpoint.async_save
        self._pending: threading.Thread | None = None
        self._failure: str | None = None

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
        """Every rank calls this at an optimizer-step boundary; returns the checkpoint dir it
        will publish.

        The state is taken here, at the boundary: with ``checkpoint.async_save`` it is copied
        to host memory and the files are written by a background thread while training goes
        on (the copy is what makes that safe: the live tensors change at the next step); else
        the write happens before this returns. Either way at most one save is in flight: a
        save first waits for the previous one (``wait``), which also raises its failure.

        Args:
            model: the expert-parallel model (this rank's experts); engine: its DeepSpeed
                engine (optimizer, LR schedule); state: the position to resume at;
            loader_stats: this rank's data accounting, stored for the record.
            log_window: this rank's open log interval (``Trainer.log_window_state``: plain
                tensors, ints, None), handed back as ``self.log_window`` by a same-layout
                ``load`` so the resumed run logs what the uninterrupted one did.
        """
        self.wait()
        env = self.env
        own_norm = norm_stats.average(model, env)  # one model on disk, whichever rank writes a module
        name = f"step_{state.global_step:08d}"
        masters, named_state = optim_state.gather(model, engine.optimizer)  # a collective under ZeRO-1/2, bf16
        model_state = {k: masters.get(k, v) for k, v in model.state_dict().items()}
        files: dict[str, tuple[Any, tuple]] = {}  # file name -> (object, allowed globals)
        if env.is_main:
            shared = {k: v for k, v in model_state.items() if not is_expert_name(k)}
            files[SHARED_FILE] = (
                {"model": shared, "optimizer": {k: v for k, v in named_state.items() if not is_expert_name(k)},
                 "optimizer_groups": self._group_hparams(engine.optimizer),
                 "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None}, ())
        if env.rank < env.ep_size:  # the first expert-parallel group stores each expert once
            experts = {k: v for k, v in model_state.items() if is_expert_name(k)}
            files[experts_file(env.rank)] = (
                {"model": experts, "optimizer": {k: v for k, v in named_state.items() if is_expert_name(k)}}, ())
        files[rank_file(env.rank)] = ({"rng": _rng_state(), "state": asdict(state), "loader": dict(loader_stats or {}),
                                       "norm_buffers": own_norm, "log_window": log_window}, ())
        job = _SaveJob(name=name, files=files, state=replace(state), reason=reason,
                       expert_layers=sorted({k.partition(".experts.")[0] for k in model_state if is_expert_name(k)}))
        self.saved_step = state.global_step
        if self.asynchronous:
            job.files = host_copy(files)
            norm_stats.restore(model, own_norm)  # the live run goes on exactly as without this save
            self._pending = threading.Thread(target=self._run_job, args=(job,), name=f"checkpoint-{name}",
                                             daemon=True)
            self._pending.start()
        else:  # the files hold the live (averaged) statistics until they are written
            try:
                self._run_job(job)
            finally:
                norm_stats.restore(model, own_norm)
            self.wait()
        return self.root / name

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is published; returns the newest checkpoint
        this run published. Every rank calls it at the same point (the end of training, the
        next save), so a failure is raised on every rank at once.

        Raises:
            CheckpointError: the last save failed on some rank (named); ``latest`` still names
                the checkpoint before it.
        """
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise CheckpointError(failure)
        return self.last_saved

    def _run_job(self, job: _SaveJob) -> None:
        """Write one checkpoint (the background thread's work with ``async_save``).

        Only the ``io`` communicator is used here, never the training thread's. Every rank
        reaches every collective whatever fails, so a failure on one rank cannot leave the
        others waiting: it travels in the gathered results and is recorded on every rank."""
        env = self.env
        final, tmp = self.root / job.name, self.root / f".tmp-{job.name}"
        error = None
        if env.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):  # left by a killed save; none in flight now
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as exc:
                error = f"rank 0: cannot create {tmp}: {exc}"
        error = next((e for e in env.all_gather_object(error, group="io") if e), None)
        written: dict[str, tuple[int, str]] = {}
        if error is None:
            try:
                for file, (obj, allow) in job.files.items():
                    written[file] = _atomic_save(obj, tmp / file, allow=allow)
            except Exception as exc:  # noqa: BLE001 -- reported on every rank, never published
                error = f"rank {env.rank}: writing {tmp / file} failed: {type(exc).__name__}: {exc}"
        job.files = {}  # the host copy is no longer needed
        everyone = env.all_gather_object((written, error), group="io")  # also the barrier after every write
        errors = [e for _, e in everyone if e]
        outcome = None
        if env.is_main:
            try:
                if errors:
                    shutil.rmtree(tmp, ignore_errors=True)
                    outcome = "; ".join(errors)
                else:
                    self._finalise(tmp, final, job, {f: entry for w, _ in everyone for f, entry in w.items()})
            except Exception as exc:  # noqa: BLE001
                outcome = f"rank 0: publishing {final} failed: {type(exc).__name__}: {exc}"
        outcome = env.all_gather_object(outcome, group="io")[0]
        if outcome is None:
            self.last_saved = final
        else:
            self._failure = (f"checkpoint {job.name} ({job.reason}) was not saved: {outcome}; "
                             f"latest still names {self.last_saved.name if self.last_saved else 'no checkpoint'}")
            log.error("%s", self._failure)

    def _finalise(self, tmp: Path, final: Path, job: _SaveJob, written: dict[str, tuple[int, str]]) -> None:
        env = self.env
        expected = expected_files(env.world_size, env.ep_size, portable=True)
        missing = [f for f in expected if f not in written or not (tmp / f).is_file()
                   or (tmp / f).stat().st_size != written[f][0]]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} is incomplete, missing or short {missing}; not publishing it")
        num_experts = self.cfg.model.num_experts
        per_rank = num_experts // env.ep_size
        index = {f"{layer}.experts.{e}": experts_file(e // per_rank)
                 for layer in job.expert_layers for e in range(num_experts)}
        state = job.state
        meta = {
            "format": FORMAT_VERSION, "reason": job.reason, "global_step": state.global_step, "epoch": state.epoch,
            "micro_step": state.micro_step, "world_size": env.world_size, "ep_size": env.ep_size,
            "zero_stage": self.cfg.dist.zero_stage, "portable_optimizer": True,
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
        log.info("checkpoint %s saved (%s)", final, job.reason)

    def _prune(self, keep: int, current: str) -> None:
        """Keep the newest ``keep`` up to ``current``. Later ones (left by a run that resumed
        from an older checkpoint) are overwritten when training reaches their step, and do
        not count: they must not push intact checkpoints of this run out."""
        done = sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file() and p.name <= current)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _group_hparams(optimizer: torch.optim.Optimizer) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    # ------------------------------------------------------------------ load

    def check_compatible(self, meta: dict, path: Path) -> None:
        saved, defaults = meta["config"]["model"], ModelConfig()
        for key in ARCHITECTURE_KEYS:
            # a key newer than the checkpoint had its default then (input_pad, router_position)
            was = saved.get(key, getattr(defaults, key))
            if was != getattr(self.cfg.model, key):
                raise ValueError(f"checkpoint {path} was saved with model.{key}={was!r}, but the config "
                                 f"has model.{key}={getattr(self.cfg.model, key)!r}; they are incompatible")

    def load(self, path: Path, model: torch.nn.Module, engine: Any):
        """Restore weights, optimizer, schedule, RNG and position; returns the ``TrainState``.

        Each file is checked against ``meta.json`` as it is read (``find_resume`` has checked
        them all on rank 0 already; this covers a direct call and a file damaged since)."""
        env = self.env
        meta = read_meta(path)
        self.check_compatible(meta, path)
        same_layout = meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
        if not meta["portable_optimizer"]:
            self._check_partitioned_layout(meta, path, engine)
        shared, state, named_state = self._read_hosted(path, meta, model)
        rank_state = load_file(path, meta, rank_file(env.rank if meta["world_size"] == env.world_size else 0))
        model.load_state_dict(state)
        if meta["portable_optimizer"]:
            optim_state.scatter(model, engine.optimizer, state, named_state)
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

    def _check_partitioned_layout(self, meta: dict, path: Path, engine: Any) -> None:
        """A format-2 ``zero_r*.pt`` checkpoint loads only into DeepSpeed's optimizer of the
        same layout: its ``load_state_dict`` takes every rank's partitions as they were."""
        env = self.env
        if not (meta["world_size"] == env.world_size and meta["ep_size"] == env.ep_size
                and meta["zero_stage"] == self.cfg.dist.zero_stage
                and compat.flat_fp32_groups(engine.optimizer) is not None):
            raise ValueError(
                f"checkpoint {path} (format {meta['format']}) holds DeepSpeed-partitioned optimizer state (ZeRO stage "
                f"{meta['zero_stage']}, {meta['world_size']} ranks, ep_size {meta['ep_size']}); it can only resume on "
                f"that exact layout and zero stage (now: {env.world_size} ranks, ep_size {env.ep_size}, ZeRO "
                f"{self.cfg.dist.zero_stage}). Checkpoints written by this version load on any layout.")

    @staticmethod
    def _read_hosted(path: Path, meta: dict, model: torch.nn.Module) -> tuple[dict, dict, dict]:
        """``(shared.pt, model state, named optimizer state)`` of what this rank's ``model``
        holds: the shared tensors and the experts it hosts now, by global id, from
        whichever files hold them (any layout wrote them the same way)."""
        shared = load_file(path, meta, SHARED_FILE)
        wanted = model.state_dict()
        state = dict(shared["model"])
        named = dict(shared["optimizer"])
        needed_files = {meta["expert_files"][_expert_prefix(k)] for k in wanted if is_expert_name(k)}
        for name in sorted(needed_files):
            part = load_file(path, meta, name)
            state.update({k: v for k, v in part["model"].items() if k in wanted})
            named.update({k: v for k, v in part["optimizer"].items() if k in wanted})
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[:3]}")
        return shared, {k: state[k] for k in wanted}, named

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
        if with_optimizer and not meta["portable_optimizer"]:
            raise ValueError(
                f"config key 'checkpoint.init_optimizer' = True: checkpoint {path} (format {meta['format']}, ZeRO stage "
                f"{meta['zero_stage']}) keeps DeepSpeed-partitioned optimizer state, which does not map onto a new "
                "run's parameters; set checkpoint.init_optimizer=false to take the weights only")
        _, state, named_state = self._read_hosted(path, meta, model)
        model.load_state_dict(state)
        # the masters too (ZeRO-1/2, bf16): DeepSpeed's fp32 copies would undo the load at the first step
        optim_state.scatter(model, engine.optimizer, state, named_state if with_optimizer else {})
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
