"""The training loop. It receives built objects and owns none of their construction.

``Trainer(cfg, env, model, engine, data, tracker, checkpointer, run=...)``:
  * ``model`` is the expert-parallelised ``PCENet`` inside ``engine`` (a DeepSpeed engine);
  * ``data`` builds per-epoch loaders (``DataSource``);
  * ``tracker`` logs metrics on rank 0; ``checkpointer`` (optional) is handed what it saves
    (model, engine, state, loader statistics) and reaches into nothing;
  * ``run`` is the ``ResolvedRun`` (precision, schedule) derived once for this rank.
Nothing it is given calls back into it. Collectives go through ``env`` (``DistEnv``); the
router keys' updates through ``keys.KeyUpdater``; BatchNorm statistics through
``distributed.norm_stats``.

Synchronisation discipline: the hot path (forward, backward, step) keeps every running
sum on the device. Host syncs happen only at ``train.log_every_steps`` (one all-reduce of
a small vector, then one ``.tolist()``), at evaluation, and inside the expert dispatch
(per-expert counts, see ``pce_dist.model.dispatch``). Every rank runs exactly
``len(loader)`` micro-steps per epoch, so collectives always pair up.

Phase 1 (epoch < ``train.phase2_epoch``): keys are detached in the forward and moved by
the EMA; phase 2 trains them (``pce_dist.keys``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import evaluation
from . import metrics as names
from .config import RunConfig
from .distributed import norm_stats
from .distributed.env import DistEnv
from .distributed.expert_parallel import take_dispatch_stats
from .grad_norm import GradClipper
from .keyinit import init_keys
from .keys import KeyUpdater
from .model.losses import pce_loss
from .model.net import PCENet
from .resolved import ResolvedRun, resolve_run
from .state import TrainState

log = logging.getLogger(__name__)


class DataSource(Protocol):
    def train_loader(self, epoch: int, start_step: int): ...
    def eval_loader(self, split: str): ...
    def steps_per_epoch(self) -> int: ...


class Trainer:
    """Runs ``fit()``: key init, epochs of training with EMA/trainable keys, evaluations,
    checkpoints at the configured boundaries, and an agreed stop on every rank at once."""

    PLOT_IMAGES = 8  # test images drawn in the routing maps

    def __init__(self, cfg: RunConfig, env: DistEnv, model: PCENet, engine: Any, data: DataSource,
                 tracker: Any, checkpointer: Any = None, state: TrainState | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, str], None] | None = None, run: ResolvedRun | None = None,
                 log_window: dict | None = None) -> None:
        """Args:
            state: where to continue (a checkpoint's ``TrainState``); a fresh run by default.
            should_stop: this rank's view of a stop request (``pce_dist.stop``); the ranks
                agree on it at every log interval, checkpoint and leave ``fit`` with
                ``self.stopped`` set on every rank alike.
            on_progress: ``(global_step, phase)`` at every optimizer step and phase change
                (the heartbeat: an attribute store, no I/O).
            run: the resolved run (``pce_dist.resolved``); derived here from ``data`` when a
                caller (a test) builds the trainer by hand.
            log_window: the unfinished log interval a checkpoint stored (``log_window_state``;
                ``Checkpointer.log_window`` after a same-layout resume): the first interval
                after the resume then covers the same micro-batches, and logs the same values,
                as in the uninterrupted run.
        """
        self.cfg, self.env, self.model, self.engine, self.data = cfg, env, model, engine, data
        self.tracker, self.checkpointer = tracker, checkpointer
        self.state = state or TrainState()
        self.should_stop = should_stop or (lambda: False)
        self.on_progress = on_progress or (lambda step, phase: None)
        self.stopped = False  # set on every rank at once, by the agreed decision
        self.device = env.device
        self.run = run or resolve_run(cfg, env, data.steps_per_epoch())
        self.dtype = self.run.dtype
        self.micro_per_epoch, self.num_epochs, self.total_steps = (self.run.micro_per_epoch, self.run.num_epochs,
                                                                   self.run.total_steps)
        self.keys = KeyUpdater(model, env)
        self.grad_clip = GradClipper(cfg.optim.grad_clip, cfg.dist.zero_stage, env)
        self.history: list[dict] = []  # rank-0 view of every logged train metric row
        self.last_eval: dict[str, float] = {}
        self._fixed = None  # images the routing maps show (see _plot_batch)
        # The open train log interval (None between epochs: a partial interval at an epoch end
        # is dropped, the next epoch starts a new one).
        self._window: names.TrainAccumulator | None = None
        self._resumed_window = None if log_window is None else log_window.get("train")
        # loader counts of this epoch from before a resume (the new loader counts from its start_step)
        carried = (log_window or {}).get("data") or {}
        self._data_carry_epoch, self._data_carry = carried.get("epoch"), dict(carried.get("counts") or {})
        if log_window is not None:
            _restore_traffic(model, log_window.get("traffic"))

    # ------------------------------------------------------------------ helpers

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.env.all_reduce(t)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        return x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True)

    def in_phase2(self, epoch: int) -> bool:
        return epoch >= self.cfg.train.phase2_epoch

    # ------------------------------------------------------------------ key init

    def init_keys(self) -> list[dict]:
        """Sample embeddings on every rank, k-means on rank 0, broadcast: layer by layer."""
        t = self.cfg.train
        loader = self.data.train_loader(0, 0)
        batches = []
        for x, _ in loader:
            batches.append(x.to(self.device, self.dtype))
            if len(batches) == t.key_init_batches:
                break
        world = self.env.world_size

        def gather(emb: torch.Tensor):  # collectives run on the comm device (CUDA for nccl)
            if world == 1:
                return emb
            parts = self.env.all_gather(emb.to(self.device))  # same sizes on every rank: same batches
            return torch.cat(parts).cpu() if self.env.is_main else None

        def broadcast(t: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
            if world == 1:
                return t
            buf = t.to(self.device) if t is not None else torch.empty(shape, device=self.device)
            return self.env.broadcast(buf, src=0).cpu()

        start = time.perf_counter()
        records = init_keys(self.model, batches, max_samples=t.key_init_samples // world, niter=t.kmeans_iters,
                            max_points_per_centroid=t.kmeans_max_points_per_centroid, seed=t.seed, method=t.key_init, gather=gather, broadcast=broadcast)
        seconds = time.perf_counter() - start
        self.keys.sync_master()
        self.state.keys_initialised = True
        self.tracker.log_metrics(names.keyinit_metrics(seconds, records), step=self.state.global_step)
        if self.env.is_main:
            log.info("key init took %.2f s: %s", seconds, records)
        return records

    # ------------------------------------------------------------------ training

    def fit(self) -> dict[str, float]:
        """Train to the end of the schedule, or until a stop is agreed (``self.stopped``).

        Returns the metrics of the last evaluation of the validation (else eval) split.
        """
        if not self.state.keys_initialised and self.model.routers():
            self.on_progress(self.state.global_step, "key init")
            self.init_keys()
        while self.state.epoch < self.num_epochs and self.state.global_step < self.total_steps:
            self.on_progress(self.state.global_step, f"epoch {self.state.epoch}")
            stopped = self.train_epoch(self.state.epoch)
            if stopped:
                self.stopped = True
                self._finish_saves()
                return self.last_eval
            self._report_data(self.state.epoch)
            self.on_progress(self.state.global_step, "evaluation")
            if (self.state.epoch + 1) % self.cfg.train.eval_every_epochs == 0 or \
                    self.state.epoch + 1 == self.num_epochs or self.state.global_step >= self.total_steps:
                self.evaluate(self.cfg.data.val_split or self.cfg.data.eval_split)
            if self.state.micro_step >= self.micro_per_epoch:  # a whole epoch, not a max_steps cut
                self.state.epoch += 1
                self.state.micro_step = 0
                if self.checkpointer is not None:
                    self.save_checkpoint("epoch")
        if self.checkpointer is not None and self.checkpointer.saved_step != self.state.global_step:
            self.save_checkpoint("final")  # training ended by train.max_steps mid-epoch
        if not self.last_eval:  # resumed from a finished run: nothing to train, still report
            self.evaluate(self.cfg.data.val_split or self.cfg.data.eval_split)
        self._finish_saves()
        return self.last_eval

    def _finish_saves(self) -> None:
        """When ``fit`` returns, every checkpoint it started is published (or has failed loudly)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def _new_accumulators(self) -> names.TrainAccumulator:
        return names.TrainAccumulator.zeros(len(self.model.routers()), self.cfg.model.num_experts, self.device)

    def _first_accumulators(self) -> names.TrainAccumulator:
        """The interval a resume brought back (once), else a new one."""
        stored, self._resumed_window = self._resumed_window, None
        if stored is None:
            return self._new_accumulators()
        acc = names.TrainAccumulator.from_state(stored, self.device)
        if (acc.num_layers, acc.num_experts) != (len(self.model.routers()), self.cfg.model.num_experts):
            log.warning("the checkpoint's log interval has %d layers x %d experts, the model %d x %d; starting a new "
                        "interval", acc.num_layers, acc.num_experts, len(self.model.routers()),
                        self.cfg.model.num_experts)
            return self._new_accumulators()
        return acc

    def log_window_state(self) -> dict:
        """What a checkpoint must hold to continue the logged history exactly: this rank's
        sums of the open train log interval (or None between epochs) and the all-to-all
        traffic counters since the last log (they are reset at log time, not per interval,
        so they also carry evaluation traffic into the next interval, as without a kill)."""
        stats = self._data_stats()
        return {"train": self._window.state_dict() if self._window is not None else None,
                "traffic": _traffic_state(self.model),
                "data": {"epoch": stats.get("epoch"), "counts": {k: int(stats[k]) for k in self.PER_BATCH_COUNTS
                                                                 if k in stats}}}

    # Loader counts that grow with every batch the loader yields, so this epoch's total after a
    # resume is what the earlier processes counted plus what this loader counts. The rest of the
    # loader's accounting is either replayed by a resumed loader anyway (shards opened/failed:
    # it walks the epoch's whole shard list) or describes the resume itself (start_step,
    # samples_resumed_over) and is logged as it is (docs/checkpoints.md).
    PER_BATCH_COUNTS = ("batches", "samples_seen", "samples_skipped", "samples_padded")

    def _data_stats(self) -> dict:
        """This rank's loader accounting for the current epoch, including what earlier processes
        of this run counted in it before a resume."""
        stats = dict(getattr(self.data, "stats", lambda: {})())
        if self._data_carry and stats.get("epoch") == self._data_carry_epoch:
            for key, value in self._data_carry.items():
                if key in stats:
                    stats[key] += value
        return stats

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from ``state.micro_step``; returns True when asked to stop early."""
        cfg, engine = self.cfg, self.engine
        self.keys.start_epoch(self.in_phase2(epoch))
        engine.train()
        loader = self.data.train_loader(epoch, self.state.micro_step)
        self._window = acc = self._first_accumulators()
        bar = self._progress(epoch)
        for x, y in loader:
            if self.state.micro_step >= self.micro_per_epoch:
                break  # the tail that does not fill a whole accumulation window
            x, y = self._to_device(x, y)
            out = engine(x)
            losses = pce_loss(out, y, cfg.model)
            engine.backward(losses.total)
            self.keys.accumulate(out.routes)
            boundary = engine.is_gradient_accumulation_boundary()
            grad_norm = self.grad_clip.step(engine)  # at the boundary: clipped by the global norm, returned
            with torch.no_grad():
                acc.add(loss=losses.total, ce=losses.ce, confidence=losses.confidence, collapse=losses.collapse,
                        correct=(out.logits_BK.argmax(1) == y).sum(), selected_NE=[r.selected_NE for r in out.routes],
                        samples=y.shape[0])
                if grad_norm is not None:
                    acc.add_grad_norm(grad_norm)
            self.state.micro_step += 1
            self.state.samples_seen += y.shape[0]
            if bar is not None:
                bar.update(1)
            if boundary:
                self.keys.after_optimizer_step()
                self.state.global_step += 1
                self.on_progress(self.state.global_step, "train")
                if self.state.global_step % cfg.train.log_every_steps == 0:
                    self._log_train(acc, bar)
                    self._window = acc = self._new_accumulators()
                stop = False
                if self.state.global_step % cfg.train.log_every_steps == 0:  # agree on a stop request
                    stop = self.env.all_reduce_flag(self.should_stop())
                if self.checkpointer is not None and (stop or self._checkpoint_due()):
                    self.save_checkpoint("signal" if stop else "step")
                if stop:
                    if bar is not None:
                        bar.close()
                    return True
                if self.state.global_step >= self.total_steps:
                    break
        if bar is not None:
            bar.close()
        self._window = None  # the uninterrupted run drops a partial interval here too
        return False

    DATA_COUNTS = ("samples_skipped", "samples_padded", "shards_failed")

    def _report_data(self, epoch: int) -> None:
        """Damaged data tolerated under ``data.max_skipped_fraction``: one all-reduce per epoch,
        a warning on rank 0's console and ``data/*`` metrics -- never only a per-rank log."""
        stats = self._data_stats()
        counts = torch.tensor([float(stats.get(k, 0)) for k in self.DATA_COUNTS], device=self.device)
        totals = dict(zip(self.DATA_COUNTS, self._all_reduce(counts).tolist()))
        if not any(totals.values()):
            return
        self.tracker.log_metrics(names.data_metrics(totals), step=self.state.global_step)
        if self.env.is_main:
            log.warning("data: epoch %d: %d samples skipped, %d padded with repeats, %d shards failed over all "
                        "ranks (tolerated by data.max_skipped_fraction=%g; the rank logs name the shards)", epoch,
                        totals["samples_skipped"], totals["samples_padded"], totals["shards_failed"],
                        self.cfg.data.max_skipped_fraction)

    def save_checkpoint(self, reason: str = "step") -> Path:
        """Hand the checkpointer what it stores; every rank calls this at a step boundary."""
        stats = getattr(self.data, "stats", lambda: {})()
        return self.checkpointer.save(self.model, self.engine, self.state, loader_stats=stats, reason=reason,
                                      log_window=self.log_window_state())

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.state.global_step % every == 0

    def _progress(self, epoch: int):
        if not self.env.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.micro_per_epoch, initial=self.state.micro_step, desc=f"epoch {epoch}",
                    unit="batch", dynamic_ncols=True, leave=True)

    def _log_train(self, acc: names.TrainAccumulator, bar) -> None:
        interval = acc.reduce(self._all_reduce, self.env.world_size)  # one all-reduce, one host sync
        traffic, work_L3 = take_dispatch_stats(self.model, self.device)
        metrics = names.train_metrics(interval, lr=self.engine.get_lr()[0], epoch=self.state.epoch,
                                      phase=2 if self.in_phase2(self.state.epoch) else 1,
                                      grad_accum=self.cfg.train.grad_accum, traffic=traffic)
        metrics.update(self._dispatch_metrics(work_L3, max(1, interval.micro_steps // self.cfg.train.grad_accum)))
        self.tracker.log_metrics(metrics, step=self.state.global_step)
        if self.env.is_main:
            self.history.append({"step": self.state.global_step, **metrics})
            if bar is not None:
                bar.set_postfix(loss=f"{interval.loss:.3f}", acc=f"{interval.accuracy:.3f}",
                                img_s=f"{metrics[names.PERF_IMG_PER_S]:.0f}", refresh=False)

    def _dispatch_metrics(self, work_L3: torch.Tensor, steps: int) -> dict[str, float]:
        """Every rank's expert work per layer and the drops: one all-reduce (each rank writes
        its own row of a ``[world, L]`` table) and one host copy, at log intervals only."""
        world, num_layers = self.env.world_size, work_L3.shape[0]
        if not num_layers:
            return {}
        table = torch.zeros(world + 2, num_layers, device=work_L3.device)
        table[self.env.rank] = work_L3[:, 0]
        table[world:] = work_L3[:, 1:].t()
        rows = self._all_reduce(table).tolist()
        return names.dispatch_metrics(rows[:world], rows[world], rows[world + 1], steps)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Whole split, each sample once across ranks; one all-reduce of the sums; plots."""
        model, cfg = self.model, self.cfg
        norm_stats.average(model, self.env)  # evaluate one model; training never reads these buffers
        was_training = model.training
        self.engine.eval()
        sums = evaluation.accumulate(
            self.engine, self.data.eval_loader(split), device=self.device, dtype=self.dtype,
            num_layers=len(model.routers()), num_experts=cfg.model.num_experts, num_classes=cfg.model.num_classes,
            num_patches=model.patches_per_image())
        prefix = names.eval_prefix(split, cfg.data.eval_split)
        metrics = names.eval_metrics(sums.reduce(self._all_reduce), prefix=prefix, split=split,
                                     collapse_usage=cfg.model.collapse_usage)
        data_stats = self._data_stats()
        if data_stats:
            keys = sorted(data_stats)
            totals = self._all_reduce(torch.tensor([float(data_stats[k]) for k in keys], device=self.device))
            metrics.update(names.data_metrics(dict(zip(keys, totals.tolist()))))
        self.tracker.log_metrics(metrics, step=self.state.global_step)
        if self.env.is_main:
            epochs_done = self.state.epoch + (1 if self.state.micro_step else 0)  # mid- or end-of-epoch
            log.info("%s at epoch %d/%d (step %d): accuracy %.4f, loss %.4f", split, epochs_done,
                     self.num_epochs, self.state.global_step, metrics[names.split_metric(prefix, "accuracy")],
                     metrics[names.split_metric(prefix, "loss")])
        self._plots(split, sums.cm_KK, metrics, prefix)
        self.last_eval = metrics
        model.train(was_training)
        return metrics

    def _plot_batch(self, split: str):
        """Rank-local fixed images (the first eval batch), the same at every evaluation."""
        if self._fixed is None:
            x, y, _ = next(iter(self.data.eval_loader(split)))
            n = min(self.PLOT_IMAGES, x.shape[0])
            self._fixed = self._to_device(x[:n], y[:n])
        return self._fixed

    def _plots(self, split: str, cm_KK: torch.Tensor, metrics: dict[str, float], prefix: str) -> None:
        """Routing maps, usage over time, thresholds, confusion matrix -> MLflow artifacts.

        Every rank runs the forward on its fixed images (it contains all-to-all collectives);
        only rank 0 draws. A plotting failure is logged, never raised into training.
        """
        run_dir = getattr(self.tracker, "run_dir", None)
        if run_dir is None:
            return
        x, y = self._plot_batch(split)
        out = self.engine(x)
        if not self.env.is_main:
            return
        from . import plots

        step_dir = Path(run_dir) / "plots" / f"step{self.state.global_step:07d}"
        try:
            step_dir.mkdir(parents=True, exist_ok=True)
            class_names = getattr(self.data, "class_names", None)
            plots.confusion_matrix(cm_KK.cpu(), step_dir / "confusion_matrix.png", class_names=class_names)
            if out.routes:
                layers = self.model.pce_layers()
                plots.routing_maps(x.float().cpu(), [(r.weights_NE.float().cpu(), layer.extractor.grid_h,
                                                      layer.extractor.grid_w) for r, layer in zip(out.routes, layers)],
                                   step_dir / "routing_maps.png", class_names=class_names, labels=y.tolist(),
                                   predictions=out.logits_BK.argmax(1).tolist(), input_pad=self.cfg.model.input_pad,
                                   layer_captions=[names.specialisation_caption(metrics, prefix, i)
                                                   for i in range(len(out.routes))])
                plots.threshold_histogram([r.threshold_N.float().cpu() for r in out.routes],
                                          step_dir / "thresholds.png")
                steps_T, usage_TLE = names.usage_over_time(self.history, len(out.routes), self.cfg.model.num_experts)
                plots.expert_usage_over_time(steps_T, usage_TLE, step_dir / "expert_usage.png")
            self.tracker.log_artifact(step_dir, artifact_path=f"plots/{step_dir.name}")
        except Exception as exc:  # noqa: BLE001 -- pictures must never stop a run
            log.warning("plotting at step %d failed: %s", self.state.global_step, exc)


def _traffic_state(model: PCENet) -> list[dict[str, int] | None]:
    """Per PCE layer, its dispatcher's traffic counters since the last log (None: no counters)."""
    out: list[dict[str, int] | None] = []
    for layer in model.pce_layers():
        stats = getattr(layer.dispatcher, "stats", None)
        out.append(None if stats is None else {k: int(v) for k, v in vars(stats).items()})
    return out


def _restore_traffic(model: PCENet, state: list | None) -> None:
    """Put stored counters back (``_traffic_state``); a layer whose entry does not fit is left alone."""
    if not state:
        return
    for layer, saved in zip(model.pce_layers(), state):
        stats = getattr(layer.dispatcher, "stats", None)
        if stats is not None and saved:
            for key, value in saved.items():
                if hasattr(stats, key):
                    setattr(stats, key, int(value))
