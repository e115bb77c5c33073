"""Shared helpers of the multi-process training tests (a plain module, not a test module).

``EXACT`` overrides make every operation per-sample (GroupNorm, no dropout, SGD, no
clipping), so 2 ranks holding half of each global batch compute what one process computes
on the whole batch, up to the order of float32 sums -- see ``test_training.py``.
``InMemoryData`` and the trackers stand in for the WebDataset pipeline and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import torch

EXACT = ["optim.name=sgd", "model.expert_norm=group", "model.stem_norm=group", "model.expert_dropout=0.0", "optim.grad_clip=0",
         "model.image_size=8", "model.stem_channels=8", "model.channels=[8,8]", "model.patch_sizes=[4,2]",
         "model.downsample=[false,false]", "model.num_classes=4", "optim.warmup_steps=0", "optim.lr=0.01",
         "train.log_every_steps=1", "train.key_init=random",  # k-means sees samples in rank order
         "model.collapse_weight=0",  # the collapse count is per rank batch by definition: not comparable
         "model.expert_pad_batches=false"]  # padding changes float summation order with the batch size
GLOBAL_BATCH = 8
# what the checkpoint tests train: 4 experts per layer, keys EMA-updated throughout
CHECKPOINT_BASE = EXACT + ["model.num_experts=4", "train.phase2_epoch=100"]


def checkpointed_run(world: int, run_dir, overrides: list[str], total_steps: int | None = None):
    """``(cfg, env, model, engine, checkpointer)`` of this rank, built as ``pce_dist.train``
    builds them, for ``CHECKPOINT_BASE`` + ``overrides`` (the global batch split over ranks)."""
    from pce_dist.checkpoint import Checkpointer
    from pce_dist.config import load_config
    from pce_dist.distributed import DistEnv
    from pce_dist.engine import build_engine
    from pce_dist.train import build_model_for

    cfg = load_config(None, CHECKPOINT_BASE + [f"data.batch_size={GLOBAL_BATCH // world}", f"output_dir={run_dir}"]
                      + list(overrides))
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=total_steps or cfg.train.max_steps)
    return cfg, env, model, engine, Checkpointer(cfg, env, Path(run_dir))


def global_batches(num: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
            for _ in range(num)]


def rank_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the first global batch."""
    x, y = global_batches(1)[0]
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


class InMemoryData:
    """Rank r of W sees rows [r*B/W, (r+1)*B/W) of every global batch."""

    def __init__(self, rank: int, world: int, num_batches: int = 4):
        self.rank, self.world, self.batches = rank, world, global_batches(num_batches)

    def _slice(self, t):
        per = t.shape[0] // self.world
        return t[self.rank * per:(self.rank + 1) * per]

    def train_loader(self, epoch, start_step):
        return [(self._slice(x), self._slice(y)) for x, y in self.batches[start_step:]]

    def eval_loader(self, split):
        return [(self._slice(x), self._slice(y), torch.ones(self._slice(y).shape[0], dtype=torch.bool))
                for x, y in self.batches]

    def steps_per_epoch(self):
        return len(self.batches)


class NullTracker:
    run_id = "none"

    def log_metrics(self, metrics, step):
        pass


class RecordingTracker(NullTracker):
    """Keeps every ``log_metrics``/``log_artifact`` call; ``run_dir`` turns the trainer's plots on."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.metrics: list[tuple[int, dict]] = []
        self.artifacts: list[tuple[str, str]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))
