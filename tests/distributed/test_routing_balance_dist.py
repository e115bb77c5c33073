"""The router state that training moves outside the optimizer, on 2 real gloo ranks.

The selection bias (``model.bias_balance_rate``) and the centring mean (``model.router_center``)
are updated after each optimizer step from statistics all-reduced over every rank
(``keys.KeyUpdater``): each rank sees a different batch, yet both end with the same values --
the values one process computes from the two batches together.
"""

from __future__ import annotations

import torch
from multiproc import spawn

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.keys import KeyUpdater
from pce_dist.model import build_model

_CFG = ["model.image_size=8", "model.patch_sizes=[4,2]", "model.channels=[8,8]", "model.stem_channels=8",
        "model.stem_norm=group", "model.expert_norm=group", "model.expert_dropout=0.0",
        "model.bias_balance_rate=0.05", "model.router_center=true", "dist.timeout_s=30"]
STEPS = 3


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(2 * STEPS)]  # step s: rank r takes 2s + r


def _model():
    cfg = load_config(None, _CFG)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).train()


def _state(model):
    return {f"layer{i}.{k}": getattr(r, k).clone() for i, r in enumerate(model.routers())
            for k in ("select_bias", "center_mean")}


def _worker(rank, world_size):
    cfg, model = _model()
    env = DistEnv.from_environ(cfg.dist).init()
    keys = KeyUpdater(model, env)
    keys.start_epoch(phase2=False)
    batches = _batches()
    with torch.no_grad():
        for step in range(STEPS):
            keys.accumulate(model(batches[2 * step + rank]).routes)
            keys.after_optimizer_step()
    return _state(model)


def test_bias_and_centre_are_identical_on_every_rank_and_equal_one_process():
    r0, r1 = spawn(_worker, 2, timeout_s=90)
    _, model = _model()
    keys = KeyUpdater(model, DistEnv().init())
    keys.start_epoch(phase2=False)
    batches = _batches()
    with torch.no_grad():
        for step in range(STEPS):  # one process, both ranks' batches in each step
            for rank in range(2):
                keys.accumulate(model(batches[2 * step + rank]).routes)
            keys.after_optimizer_step()
    expected = _state(model)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "select_bias" in k), "the bias never moved"
    for name in expected:
        assert torch.equal(r0[name], r1[name]), name  # bit-identical across ranks
        torch.testing.assert_close(r0[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
