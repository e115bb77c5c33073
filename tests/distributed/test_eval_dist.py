"""A 2-rank training run's evaluations with a tracker that has a ``run_dir``: the routing
pictures are drawn (every rank joins the plot batch's forward, which holds all-to-alls; only
rank 0 draws) and the data loaders' per-rank counts reach the metrics summed over ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
from inmemory import EXACT, GLOBAL_BATCH, InMemoryData, RecordingTracker
from multiproc import spawn

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.engine import build_engine
from pce_dist.train import build_model_for
from pce_dist.trainer import Trainer

PLOTS = {"routing_maps.png", "expert_usage.png", "thresholds.png", "confusion_matrix.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CountingData(InMemoryData):
    """In-memory batches plus per-rank loader accounting that differs between ranks."""

    class_names = ["a", "b", "c", "d"]

    def stats(self) -> dict[str, int]:
        return {"samples_skipped": self.rank + 1, "samples_padded": 10 * self.rank, "shards_failed": 0,
                "samples_seen": 100 + self.rank}


def _train_and_evaluate(rank, world, run_dir, epochs):
    cfg = load_config(None, EXACT + [f"data.batch_size={GLOBAL_BATCH // world}", f"train.epochs={epochs}",
                                     "dist.ep_size=2", "model.num_experts=4", "train.log_every_steps=2"])
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=epochs * 4)
    tracker = RecordingTracker(Path(run_dir) / f"rank{rank}")  # per rank: a file drawn by rank 1 would show
    trainer = Trainer(cfg, env, model, engine, CountingData(env.rank, world), tracker)
    trainer.fit()
    return {"metrics": tracker.metrics, "artifacts": tracker.artifacts, "step": trainer.state.global_step,
            "run_dir": str(tracker.run_dir)}


def test_evaluation_draws_plots_and_reduces_data_stats(tmp_path):
    epochs = 2
    r0, r1 = spawn(_train_and_evaluate, 2, args=(str(tmp_path), epochs), timeout_s=240)
    # one folder of pictures per evaluation (one per epoch), drawn by rank 0 only
    step_dirs = sorted((Path(r0["run_dir"]) / "plots").iterdir())
    assert [d.name for d in step_dirs] == [f"step{4 * (e + 1):07d}" for e in range(epochs)]
    for d in step_dirs:
        assert {f.name for f in d.iterdir()} == PLOTS, d
        for f in d.iterdir():
            assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 1000, f
    assert r0["artifacts"] == [(str(d), f"plots/{d.name}") for d in step_dirs]
    assert not (Path(r1["run_dir"]) / "plots").exists() and r1["artifacts"] == []
    # data/* at every evaluation: sums over the two ranks, the same on both
    for r in (r0, r1):
        data = [m for _, m in r["metrics"] if "data/samples_seen" in m]
        assert len(data) == epochs, r["metrics"]
        for m in data:
            assert {k: v for k, v in m.items() if k.startswith("data/")} == pytest.approx(
                {"data/samples_skipped": 1 + 2, "data/samples_padded": 0 + 10, "data/shards_failed": 0,
                 "data/samples_seen": 100 + 101})
