"""The training entry point: ``main(argv)`` builds every object from the resolved config and
hands them to the ``Trainer``. Both launchers (``launch/local.py``, ``launch/slurm.py``)
call this function in every rank; it reads its rank from the environment via ``DistEnv``.

    python -m pce_dist.train [--config configs/X.yaml] [--output-dir DIR] [key=value ...]

Exit codes: 0 finished, 2 bad config (the key is named, before any collective), 3 stopped
by a signal after a checkpoint (``pce_dist.stop``; the same command resumes), 1 anything
else -- a failed collective names the rank that stopped responding (heartbeats).

Secrets: the config in memory keeps the live values (a tracking URI with a password, a
signed data URL); everything written -- ``config.yaml``, MLflow params, checkpoint
metadata, every log line -- goes through ``pce_dist.redact``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics as names
from . import stop as stop_signals
from .config import RunConfig, load_config, to_dict, to_yaml, validate_world
from .distributed.env import DistEnv
from .distributed.heartbeat import Heartbeat, diagnose, heartbeat_dir
from .redact import install_log_filter, secret_values

log = logging.getLogger("pce_dist")

# Datasets that the pipeline prepares by itself when their shards are missing.
AUTO_PREPARE = {"digits"}


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    ap = argparse.ArgumentParser(prog="pce_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file of overrides (configs/*.yaml)")
    ap.add_argument("--output-dir", default=None, help="run directory (output_dir=...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_experts=8")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return args.config, overrides


def setup_logging(env: DistEnv, cfg: RunConfig | None = None) -> None:
    """Rank 0 at INFO, others at WARNING; every record redacted (``pce_dist.redact``)."""
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {env.rank}] %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_filter(secret_values(to_dict(cfg)) if cfg is not None else set())


def ensure_data(cfg: RunConfig, env: DistEnv) -> None:
    """Prepare the embedded dataset on rank 0 when its manifest is missing; others wait."""
    root = Path(cfg.data.root)
    if "://" in cfg.data.root or cfg.data.root.startswith("pipe:") or (root / "manifest.json").exists():
        return
    name = root.name
    if env.is_main:
        if name not in AUTO_PREPARE:
            raise ValueError(f"config key 'data.root' = {cfg.data.root!r}: no manifest.json there; prepare it with "
                             f"`python data_prep/make_shards.py --source ... --out {cfg.data.root}`")
        from data_prep import prepare

        log.info("preparing %s shards in %s", name, root)
        prepare(name, root, shard_size=128)
    env.barrier()


class ShardData:
    """The trainer's view of the data: per-epoch loaders over the manifest's shards."""

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        from .data import read_manifest

        self.cfg, self.env = cfg, env
        self.manifest = read_manifest(cfg.data.root)
        self.manifest.check_model(in_channels=cfg.model.in_channels, image_size=cfg.model.image_size,
                                  num_classes=cfg.model.num_classes)
        self.class_names = list(self.manifest.class_names)
        self._last = None

    def train_loader(self, epoch: int, start_step: int):
        from .data import build_train_loader

        self._last = build_train_loader(self.cfg.data, rank=self.env.rank, world_size=self.env.world_size,
                                        seed=self.cfg.train.seed, epoch=epoch, start_step=start_step,
                                        manifest=self.manifest)
        return self._last

    def eval_loader(self, split: str):
        from .data import build_eval_loader

        return build_eval_loader(self.cfg.data, split, rank=self.env.rank, world_size=self.env.world_size,
                                 manifest=self.manifest)

    def steps_per_epoch(self) -> int:
        """Batches per rank and epoch (the manifest tells; no loader is built to learn it)."""
        from .data import train_batches_per_epoch

        return train_batches_per_epoch(self.cfg.data, self.manifest, self.env.world_size)

    def stats(self) -> dict[str, int]:
        if self._last is None:
            return {}
        return {k: v for k, v in self._last.stats().items() if k != "rank" and isinstance(v, (int, float))}


def build_model_for(cfg: RunConfig, env: DistEnv):
    from .distributed.expert_parallel import parallelize_experts
    from .model import build_model

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return parallelize_experts(build_model(cfg.model), env)


@dataclass
class RunResult:
    status: str  # "FINISHED", or "STOPPED" when a stop signal ended the run after a checkpoint
    metrics: dict[str, float]
    run_id: str
    checkpoint: str | None  # the newest complete checkpoint


class PeerFailure(RuntimeError):
    """A collective failed because another rank stopped responding; the message names it."""


_COLLECTIVE_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                             "gloo", "nccl", "socket")


def _is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or a RuntimeError whose text says a peer went away."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in _COLLECTIVE_FAILURE_WORDS)


def _explain_collective_failure(exc: BaseException, cfg: RunConfig, env: DistEnv) -> str | None:
    """Who this rank was waiting for, from the heartbeats; ``None`` if nothing points at a rank."""
    if env.world_size == 1 or not _is_collective_failure(exc):
        return None
    return diagnose(heartbeat_dir(cfg.output_dir), env.world_size, 3 * cfg.dist.heartbeat_s, exclude=env.rank)


def run(cfg: RunConfig, env: DistEnv, stop: stop_signals.StopRequest | None = None) -> RunResult:
    """Build everything for ``cfg`` and train.

    A stop request (``pce_dist.stop``: SIGUSR1/SIGUSR2/SIGTERM to any rank) makes all ranks
    agree at the next log interval, write a checkpoint, skip the final evaluation and return
    with status "STOPPED"; a later ``run`` with the same ``output_dir`` resumes from it.
    ``stop`` defaults to the process's ``pce_dist.stop.STOP`` (whose handlers the entry
    point installed first thing).
    """
    stop = stop or stop_signals.STOP
    heartbeat = Heartbeat(heartbeat_dir(cfg.output_dir), env.rank, cfg.dist.heartbeat_s).start()
    try:
        return _run(cfg, env, stop, heartbeat)
    except Exception as exc:
        why = _explain_collective_failure(exc, cfg, env)
        if why is None:
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        log.error("rank %d: a collective failed (%s: %s) because %s", env.rank, type(exc).__name__, first_line, why)
        raise PeerFailure(f"rank {env.rank} gave up waiting: {why}") from exc
    finally:
        heartbeat.close()


def _run(cfg: RunConfig, env: DistEnv, stop: stop_signals.StopRequest, heartbeat: Heartbeat) -> RunResult:
    from .checkpoint import Checkpointer
    from .engine import build_engine
    from .tracking import Tracker
    from .resolved import resolve_run
    from .trainer import Trainer

    run_dir = Path(cfg.output_dir).resolve()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))  # redacted
    ensure_data(cfg, env)
    data = ShardData(cfg, env)
    plan = resolve_run(cfg, env, data.steps_per_epoch())  # precision, schedule, placement: derived once
    checkpointer = Checkpointer(cfg, env, run_dir)
    resume = checkpointer.find_resume()
    # a warm start only when this run has nothing of its own to continue (a preempted warm
    # start must resume itself, not start over from its source)
    init = checkpointer.find_init() if resume is None else None
    if resume is not None and cfg.checkpoint.init_from and env.is_main:
        log.info("checkpoint.init_from is ignored: this run resumes from its own checkpoint %s", resume)
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, plan.total_steps, precision=plan.precision)
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 1)  # per-rank dropout streams (a resume restores them)
    state = None
    if resume:
        state = checkpointer.load(resume, model, engine)
    elif init:
        state = checkpointer.warm_start(init, model, engine)
    tracker = Tracker.start(cfg, env, run_dir, resume_run_id=checkpointer.run_id,
                            init_source=checkpointer.init_source)
    checkpointer.run_id = tracker.run_id
    status = "FAILED"
    try:
        trainer = Trainer(cfg, env, model, engine, data, tracker, checkpointer, state=state,
                          should_stop=lambda: stop.requested, on_progress=heartbeat.beat, run=plan,
                          log_window=checkpointer.log_window)
        metrics = trainer.fit()
        # One decision for every rank: a stop agreed inside fit(), or one that arrived after
        # its last agreement (the final checkpoint is written; the evaluation is skipped).
        stopped = trainer.stopped or env.all_reduce_flag(stop.requested)
        if cfg.data.val_split and not stopped:
            metrics = trainer.evaluate(cfg.data.eval_split)
        status = "STOPPED" if stopped else "FINISHED"
        by = env.all_gather_object(stop.name) if stopped else []
        model_uri = None
        if env.is_main and status == "FINISHED" and cfg.tracking.log_model and checkpointer.last_saved:
            model_uri = log_model(tracker, checkpointer.last_saved, run_dir, data.class_names, cfg.tracking.register_as,
                                  step=trainer.state.global_step)
        if env.is_main:
            acc = metrics.get(names.EVAL_ACCURACY)
            if status == "FINISHED" and acc is not None:
                print(f"\n{cfg.data.eval_split} accuracy: {acc:.4f}", flush=True)
            else:
                who = ", ".join(f"{name} on rank {r}" for r, name in enumerate(by) if name) or "a stop request"
                print(f"\nstopped by {who} at step {trainer.state.global_step} after checkpoint "
                      f"{checkpointer.last_saved}; run the same command to resume", flush=True)
            print(f"MLflow run: {tracker.run_id} ({tracker.tracking_uri})", flush=True)
            if model_uri:
                print(f"MLflow model: {model_uri}", flush=True)
            print(f"checkpoints: {checkpointer.root}", flush=True)
        return RunResult(status=status, metrics=metrics, run_id=tracker.run_id,
                         checkpoint=str(checkpointer.last_saved) if checkpointer.last_saved else None)
    finally:
        # a stopped run is KILLED in MLflow until its continuation resumes it (back to RUNNING)
        tracker.finish({"FINISHED": "FINISHED", "STOPPED": "KILLED"}.get(status, "FAILED"))


def log_model(tracker, checkpoint: Path, run_dir: Path, class_names: list[str], register_as: str, *,
              step: int) -> str | None:
    """Rank 0, a finished run: ``RUN_DIR/model.safetensors`` from the final checkpoint, logged to MLflow.

    The export is the trained model whatever MLflow does; a failed export or upload is a
    warning (``Tracker.log_model``) naming the command that does it later: training has
    finished, and its final checkpoint is written.
    """
    from .export import RUN_EXPORT, export

    try:
        exported = export(checkpoint, run_dir / RUN_EXPORT, class_names=class_names)
    except (OSError, ValueError) as exc:  # a full disk: the run itself has finished and its checkpoint is there
        log.warning("the final model was not exported (%s: %s); export it later with `python -m pce_dist.export "
                    "--mlflow %s`", type(exc).__name__, exc, run_dir)
        return None
    return tracker.log_model(exported, step=step, register_as=register_as)


def main(argv: list[str] | None = None) -> int:
    stop = stop_signals.install()  # first: no stop signal may meet Python's default action
    config_path, overrides = parse_args(argv if argv is not None else sys.argv[1:])
    try:
        cfg = load_config(config_path, overrides)
        env = DistEnv.from_environ(cfg.dist)
        validate_world(cfg, env.world_size)
    except ValueError as exc:
        print(f"pce_dist.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    env.init()
    setup_logging(env, cfg)
    try:
        result = run(cfg, env, stop)
    finally:
        env.destroy()
    return 0 if result.status == "FINISHED" else stop_signals.EXIT_STOPPED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
