"""Sharded checkpoints: resharding across world sizes, crash-safety, refusal of what cannot
be carried, checksums, the older format. (Kill-and-resume of a real launcher run lives in
tests/e2e/test_resume.py; damaged files and pickle payloads in tests/faults.)"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from inmemory import GLOBAL_BATCH, InMemoryData, NullTracker, RecordingTracker, checkpointed_run
from multiproc import RankFailed, spawn

from pce_dist import optim_state
from pce_dist.checkpoint import Checkpointer, load_file, read_meta, resolve
from pce_dist.distributed import norm_stats
from pce_dist.export import export, load_exported
from pce_dist.trainer import Trainer

def _setup(world, run_dir, overrides):
    return checkpointed_run(world, run_dir, overrides)


def _train_and_save(rank, world, run_dir, overrides, steps):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, overrides + [f"train.max_steps={steps}"])
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt)
    trainer.fit()
    path = trainer.save_checkpoint("test")
    ckpt.wait()
    return str(path)


def _fixed_input():
    g = torch.Generator().manual_seed(99)
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)


def _load_and_continue(rank, world, run_dir, overrides, total_steps):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, overrides + [f"train.max_steps={total_steps}"])
    path = ckpt.find_resume()
    state = ckpt.load(path, model, engine)
    resumed_step = state.global_step
    model.eval()
    per = GLOBAL_BATCH // world
    with torch.no_grad():
        logits = model(_fixed_input()[env.rank * per:(env.rank + 1) * per]).logits_BK
    experts = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    expert_params = [p for n, p in model.named_parameters() if ".experts." in n]
    optimizer_has_state = all(p in engine.optimizer.state and engine.optimizer.state[p] for p in expert_params)
    model.train()
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                      state=state)
    trainer.fit()
    return {"logits": logits, "experts": experts, "optimizer_state": optimizer_has_state,
            "resumed_step": resumed_step, "final_step": trainer.state.global_step,
            "hosted": sorted(model.pce_layers()[0].experts.keys())}


@pytest.mark.parametrize("save_world,save_ep,load_world,load_ep", [(2, 2, 1, 1), (1, 1, 2, 2)])
def test_reshard_across_world_sizes(tmp_path, save_world, save_ep, load_world, load_ep):
    run_dir = tmp_path / "run"
    saved = spawn(_train_and_save, save_world, args=(str(run_dir), [f"dist.ep_size={save_ep}"], 4), timeout_s=120)[0]
    exported, _ = load_exported(export(saved, tmp_path / "model.pt"))
    full = exported.state_dict()
    with torch.no_grad():
        expected = exported(_fixed_input()).logits_BK
    results = spawn(_load_and_continue, load_world, args=(str(run_dir), [f"dist.ep_size={load_ep}"], 6),
                    timeout_s=120)
    logits = torch.cat([r["logits"] for r in results])
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)  # same model function
    for r in results:
        assert r["optimizer_state"], "optimizer state of the experts was not carried over"
        assert r["resumed_step"] == 4 and r["final_step"] == 6  # training continues
        for name, value in r["experts"].items():  # every hosted expert equals what was saved
            assert torch.equal(value, full[name]), name
    hosted = sorted({e for r in results for e in r["hosted"]})
    assert hosted == ["0", "1", "2", "3"]


def _crash_during_save(rank, world, run_dir, crash_at):
    """Save once, then SIGKILL this process at ``crash_at`` inside the second save."""
    import pce_dist.checkpoint as ck

    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["train.max_steps=2"])
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt)
    trainer.fit()
    first = trainer.save_checkpoint()
    ckpt.wait()  # published before anything is patched
    trainer.state.global_step += 1  # a later step
    real_save, real_replace, real_write = ck._atomic_save, os.replace, ck._atomic_write_text

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if crash_at == "shard":
        ck._atomic_save = lambda obj, path, **kw: die() if path.name.startswith("experts") else real_save(obj, path, **kw)
    elif crash_at == "rename":
        ck.os.replace = lambda a, b: die() if Path(a).name.startswith(".tmp-") else real_replace(a, b)
    elif crash_at == "latest":
        ck._atomic_write_text = lambda path, text: die() if path.name == "latest" else real_write(path, text)
    trainer.save_checkpoint()
    ckpt.wait()  # the kill lands in the writer thread
    return str(first)


def _resume_state(rank, world, run_dir):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["train.max_steps=2"])
    path = ckpt.find_resume()
    state = ckpt.load(path, model, engine)
    return path.name, state.global_step


@pytest.mark.parametrize("crash_at", ["shard", "rename", "latest"])
def test_kill_during_checkpoint_write_keeps_latest_whole(tmp_path, crash_at):
    run_dir = tmp_path / "run"
    with pytest.raises(RankFailed, match="signal 9"):
        spawn(_crash_during_save, 1, args=(str(run_dir), crash_at), timeout_s=120)
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    name, step = spawn(_resume_state, 1, args=(str(run_dir),), timeout_s=60)[0]
    assert (name, step) == ("step_00000002", 2)
    tmp, final = root / ".tmp-step_00000003", root / "step_00000003"
    # where the kill landed, seen on disk: each case reached its own point of the save
    if crash_at == "shard":  # mid-write: no meta.json, nothing published
        assert tmp.is_dir() and not (tmp / "meta.json").exists() and not final.exists()
    elif crash_at == "rename":  # complete but never renamed into place: still invisible
        assert (tmp / "meta.json").is_file() and not final.exists()
    else:  # published, but ``latest`` was not replaced: the resume above ignored it
        assert (final / "meta.json").is_file() and not tmp.exists()


def test_incompatible_config_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    spawn(_train_and_save, 1, args=(str(run_dir), [], 2), timeout_s=120)
    with pytest.raises(RankFailed, match=r"model\.num_experts=4.*model\.num_experts=2"):
        spawn(_load_and_continue, 1, args=(str(run_dir), ["model.num_experts=2"], 4), timeout_s=60)


def _resume_numpy_draw(rank, world, run_dir):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["train.max_steps=4"])
    state = ckpt.load(ckpt.find_resume(), model, engine)
    return state.global_step, float(np.random.random_sample())


def test_format1_checkpoint_without_checksums_still_loads(tmp_path):
    """What the previous format wrote: sizes only, numpy's RNG state as its own ndarray tuple."""
    run_dir = tmp_path / "run"
    spawn(_train_and_save, 1, args=(str(run_dir), [], 2), timeout_s=120)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    blob = torch.load(ckpt / "rank0.pt", weights_only=True)
    blob["rng"]["numpy"] = np.random.RandomState(123).get_state()
    torch.save(blob, ckpt / "rank0.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["format"] = 1
    del meta["sha256"]
    meta["files"]["rank0.pt"] = (ckpt / "rank0.pt").stat().st_size
    (ckpt / "meta.json").write_text(json.dumps(meta))
    step, draw = spawn(_resume_numpy_draw, 1, args=(str(run_dir),), timeout_s=60)[0]
    assert step == 2 and draw == np.random.RandomState(123).random_sample()


def test_checkpoint_from_before_a_new_architecture_key_loads(tmp_path):
    """A checkpoint whose config predates ``model.input_pad`` / ``model.router_position`` was
    saved with their defaults: it resumes under a config that has the defaults."""
    run_dir = tmp_path / "run"
    spawn(_train_and_save, 1, args=(str(run_dir), [], 2), timeout_s=120)
    meta_path = run_dir / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("input_pad", "router_position"):
        del meta["config"]["model"][key]
    meta_path.write_text(json.dumps(meta))
    step, _ = spawn(_resume_numpy_draw, 1, args=(str(run_dir),), timeout_s=60)[0]
    assert step == 2


def _norm_stats_before_and_after_sync(rank, world, run_dir):
    cfg, env, model, engine, _ = _setup(world, run_dir, ["dist.ep_size=2", "model.expert_norm=batch",
                                                         "model.stem_norm=batch"])
    data = InMemoryData(env.rank, world, num_batches=8)
    model.train()
    for x, _ in data.train_loader(0, 0)[:2]:
        model(x)  # each rank's running statistics move with its own micro-batches only
    stats = lambda: {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}  # noqa: E731
    before = stats()
    norm_stats.average(model, env)
    return env.rank, before, stats()


def test_norm_statistics_are_averaged_over_replicas(tmp_path):
    results = {rank: (before, after) for rank, before, after in
               spawn(_norm_stats_before_and_after_sync, 4, args=(str(tmp_path / "run"),), timeout_s=120)}
    # ep_size 2 on 4 ranks: ranks {0, 2} host experts 0-1, ranks {1, 3} host experts 2-3
    groups = {0: [0, 1, 2, 3], 1: [0, 2], 2: [1, 3]}
    drifted = 0
    for name in sorted(set(results[0][0]) | set(results[1][0])):
        replicas = groups[0] if ".experts." not in name else groups[1] if name in results[0][0] else groups[2]
        values = [results[r][0][name] for r in replicas]
        drifted += not all(torch.equal(v, values[0]) for v in values)
        for r in replicas:
            torch.testing.assert_close(results[r][1][name], torch.stack(values).mean(0), rtol=1e-6, atol=1e-7)
    assert drifted > 0  # the ranks really had different statistics before


# ----------------------------------------------------------------------------- exact history after resume

HISTORY = ["dist.ep_size=2", "train.max_steps=8", "train.log_every_steps=4", "checkpoint.every_steps=3"]


class _Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint (nothing after it runs)."""


class _DyingCheckpointer(Checkpointer):
    def save(self, *args, **kwargs):
        path = super().save(*args, **kwargs)
        self.wait()  # the kill lands after the checkpoint is published
        if self.saved_step == 3:
            raise _Killed
        return path


def _history(rank, world, run_dir, phase, carry_window=True):
    """``phase``: "whole" (uninterrupted), "killed" (dies after the step-3 checkpoint) or
    "resumed"; returns every train metric logged on rank 0, by step."""
    cfg, env, model, engine, ckpt = _setup(world, run_dir, HISTORY)
    state = window = None
    if phase == "killed":
        ckpt = _DyingCheckpointer(cfg, env, Path(run_dir))
    elif phase == "resumed":
        state = ckpt.load(ckpt.find_resume(), model, engine)
        window = ckpt.log_window if carry_window else None
    tracker = RecordingTracker(Path(run_dir) / "unused")
    tracker.run_dir = None  # no plots
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), tracker, ckpt,
                      state=state, log_window=window)
    try:
        trainer.fit()
    except _Killed:
        pass
    return {step: {k: v for k, v in m.items() if not k.startswith("perf/")} for step, m in tracker.metrics
            if "train/loss" in m}


def test_log_window_spanning_a_checkpoint_is_carried(tmp_path):
    """Checkpoint at step 3 inside the 1..4 log window: the resumed run logs at step 4 the mean
    over steps 1..4 (as the uninterrupted run) -- train sums and all-to-all traffic alike."""
    whole = spawn(_history, 2, args=(str(tmp_path / "whole"), "whole"), timeout_s=120)[0]
    spawn(_history, 2, args=(str(tmp_path / "run"), "killed"), timeout_s=120)
    blob = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "rank1.pt", weights_only=True)
    assert blob["log_window"]["train"]["micro_steps"] == 3 and blob["log_window"]["traffic"][0]["dispatch_bytes"] > 0
    resumed = spawn(_history, 2, args=(str(tmp_path / "run"), "resumed"), timeout_s=120)[0]
    assert sorted(whole) == sorted(resumed) == [4, 8]
    assert any(k.startswith("comm/") for k in whole[4])
    for step in whole:
        assert resumed[step] == whole[step], step  # exactly: the same float sums in the same order
    # the test can fail: without the stored window the interval restarts at the checkpoint
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000003")
    restarted = spawn(_history, 2, args=(str(tmp_path / "run"), "resumed", False), timeout_s=120)[0]
    assert restarted[4]["train/loss"] != whole[4]["train/loss"]
    assert restarted[4]["comm/dispatch_bytes_per_step"] != whole[4]["comm/dispatch_bytes_per_step"]
    assert restarted[8] == whole[8]


# ----------------------------------------------------------------------------- warm start


def _warm_start(rank, world, source, run_dir, overrides):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, [f"checkpoint.init_from={source}"] + overrides)
    assert ckpt.find_resume() is None
    state = ckpt.warm_start(ckpt.find_init(), model, engine)
    masters, optim = optim_state.gather(model, engine.optimizer)  # what the optimizer holds, any ZeRO stage
    optim = {name: {k: v for k, v in st.items() if torch.is_tensor(v)} for name, st in optim.items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lr, position = engine.get_lr()[0], dict(vars(state))  # before training moves it
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                      state=state)
    trainer.fit()
    return {"state": position, "weights": weights, "masters": masters, "optim": optim, "lr": lr, "run_id": ckpt.run_id,
            "source": ckpt.init_source, "final_step": trainer.state.global_step}


@pytest.mark.parametrize("init_optimizer", [False, True])
def test_warm_start_takes_weights_into_a_new_run_on_another_layout(tmp_path, init_optimizer):
    source = tmp_path / "source"
    adamw = ["optim.name=adamw"]
    saved = Path(spawn(_train_and_save, 2, args=(str(source), ["dist.ep_size=2"] + adamw, 4), timeout_s=120)[0])
    full, _ = load_exported(export(saved, tmp_path / "model.pt"))
    meta = read_meta(saved)
    named = {}
    for name in meta["files"]:
        if name.startswith(("shared", "experts")):
            named.update(load_file(saved, meta, name)["optimizer"])
    # a run directory is enough; 1 rank, ep_size 1 (the source had 2 and 2)
    result = spawn(_warm_start, 1, args=(str(source), str(tmp_path / "new"),
                                         adamw + [f"checkpoint.init_optimizer={str(init_optimizer).lower()}",
                                                  "train.max_steps=3"]), timeout_s=120)[0]
    assert result["state"] == {"epoch": 0, "micro_step": 0, "global_step": 0, "samples_seen": 0,
                               "keys_initialised": True}
    assert result["run_id"] is None and result["final_step"] == 3  # a new run, trained from step 0
    assert result["source"] == {"path": str(resolve(source / "checkpoints")), "step": 4, "run_id": "",
                                "optimizer": init_optimizer}
    for name, value in full.state_dict().items():
        assert torch.equal(result["weights"][name], value), name
    if init_optimizer:
        assert sorted(result["optim"]) == sorted(named)
        for name, state in named.items():
            for k, v in state.items():
                assert torch.equal(result["optim"][name][k], v), (name, k)
    else:
        assert result["optim"] == {}
    assert not (tmp_path / "new" / "checkpoints" / "step_00000004").exists()
    assert (tmp_path / "new" / "checkpoints" / "step_00000003").is_dir()


def test_warm_start_with_optimizer_into_zero1(tmp_path):
    """Optimizer state is by name at every ZeRO stage: a ZeRO-0 source warm-starts a ZeRO-1 run
    with its moments, DeepSpeed's fp32 masters set from the checkpoint's weights."""
    source = tmp_path / "source"
    saved = Path(spawn(_train_and_save, 1, args=(str(source), [], 2), timeout_s=120)[0])
    full, _ = load_exported(export(saved, tmp_path / "model.pt"))
    named = {}
    meta = read_meta(saved)
    for name in meta["files"]:
        if name.startswith(("shared", "experts")):
            named.update(load_file(saved, meta, name)["optimizer"])
    result = spawn(_warm_start, 1, args=(str(source), str(tmp_path / "new"),
                                         ["checkpoint.init_optimizer=true", "dist.zero_stage=1", "train.max_steps=2"]),
                    timeout_s=120)[0]
    assert result["final_step"] == 2 and sorted(result["optim"]) == sorted(named)
    for name, state in result["optim"].items():
        assert sorted(state) == ["momentum_buffer"] and torch.equal(state["momentum_buffer"],
                                                                    named[name]["momentum_buffer"]), name
    full_state = full.state_dict()
    assert result["masters"] and all(torch.equal(v, full_state[k]) for k, v in result["masters"].items())
    with pytest.raises(RankFailed, match=r"config key 'checkpoint.init_from' = .*nowhere.*no meta.json"):
        spawn(_warm_start, 1, args=(str(tmp_path / "nowhere"), str(tmp_path / "new2"), []), timeout_s=120)
