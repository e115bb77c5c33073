"""One checkpoint layout for every ZeRO stage: written by ZeRO-2 on 4 ranks, resumed by ZeRO-1
on 2, by ZeRO-0 on 1, and back up to ZeRO-2 on 4 -- same model function, the same fp32
masters and optimizer moments for every parameter, training goes on. Also: exact resume on
the same ZeRO-2 layout, and format-2 checkpoints (DeepSpeed's partitioned ``zero_r*.pt``)
still load on their own layout and are refused, by name, on another.

ZeRO > 0 runs with ``ep_size`` equal to the world size: with expert replicas DeepSpeed
0.19.8's ZeRO-1/2 mis-update experts, and pce_dist refuses that layout before start
(``config.validate_world``). bf16 has no DeepSpeed CPU path: the bf16 optimizer goes through
the same fragment API (``optim_state``) and is checked on a GPU only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import legacy_checkpoint
import pytest
import torch
from inmemory import GLOBAL_BATCH, InMemoryData, NullTracker, checkpointed_run
from multiproc import RankFailed, spawn

from pce_dist import optim_state
from pce_dist.checkpoint import _deepspeed_optimizer_globals, load_file, read_meta, zero_file
from pce_dist.export import export, load_exported
from pce_dist.trainer import Trainer

def _setup(world, run_dir, overrides):
    return checkpointed_run(world, run_dir, ["checkpoint.keep_last=10"] + overrides, total_steps=20)


def _fixed_input():
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(99))


def _hop(rank, world, run_dir, layout, total_steps):
    """Resume the newest checkpoint (if any) on ``layout``, report what was loaded, train to
    ``total_steps`` optimizer steps and save."""
    ep, zero = layout
    cfg, env, model, engine, ckpt = _setup(world, run_dir, [f"dist.ep_size={ep}", f"dist.zero_stage={zero}",
                                                            f"train.max_steps={total_steps}"])
    path = ckpt.find_resume()
    state = ckpt.load(path, model, engine) if path is not None else None
    report = {"resumed_step": state.global_step if state else 0}
    if state is not None:
        model.eval()
        per = GLOBAL_BATCH // world
        with torch.no_grad():
            report["logits"] = model(_fixed_input()[env.rank * per:(env.rank + 1) * per]).logits_BK
        model.train()
        # what the optimizer now holds, read back through the same API a save uses
        report["masters"], report["moments"] = optim_state.gather(model, engine.optimizer)
        report["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                      state=state)
    trainer.fit()
    report["final_step"] = trainer.state.global_step
    return report


def _saved_named_state(ckpt_dir: Path) -> tuple[dict, dict]:
    """Every tensor and every parameter's optimizer state a checkpoint holds, by name."""
    meta = read_meta(ckpt_dir)
    model, moments = {}, {}
    for name in ["shared.pt"] + sorted(set(meta["expert_files"].values())):
        blob = load_file(ckpt_dir, meta, name)
        model.update(blob["model"])
        moments.update(blob["optimizer"])
    return model, moments


# (world size, ep_size, ZeRO stage): down from ZeRO-2 on 4 ranks to one process, and back up
CHAIN = [(4, 4, 2), (2, 2, 1), (1, 1, 0), (4, 4, 2)]


