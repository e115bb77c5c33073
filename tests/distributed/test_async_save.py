"""Asynchronous checkpoint save: the step boundary takes the state, a background thread
writes it; at most one save in flight; a failed write is raised on every rank and never
becomes ``latest``; an async run writes what a synchronous one does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from inmemory import InMemoryData, NullTracker, checkpointed_run
from multiproc import spawn

from pce_dist.checkpoint import CheckpointError, load_file, read_meta
from pce_dist.state import TrainState
from pce_dist.trainer import Trainer

def _setup(world, run_dir, overrides):
    return checkpointed_run(world, run_dir, overrides)


def _loaded(ckpt_dir: Path) -> dict:
    """Every data file of a checkpoint, loaded."""
    meta = read_meta(ckpt_dir)
    return {name: load_file(ckpt_dir, meta, name) for name in sorted(meta["files"])}


def _assert_same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _train(rank, world, run_dir, async_save):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, [
        "dist.ep_size=2", "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
        "model.expert_norm=batch", "model.stem_norm=batch",  # per-rank statistics, averaged into the files
        f"checkpoint.async_save={str(async_save).lower()}"])
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt)
    trainer.fit()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_async_run_writes_what_a_synchronous_run_writes(tmp_path):
    """Same weights at the end, and every checkpoint holds the same tensors and values: the
    host copy is taken at the step boundary, before training changes anything."""
    finals = {}
    for mode in (True, False):
        finals[mode] = spawn(_train, 2, args=(str(tmp_path / str(mode)), mode), timeout_s=180)
    for a, b in zip(finals[True], finals[False]):
        _assert_same(a, b, "final weights")
    steps = sorted(p.name for p in (tmp_path / "True" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000004", "step_00000006"]
    assert sorted(p.name for p in (tmp_path / "False" / "checkpoints").glob("step_*")) == steps
    for name in steps:
        a, b = (_loaded(tmp_path / mode / "checkpoints" / name) for mode in ("True", "False"))
        for blob in (a, b):  # Python's and numpy's streams are the worker's unseeded own (unused here)
            for file, content in blob.items():
                if file.startswith("rank"):
                    del content["rng"]["python"], content["rng"]["numpy"]
        _assert_same(a, b, name)


def _slow_saves(rank, world, run_dir, delay_s):
    """Two saves in a row with a writer slowed by ``delay_s`` per file; the live weights are
    changed right after the first save returns."""
    import pce_dist.checkpoint as ck

    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["train.max_steps=1"])
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt)
    trainer.fit()  # saves step 1 ("final") and waits
    real_save = ck._atomic_save

    def slow(obj, path, **kw):
        time.sleep(delay_s)
        return real_save(obj, path, **kw)

    ck._atomic_save = slow
    latest = Path(run_dir) / "checkpoints" / "latest"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.state.global_step = 2
    start = time.perf_counter()
    trainer.save_checkpoint()
    first_return_s = time.perf_counter() - start
    latest_after_first = latest.read_text()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: the checkpoint in flight must not see this
    trainer.state.global_step = 3
    trainer.save_checkpoint()
    latest_after_second = latest.read_text()  # the second save waited for the first
    ckpt.wait()
    return {"first_return_s": first_return_s, "latest": (latest_after_first, latest_after_second, latest.read_text()),
            "before": before}


def test_save_returns_at_once_and_at_most_one_is_in_flight(tmp_path):
    delay_s = 0.5
    out = spawn(_slow_saves, 1, args=(str(tmp_path), delay_s), timeout_s=120)[0]
    # the write of 3 files takes >= 1.5 s; the step boundary must not wait for it
    assert out["first_return_s"] < delay_s, out["first_return_s"]
    assert out["latest"] == ("step_00000001", "step_00000002", "step_00000003")
    saved = _loaded(tmp_path / "checkpoints" / "step_00000002")
    model_state = {**saved["shared.pt"]["model"], **saved["experts_r0.pt"]["model"]}
    _assert_same(model_state, out["before"], "step 2 holds the weights of the step boundary")


def _failing_save(rank, world, run_dir):
    import pce_dist.checkpoint as ck

    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["dist.ep_size=2", "train.max_steps=1"])
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt)
    trainer.fit()  # step 1 published
    real_save = ck._atomic_save

    def full_disk(obj, path, **kw):
        if env.rank == 1 and path.name.startswith("experts"):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, **kw)

    ck._atomic_save = full_disk
    trainer.state.global_step = 2
    trainer.save_checkpoint()  # returns: the failure is in the writer thread
    try:
        ckpt.wait()
        message = None
    except CheckpointError as exc:
        message = str(exc)
    ck._atomic_save = real_save
    trainer.state.global_step = 3  # a later save works again
    trainer.save_checkpoint()
    ckpt.wait()
    return message


def test_failed_write_is_raised_on_every_rank_and_never_published(tmp_path):
    messages = spawn(_failing_save, 2, args=(str(tmp_path),), timeout_s=120)
    for message in messages:
        assert message is not None, "a failed write passed silently"
        assert "step_00000002" in message and "rank 1" in message and "experts_r1.pt" in message
        assert "No space left on device" in message and "latest still names step_00000001" in message
    root = tmp_path / "checkpoints"
    assert not (root / "step_00000002").exists() and not list(root.glob(".tmp-*"))
    assert (root / "latest").read_text() == "step_00000003"


def _blocked_save(rank, world, run_dir, async_save):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, [f"checkpoint.async_save={str(async_save).lower()}"])
    (Path(run_dir) / "checkpoints").write_text("a file where the directory should be")
    try:
        ckpt.save(model, engine, TrainState(global_step=1))
        ckpt.wait()
    except CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("async_save", [True, False])
def test_failure_is_raised_in_both_modes(tmp_path, async_save):
    """The synchronous path reports through the same protocol."""
    tmp_path.mkdir(exist_ok=True)
    message = spawn(_blocked_save, 1, args=(str(tmp_path), async_save), timeout_s=120)[0]
    assert message is not None and "cannot create" in message and "latest still names no checkpoint" in message
