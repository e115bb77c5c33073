"""The training loop. It receives built objects and owns none of their construction.

``Trainer(cfg, env, model, engine, data, tracker, checkpointer)``:
  * ``model`` is the expert-parallelised ``PCENet`` inside ``engine`` (a DeepSpeed engine);
  * ``data`` builds per-epoch loaders (``DataSource``);
  * ``tracker`` logs metrics on rank 0; ``checkpointer`` (optional) saves and restores.

Synchronisation discipline: the hot path (forward, backward, step) keeps every running
sum on the device. Host syncs happen only at ``train.log_every_steps`` (one all-reduce of
a small vector, then one ``.tolist()``), at evaluation, and inside the expert dispatch
(per-expert counts, see ``pce_dist.model.dispatch``). Every rank runs exactly
``len(loader)`` micro-steps per epoch, so collectives always pair up.

Phase 1 (epoch < ``train.phase2_epoch``): keys are detached in the forward and moved by
the EMA. The statistics of every micro-batch of an optimizer step are summed locally,
then all-reduced over the data-parallel group once per optimizer step and applied once --
so every rank holds bit-identical keys and gradient accumulation does not double count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from . import evaluation
from .config import RunConfig
from .distributed.env import DistEnv
from .distributed.expert_parallel import traffic_stats
from .engine import resolve_precision, sync_master_weights
from .keyinit import init_keys
from .model.losses import pce_loss
from .model.net import PCENet, is_expert_name

log = logging.getLogger(__name__)


class DataSource(Protocol):
    def train_loader(self, epoch: int, start_step: int): ...
    def eval_loader(self, split: str): ...
    def steps_per_epoch(self) -> int: ...


def schedule_length(cfg: RunConfig, batches_per_epoch: int) -> tuple[int, int, int]:
    """``(micro-batches per epoch, epochs, optimizer steps)`` -- the one place this is derived.

    An epoch uses the largest multiple of ``train.grad_accum`` batches; ``train.max_steps``
    (optimizer steps) overrides ``train.epochs`` when set.
    """
    accum = cfg.train.grad_accum
    micro_per_epoch = batches_per_epoch // accum * accum
    if micro_per_epoch < 1:
        raise ValueError(f"an epoch has {batches_per_epoch} batches per rank, fewer than "
                         f"train.grad_accum={accum}; lower data.batch_size or train.grad_accum")
    steps_per_epoch = micro_per_epoch // accum
    if cfg.train.max_steps > 0:
        return micro_per_epoch, math.ceil(cfg.train.max_steps / steps_per_epoch), cfg.train.max_steps
    return micro_per_epoch, cfg.train.epochs, cfg.train.epochs * steps_per_epoch


@dataclass
class TrainState:
    """Where training is; saved in checkpoints. ``micro_step`` counts batches of ``epoch``."""

    epoch: int = 0
    micro_step: int = 0
    global_step: int = 0  # optimizer steps
    samples_seen: int = 0  # on this rank
    keys_initialised: bool = False


class Trainer:
    PLOT_IMAGES = 8  # test images drawn in the routing maps

    def __init__(self, cfg: RunConfig, env: DistEnv, model: PCENet, engine: Any, data: DataSource,
                 tracker: Any, checkpointer: Any = None, state: TrainState | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_progress: Callable[[int, str], None] | None = None) -> None:
        """Args:
            should_stop: this rank's view of a stop request (``pce_dist.stop``); the ranks
                agree on it at every log interval, checkpoint and leave ``fit`` with
                ``self.stopped`` set on every rank alike.
            on_progress: ``(global_step, phase)`` at every optimizer step and phase change
                (the heartbeat: an attribute store, no I/O).
        """
        self.cfg, self.env, self.model, self.engine, self.data = cfg, env, model, engine, data
        self.tracker, self.checkpointer = tracker, checkpointer
        self.state = state or TrainState()
        self.should_stop = should_stop or (lambda: False)
        self.on_progress = on_progress or (lambda step, phase: None)
        self.stopped = False  # set on every rank at once, by the agreed decision
        self.device = env.device
        self.dtype = torch.bfloat16 if resolve_precision(cfg, env) == "bf16" else torch.float32
        self.micro_per_epoch, self.num_epochs, self.total_steps = schedule_length(cfg, data.steps_per_epoch())
        self.history: list[dict] = []  # rank-0 view of every logged train metric row
        self.last_eval: dict[str, float] = {}
        self._fixed = None  # images the routing maps show (see _plot_batch)

    # ------------------------------------------------------------------ helpers

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.world_size > 1:
            dist.all_reduce(t, group=self.env.dp_group)
        return t

    @torch.no_grad()
    def sync_norm_statistics(self) -> dict[str, torch.Tensor]:
        """Average BatchNorm running statistics over the ranks that hold the same module.

        In training mode BatchNorm normalises with batch statistics, but each rank updates
        its *running* statistics from its own micro-batches only, so the replicas drift
        apart. Evaluation and checkpoints must see one model: shared buffers are averaged
        over the data-parallel group, expert buffers over the expert-data-parallel group
        (the ranks hosting the same experts). Training itself never reads these buffers, so
        losses are unchanged. Two all-reduces (flattened), at evaluations and checkpoints.

        Returns this rank's own statistics from before the averaging (copies): a checkpoint
        writes the averaged model, then puts these back (``restore_norm_statistics``) and
        stores them per rank, so a save changes nothing the run computes later -- an
        evaluation after a resume equals the uninterrupted run's bit for bit, not to rounding.
        """
        if self.env.world_size == 1:
            return {}
        shared, experts, own = [], [], {}
        for name, buf in self.model.named_buffers():
            if buf.is_floating_point():  # running_mean / running_var; the step counters agree
                (experts if is_expert_name(name) else shared).append(buf)
                own[name] = buf.detach().clone()
        for bufs, group, size in ((shared, self.env.dp_group, self.env.world_size),
                                  (experts, self.env.edp_group, self.env.world_size // self.env.ep_size)):
            if not bufs or size == 1:
                continue
            flat = torch.cat([b.reshape(-1).float() for b in bufs])
            dist.all_reduce(flat, group=group)
            flat /= size
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        return own

    @torch.no_grad()
    def restore_norm_statistics(self, own: dict[str, torch.Tensor]) -> None:
        """Put back statistics returned by ``sync_norm_statistics`` (or loaded from a checkpoint)."""
        if not own:
            return
        buffers = dict(self.model.named_buffers())
        for name, value in own.items():
            buffers[name].copy_(value)

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
            emb = emb.to(self.device).contiguous()
            parts = [torch.empty_like(emb) for _ in range(world)]
            dist.all_gather(parts, emb)  # same sizes on every rank: same batches
            return torch.cat(parts).cpu() if self.env.is_main else None

        def broadcast(keys: torch.Tensor | None) -> torch.Tensor:
            if world == 1:
                return keys
            router = self.model.routers()[0]
            buf = keys.to(self.device) if keys is not None else torch.empty(
                router.num_experts, router.embed_dim, device=self.device)
            dist.broadcast(buf, src=0)
            return buf.cpu()

        start = time.perf_counter()
        records = init_keys(self.model, batches, max_samples=t.key_init_samples // world, niter=t.kmeans_iters,
                            max_points_per_centroid=t.kmeans_max_points_per_centroid, seed=t.seed, method=t.key_init, gather=gather, broadcast=broadcast)
        seconds = time.perf_counter() - start
        self._sync_keys()
        self.state.keys_initialised = True
        metrics = {"keyinit/seconds_total": seconds}
        for r in records:
            if "objective" in r:
                metrics[f"keyinit/layer{r['layer']}/objective"] = r["objective"]
                metrics[f"keyinit/layer{r['layer']}/kmeans_seconds"] = r["seconds"]
        self.tracker.log_metrics(metrics, step=self.state.global_step)
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
                    self.checkpointer.save(self, reason="epoch")
        if self.checkpointer is not None and self.checkpointer.saved_step != self.state.global_step:
            self.checkpointer.save(self, reason="final")  # training ended by train.max_steps mid-epoch
        if not self.last_eval:  # resumed from a finished run: nothing to train, still report
            self.evaluate(self.cfg.data.val_split or self.cfg.data.eval_split)
        return self.last_eval

    def _new_accumulators(self) -> dict[str, torch.Tensor]:
        num_layers = len(self.model.routers())
        num_experts = self.cfg.model.num_experts
        return {"sums": torch.zeros(6, device=self.device),  # loss, ce, confidence, collapse, correct, count
                "usage": torch.zeros(num_layers, num_experts, device=self.device),
                "micro": 0, "time": time.perf_counter()}

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from ``state.micro_step``; returns True when asked to stop early."""
        cfg, model, engine = self.cfg, self.model, self.engine
        phase2 = self.in_phase2(epoch)
        model.set_keys_trainable(phase2)
        engine.train()
        loader = self.data.train_loader(epoch, self.state.micro_step)
        ema_acc = None
        acc = self._new_accumulators()
        bar = self._progress(epoch)
        for x, y in loader:
            if self.state.micro_step >= self.micro_per_epoch:
                break  # the tail that does not fill a whole accumulation window
            x, y = self._to_device(x, y)
            out = engine(x)
            losses = pce_loss(out, y, cfg.model)
            engine.backward(losses.total)
            if not phase2 and out.routes:
                stats = [torch.cat([r.sum_wemb_ED.float().flatten(), r.sum_w_E.float()]) for r in out.routes]
                ema_acc = stats if ema_acc is None else [a + s for a, s in zip(ema_acc, stats)]
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            with torch.no_grad():
                acc["sums"] += torch.stack([losses.total.detach().float(), losses.ce.detach().float(),
                                            losses.confidence.detach().float(), losses.collapse.detach().float(),
                                            (out.logits_BK.argmax(1) == y).sum().float(),
                                            torch.tensor(float(y.shape[0]), device=self.device)])
                for layer, r in enumerate(out.routes):
                    acc["usage"][layer] += r.selected_NE.float().mean(0)
            acc["micro"] += 1
            self.state.micro_step += 1
            self.state.samples_seen += y.shape[0]
            if bar is not None:
                bar.update(1)
            if boundary:
                if ema_acc is not None:
                    self._apply_ema(ema_acc)
                    ema_acc = None
                if phase2:
                    model.normalize_keys()  # trained keys are projected back onto the unit sphere
                self._sync_keys()
                self.state.global_step += 1
                self.on_progress(self.state.global_step, "train")
                if self.state.global_step % cfg.train.log_every_steps == 0:
                    self._log_train(acc, bar)
                    acc = self._new_accumulators()
                stop = False
                if self.state.global_step % cfg.train.log_every_steps == 0:  # agree on a stop request
                    stop = self.env.all_reduce_flag(self.should_stop())
                if self.checkpointer is not None and (stop or self._checkpoint_due()):
                    self.checkpointer.save(self, reason="signal" if stop else "step")
                if stop:
                    if bar is not None:
                        bar.close()
                    return True
                if self.state.global_step >= self.total_steps:
                    break
        if bar is not None:
            bar.close()
        return False

    DATA_COUNTS = ("samples_skipped", "samples_padded", "shards_failed")

    def _report_data(self, epoch: int) -> None:
        """Damaged data tolerated under ``data.max_skipped_fraction``: one all-reduce per epoch,
        a warning on rank 0's console and ``data/*`` metrics -- never only a per-rank log."""
        stats = getattr(self.data, "stats", lambda: {})()
        counts = torch.tensor([float(stats.get(k, 0)) for k in self.DATA_COUNTS], device=self.device)
        totals = dict(zip(self.DATA_COUNTS, self._all_reduce(counts).tolist()))
        if not any(totals.values()):
            return
        self.tracker.log_metrics({f"data/{k}": v for k, v in totals.items()}, step=self.state.global_step)
        if self.env.is_main:
            log.warning("data: epoch %d: %d samples skipped, %d padded with repeats, %d shards failed over all "
                        "ranks (tolerated by data.max_skipped_fraction=%g; the rank logs name the shards)", epoch,
                        totals["samples_skipped"], totals["samples_padded"], totals["shards_failed"],
                        self.cfg.data.max_skipped_fraction)

    def _sync_keys(self) -> None:
        if self.model.routers():
            sync_master_weights([router.keys for router in self.model.routers()])

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.state.global_step % every == 0

    def _apply_ema(self, ema_acc: list[torch.Tensor]) -> None:
        flat = self._all_reduce(torch.cat(ema_acc))
        stats, offset = [], 0
        for router in self.model.routers():
            E, D = router.keys.shape
            sum_wemb = flat[offset:offset + E * D].view(E, D)
            sum_w = flat[offset + E * D:offset + E * D + E]
            offset += E * D + E
            stats.append((sum_wemb, sum_w))
        self.model.update_keys_ema(stats)

    def _progress(self, epoch: int):
        if not self.env.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.micro_per_epoch, initial=self.state.micro_step, desc=f"epoch {epoch}",
                    unit="batch", dynamic_ncols=True, leave=True)

    def _log_train(self, acc: dict, bar) -> None:
        sums = self._all_reduce(acc["sums"].clone())
        usage = self._all_reduce(acc["usage"].clone()) / max(1, acc["micro"] * self.env.world_size)
        loss, ce, conf, collapse, correct, count = sums.tolist()
        micro_all = max(1, acc["micro"] * self.env.world_size)
        elapsed = time.perf_counter() - acc["time"]
        traffic = traffic_stats(self.model)
        metrics = {
            "train/loss": loss / micro_all, "train/ce": ce / micro_all,
            "train/confidence": conf / micro_all, "train/collapse": collapse / micro_all,
            "train/accuracy": correct / max(1.0, count), "train/lr": self.engine.get_lr()[0],
            "train/epoch": self.state.epoch, "train/phase": 2 if self.in_phase2(self.state.epoch) else 1,
            "perf/img_per_s": count / max(elapsed, 1e-9),
            "perf/step_time_s": elapsed / max(1, acc["micro"]) * self.cfg.train.grad_accum,
        }
        steps = max(1, acc["micro"] // self.cfg.train.grad_accum)
        if traffic["routed_bytes"]:
            metrics["comm/routed_bytes_per_step"] = traffic["routed_bytes"] / steps
            metrics["comm/dispatch_bytes_per_step"] = traffic["dispatch_bytes"] / steps
            metrics["comm/return_bytes_per_step"] = traffic["return_bytes"] / steps
        for layer, row in enumerate(usage.tolist()):
            for e, u in enumerate(row):
                metrics[f"router/usage/layer{layer}/expert{e}"] = u
        self.tracker.log_metrics(metrics, step=self.state.global_step)
        if self.env.is_main:
            self.history.append({"step": self.state.global_step, **metrics})
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.3f}",
                                img_s=f"{metrics['perf/img_per_s']:.0f}", refresh=False)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Whole split, each sample once across ranks; one all-reduce of the sums; plots."""
        model, cfg = self.model, self.cfg
        self.sync_norm_statistics()
        was_training = model.training
        self.engine.eval()
        sums, layer_sums, cm_KK = evaluation.accumulate(
            self.engine, self.data.eval_loader(split), device=self.device, dtype=self.dtype,
            num_layers=len(model.routers()), num_experts=cfg.model.num_experts, num_classes=cfg.model.num_classes)
        prefix = "eval" if split == cfg.data.eval_split else split
        metrics = evaluation.metrics(self._all_reduce(sums), self._all_reduce(layer_sums), prefix=prefix, split=split,
                                     collapse_usage=cfg.model.collapse_usage)
        cm_KK = self._all_reduce(cm_KK)
        data_stats = getattr(self.data, "stats", lambda: {})()
        if data_stats:
            keys = sorted(data_stats)
            totals = self._all_reduce(torch.tensor([float(data_stats[k]) for k in keys], device=self.device))
            metrics.update({f"data/{k}": v for k, v in zip(keys, totals.tolist())})
        self.tracker.log_metrics(metrics, step=self.state.global_step)
        if self.env.is_main:
            epochs_done = self.state.epoch + (1 if self.state.micro_step else 0)  # mid- or end-of-epoch
            log.info("%s at epoch %d/%d (step %d): accuracy %.4f, loss %.4f", split, epochs_done,
                     self.num_epochs, self.state.global_step, metrics.get(f"{prefix}/accuracy", float("nan")),
                     metrics.get(f"{prefix}/loss", float("nan")))
        self._plots(split, cm_KK)
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

    def _plots(self, split: str, cm_KK: torch.Tensor) -> None:
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
                                   predictions=out.logits_BK.argmax(1).tolist())
                plots.threshold_histogram([r.threshold_N.float().cpu() for r in out.routes],
                                          step_dir / "thresholds.png")
                plots.expert_usage_over_time(self.history, step_dir / "expert_usage.png")
            self.tracker.log_artifact(step_dir, artifact_path=f"plots/{step_dir.name}")
        except Exception as exc:  # noqa: BLE001 -- pictures must never stop a run
            log.warning("plotting at step %d failed: %s", self.state.global_step, exc)

    def state_dict(self) -> dict:
        return asdict(self.state)