def test_zero2_to_zero1_to_zero0_and_back(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    step = 0
    for i, (world, ep, zero) in enumerate(CHAIN):
        saved = root / (root / "latest").read_text() if i else None
        if saved is not None:
            meta = json.loads((saved / "meta.json").read_text())
            assert meta["portable_optimizer"] and not list(saved.glob("zero_r*.pt"))  # by name, at every stage
            for name, digest in meta["sha256"].items():  # each rank hashed its files as it wrote them
                data = (saved / name).read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["files"][name], digest), name
                assert torch.serialization.get_unsafe_globals_in_checkpoint(saved / name) == [], name
            exported, _ = load_exported(export(saved, tmp_path / f"model{i}.pt"))
            with torch.no_grad():
                expected = exported(_fixed_input()).logits_BK
            weights, moments = _saved_named_state(saved)
        reports = spawn(_hop, world, args=(str(run_dir), (ep, zero), step + 2), timeout_s=240)
        for r in reports:
            assert r["resumed_step"] == step and r["final_step"] == step + 2, (CHAIN[i], r["resumed_step"])
        step += 2
        if saved is None:
            continue
        where = f"{CHAIN[i - 1]} -> {CHAIN[i]}"
        torch.testing.assert_close(torch.cat([r["logits"] for r in reports]), expected, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{where}: {m}")
        checked = set()
        for r in reports:
            for name, value in r["weights"].items():  # every hosted tensor is the saved one
                assert torch.equal(value, weights[name]), f"{where}: {name}"
            for name, value in r["masters"].items():  # ZeRO-1/2: DeepSpeed's fp32 masters too
                assert torch.equal(value, weights[name]), f"{where}: master {name}"
            for name, state in r["moments"].items():
                saved_state = moments[name]
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        assert torch.equal(value, saved_state[key]), f"{where}: {name}.{key}"
                    else:  # Adam's step count
                        assert float(value) == float(saved_state[key]), f"{where}: {name}.{key}"
                checked.add(name)
        assert checked == set(moments), f"{where}: moments of {sorted(set(moments) - checked)[:3]} not restored"


def _straight(rank, world, run_dir, steps, stop_at):
    """Train ``steps`` steps on ZeRO-2 (2 ranks, ep 2), or ``stop_at`` then resume to ``steps``."""
    layout = ["dist.ep_size=2", "dist.zero_stage=2"]
    cfg, env, model, engine, ckpt = _setup(world, run_dir, layout + [f"train.max_steps={stop_at or steps}"])
    Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt).fit()
    if stop_at:
        cfg, env, model, engine, ckpt = _setup(world, run_dir, layout + [f"train.max_steps={steps}"])
        state = ckpt.load(ckpt.find_resume(), model, engine)
        Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                state=state).fit()
    masters, moments = optim_state.gather(model, engine.optimizer)
    return {k: v.clone() for k, v in model.state_dict().items()}, masters, moments


def test_same_zero2_layout_resumes_bit_identically(tmp_path):
    whole = spawn(_straight, 2, args=(str(tmp_path / "whole"), 5, 0), timeout_s=240)
    resumed = spawn(_straight, 2, args=(str(tmp_path / "resumed"), 5, 2), timeout_s=240)
    for (w_a, m_a, s_a), (w_b, m_b, s_b) in zip(whole, resumed):
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
        assert all(torch.equal(m_a[k], m_b[k]) for k in m_a)
        for name in s_a:
            for key, value in s_a[name].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(s_b[name][key])), (name, key)


def _write_format2(rank, world, run_dir):
    cfg, env, model, engine, ckpt = _setup(world, run_dir, ["dist.ep_size=2", "dist.zero_stage=1",
                                                            "train.max_steps=2"])
    Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt).fit()
    path = ckpt.wait()
    return str(path), legacy_checkpoint.write_partitioned(engine, path, env.rank)


def _resume_format2(rank, world, run_dir, layout):
    ep, zero = layout
    cfg, env, model, engine, ckpt = _setup(world, run_dir, [f"dist.ep_size={ep}", f"dist.zero_stage={zero}",
                                                            "train.max_steps=4"])
    state = ckpt.load(ckpt.find_resume(), model, engine)
    resumed = state.global_step
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                      state=state)
    trainer.fit()
    return resumed, trainer.state.global_step


def test_format2_partitioned_checkpoint_loads_on_its_own_layout_only(tmp_path):
    run_dir = tmp_path / "run"
    results = spawn(_write_format2, 2, args=(str(run_dir),), timeout_s=180)
    path = Path(results[0][0])
    # pinned to the installed DeepSpeed: exactly these classes are let through for zero_r*.pt
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_optimizer_globals()}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path / zero_file(0))) == allowed
    legacy_checkpoint.as_format2(path, [w for _, w in results])
    with pytest.raises(RankFailed, match="format 2.*ZeRO stage 1, 2 ranks, ep_size 2.*exact layout"):
        spawn(_resume_format2, 1, args=(str(run_dir), (1, 0)), timeout_s=120)
    assert spawn(_resume_format2, 2, args=(str(run_dir), (2, 1)), timeout_s=180) == [(2, 4), (2, 4)]
