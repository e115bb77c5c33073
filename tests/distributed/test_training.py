"""DeepSpeed training with expert parallelism, against one process on the same global batch.

Configs here use GroupNorm in the stem and experts and no dropout, so every operation is
per-sample: two ranks holding half the batch each compute exactly what one process
computes on the whole batch, up to the order of float32 sums (1e-5 relative, 1e-6 absolute).
The optimizer is SGD: Adam divides each gradient element by its own RMS, so an element
whose true gradient is zero (a cancelling sum) but whose float32 value is +-1e-9 noise
gets a full +-lr step -- different noise, different weights -- which would say nothing
about the distributed code (measured: gradients equal to 3e-8, AdamW weights 1e-3 apart). ``EXACT`` turns
gradient clipping off; the cases with ``optim.grad_clip`` turn it on, small enough to bite at
every step: ``pce_dist.grad_norm`` clips by the global norm, which is the single-process norm
(``test_grad_norm.py`` checks one step of it on 2 and 4 ranks).
"""

from __future__ import annotations

import pytest
import torch
from inmemory import EXACT, GLOBAL_BATCH, InMemoryData, NullTracker, rank_batch
from multiproc import spawn

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.engine import build_engine
from pce_dist.model import pce_loss
from pce_dist.train import build_model_for
from pce_dist.trainer import Trainer


def _train(rank, world, overrides, epochs):
    cfg = load_config(None, EXACT + [f"data.batch_size={GLOBAL_BATCH // world}", f"train.epochs={epochs}"] + overrides)
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=epochs * 4)
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, env.world_size), NullTracker())
    trainer.fit()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "losses": [h["train/loss"] for h in trainer.history],
            "grad_norms": [h["train/grad_norm"] for h in trainer.history],
            "keys": [r.keys.detach().clone() for r in model.routers()], "eval": trainer.last_eval}


def _single(overrides, epochs):
    return spawn(_train, 1, args=(overrides, epochs), timeout_s=120)[0]


@pytest.mark.parametrize("ep_size,extra", [(2, []), (1, []), (2, ["dist.zero_stage=1"]), (2, ["train.grad_accum=2"]),
                                           (2, ["optim.grad_clip=0.5"]),
                                           (2, ["optim.grad_clip=0.5", "dist.zero_stage=1"])])
def test_two_ranks_match_one_process(ep_size, extra):
    """Phase 1 then phase 2 (keys EMA-updated, then trained): weights, keys, losses and logged
    gradient norms agree -- with clipping too (the global norm, not a per-rank one)."""
    overrides = [f"dist.ep_size={ep_size}", "train.phase2_epoch=1"] + extra
    # the reference is plain ZeRO-0 on one process: ZeRO-1 keeps fp32 master copies that must
    # also receive the EMA/normalised keys, or the next step silently reverts them
    ref = _single([o for o in overrides if not o.startswith(("dist.ep_size", "dist.zero_stage"))], epochs=2)
    r0, r1 = spawn(_train, 2, args=(overrides, 2), timeout_s=180)
    # bit-identical keys on every rank, and equal to the single-process EMA/training
    for k0, k1, kr in zip(r0["keys"], r1["keys"], ref["keys"]):
        assert torch.equal(k0, k1)
        torch.testing.assert_close(k0, kr, rtol=1e-5, atol=1e-6)
    assert len(r0["losses"]) == len(ref["losses"]) == (8 if "train.grad_accum=2" not in extra else 4)
    for a, b in zip(r0["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for a, b in zip(r0["grad_norms"], ref["grad_norms"]):
        assert a == pytest.approx(b, rel=1e-5)
    if "optim.grad_clip=0.5" in extra:  # the clip bit at every step, so the factor mattered
        assert min(ref["grad_norms"]) > 0.5, ref["grad_norms"]
    for rank, r in enumerate((r0, r1)):
        for name, value in r["state"].items():
            torch.testing.assert_close(value, ref["state"][name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    assert r0["eval"]["eval/accuracy"] == pytest.approx(ref["eval"]["eval/accuracy"])


def _grads(rank, world, ep_size):
    cfg = load_config(None, EXACT + [f"data.batch_size={GLOBAL_BATCH // world}", f"dist.ep_size={ep_size}",
                                     "model.num_experts=4"])
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=1)
    model.set_keys_trainable(True)
    x, y = rank_batch(env.rank, world)
    out = engine(x)
    loss = pce_loss(out, y, cfg.model).total
    engine.backward(loss)  # DeepSpeed reduces gradients here (stage 0, boundary step)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_expert_and_shared_gradient_reduction_four_ranks():
    """4 ranks, ep_size 2: experts 0-1 on ranks 0 and 2, experts 2-3 on ranks 1 and 3."""
    ref = spawn(_grads, 1, args=(1,), timeout_s=120)[0]
    grads = spawn(_grads, 4, args=(2,), timeout_s=180)
    for rank, g in enumerate(grads):
        hosted = {"0", "1"} if rank % 2 == 0 else {"2", "3"}
        for name, value in g.items():
            if ".experts." in name:
                assert name.split(".experts.")[1].split(".")[0] in hosted, name
            torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
    # replicas of the same expert agree exactly; shared parameters agree on all ranks
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[2][name]), name
        if ".experts." not in name:
            assert torch.equal(grads[0][name], grads[1][name]), name
    # different experts really got different gradients
    e0 = grads[0]["layers.0.experts.0.conv1.weight"]
    e1 = grads[0]["layers.0.experts.1.conv1.weight"]
    assert not torch.allclose(e0, e1)


def test_zero3_is_refused():
    # one check, at config load: the launchers load the config before any rank starts
    with pytest.raises(ValueError, match="dist.zero_stage.*ZeRO-3"):
        load_config(None, ["dist.zero_stage=3"])
